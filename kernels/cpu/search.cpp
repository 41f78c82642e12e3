// Fused nearest-code / top-k search on CPU: the score tile and the running best codes stay in cache.
//
// search(x (H, N, D) and codebook (Hc, K, D), any float dtype and strides, metric (0 l2, 1 cosine,
// 2 dot: `fastvq.ops.common.METRICS`), precision (`PRECISIONS`), k, threads, splits = 0: chosen here)
// -> indices (H, N, k) int64, the k lowest scores per token, lowest first, ties to the lowest index,
// and distances (H, N, k) fp32, the distance of each chosen code to the unrounded token (squared l2,
// 1 - cosine with norms clamped to COSINE_NORM_EPS, or -(x . c)) computed in fp64 and rounded once
// (`exact_distance`). A chosen code whose distance is not finite in fp32 gives way: a token's list
// holds its valid codes first, then -1 / NaN (also where fewer than k codes score finitely).
//
// score = bias + sum_d (-2 x_d) c_d (l2, bias = |c|^2), -(x . c) / |c| (cosine, bias = 1 / |c|) or
// bias + sum_d (-x_d) c_d (dot, bias = 0), on x and c rounded to the precision
// (`fastvq.ops.common.round_operand`), the bias from the rounded code (`code_term`). A NaN or -inf
// score never wins (as the torch backend's nan_to_num to +inf); a NaN bias (code with a non-finite
// entry) makes every score of that code NaN.
//
// Work: items of (head, block of TOKEN_BLOCK tokens, split of the codes), handed out in that order from
// a shared counter to threads that the call starts itself and joins (`run_threads`): no thread waits
// by spinning, so one that another process slows down takes fewer items and one that waits gives its
// core away. An item copies its tokens, rounded and scaled, into a buffer, then walks its codes in
// L2-sized tiles; inside, TN tokens x CV code vectors of W codes are scored in registers, written to
// a small score buffer (one sub-tile of codes per token) and reduced to a per-token minimum; only when
// that minimum beats the token's current k-th score is the sub-tile rescanned in code order to insert
// its codes (strict <, so ties keep the lower index). The last item of a token block to finish merges
// the splits' lists in code order (`merge_splits`), so the answer is the same for every thread count
// and work split, bit for bit.
//
// Operands: fp32, one dimension per FMA; or, for precision bf16 on a CPU with AVX512-BF16 (built with
// -mavx512bf16), bf16 pairs, two dimensions per vdpbf16ps: the operands are bf16 values already, their
// products are exact in fp32 and the two sums round as two FMAs would, at twice the FMA's rate (bf16
// subnormals, below 1.2e-38, count as zero there).

#include <torch/extension.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <condition_variable>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

constexpr int W = 16;  // codes per vector
constexpr float INF = std::numeric_limits<float>::infinity();

// One vector of W floats and the operations the kernel needs: intrinsics with AVX-512 (GCC's
// register allocator spills the generic version's accumulators there), GCC vectors elsewhere.
#ifdef __AVX512F__
typedef __m512 vec;
constexpr int TN = 6;  // tokens per register tile: TN * CV accumulators + TN minima in 32 zmm
inline vec load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec splat(float v) { return _mm512_set1_ps(v); }
inline vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec min_keep_first(vec a, vec b) { return _mm512_min_ps(a, b); }  // b where a is NaN
inline float horizontal_min(vec v) { return _mm512_reduce_min_ps(v); }
inline bool any_below(vec v, float bound) { return _mm512_cmp_ps_mask(v, splat(bound), _CMP_LT_OQ) != 0; }
inline int first_equal(const float* s, int n, float value) {  // n a multiple of W; value is in s
  int l = 0;
  for (; l < n; l += W) {
    const __mmask16 hit = _mm512_cmp_ps_mask(load(s + l), splat(value), _CMP_EQ_OQ);
    if (hit) return l + __builtin_ctz(hit);
  }
  return -1;
}
#else
typedef float vec __attribute__((vector_size(W * sizeof(float))));
typedef float vec_unaligned __attribute__((vector_size(W * sizeof(float)), aligned(4)));
constexpr int TN = 2;  // 16 ymm registers: each vec is two of them
inline vec load(const float* p) { return *reinterpret_cast<const vec_unaligned*>(p); }
inline void store(float* p, vec v) { *reinterpret_cast<vec_unaligned*>(p) = v; }
inline vec splat(float v) { return vec{} + v; }
inline vec fma(vec a, vec b, vec c) { return a * b + c; }
inline vec mul(vec a, vec b) { return a * b; }
inline vec min_keep_first(vec a, vec b) { return a < b ? a : b; }
inline float horizontal_min(vec v) {  // v holds no NaN
  float m = v[0];
  for (int l = 1; l < W; ++l) m = v[l] < m ? v[l] : m;
  return m;
}
inline bool any_below(vec v, float bound) { return horizontal_min(v) < bound; }
inline int first_equal(const float* s, int n, float value) {
  for (int l = 0; l < n; ++l)
    if (s[l] == value) return l;
  return -1;
}
#endif

// One step of the dot product: a token's operand (x scaled) times a vector of W codes' operands.
inline vec load_codes(const float* p) { return load(p); }
inline vec multiply_add(vec acc, float x, vec codes) { return fma(splat(x), codes, acc); }
#ifdef __AVX512BF16__
typedef uint32_t bf16_pair;  // two bf16 values: dimension 2s in the low half, 2s + 1 in the high half
inline __m512i load_codes(const bf16_pair* p) { return _mm512_loadu_si512(p); }
inline vec multiply_add(vec acc, bf16_pair x, __m512i codes) {
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(static_cast<int>(x)), (__m512bh)codes);
}
#endif
constexpr int CV = 2;
constexpr int SUB = 256;          // codes per sub-tile (score buffer row)
constexpr int TOKEN_BLOCK = 96;   // tokens per task, a multiple of TN

constexpr int64_t TILE_BYTES = 256 * 1024;  // packed codes per L2 tile

enum Precision { IEEE = 0, TF32 = 1, BF16 = 2, FP16 = 3 };
constexpr float COSINE_NORM_EPS = 1e-12f;  // `fastvq.ops.common.COSINE_NORM_EPS`
constexpr int L2 = 0, COSINE = 1, DOT = 2;  // positions in `fastvq.ops.common.METRICS`

// `fastvq.ops.common.round_operand` for one value.
inline float round_operand(float v, int precision) {
  switch (precision) {
    case TF32: {
      if (!std::isfinite(v)) return v;
      uint32_t bits;
      std::memcpy(&bits, &v, 4);
      bits = (bits + 0x1000u) & ~0x1FFFu;
      std::memcpy(&v, &bits, 4);
      return v;
    }
    case BF16: return static_cast<float>(c10::BFloat16(v));
    case FP16: return static_cast<float>(c10::Half(v));
    default: return v;
  }
}

// Dot-product steps of D dimensions: D fp32 values, or ceil(D / 2) bf16 pairs.
template <typename T>
constexpr int64_t steps(int64_t D) { return std::is_same_v<T, float> ? D : (D + 1) / 2; }

// Step s of the D values at `v` (stride `stride`), each rounded to the precision and times `scale`:
// the value of dimension s, or the bf16 pair of dimensions 2s and 2s + 1 (zero past D).
template <typename T, typename scalar_t>
inline T operand_step(const scalar_t* v, int64_t stride, int64_t D, int64_t s, float scale, int precision) {
  const auto value = [&](int64_t d) {
    return d < D ? scale * round_operand(static_cast<float>(v[d * stride]), precision) : 0.0f;
  };
  if constexpr (std::is_same_v<T, float>) {
    return value(s);
  } else {  // the values are bf16 already (scale is a power of two): conversion keeps them
    return static_cast<T>(c10::BFloat16(value(2 * s)).x) | static_cast<T>(c10::BFloat16(value(2 * s + 1)).x) << 16;
  }
}

// The score's per-code term from the rounded code's squared norm `sq` (fp64 sum): |c|^2 (l2), -1 / |c|
// with |c| clamped to COSINE_NORM_EPS (cosine: the minus sign because x is not scaled there), 0
// (dot); NaN when |c|^2 is not finite in fp32 (a NaN or infinite entry, or an overflow), so that
// every score of that code is NaN (`fastvq.ops.common.code_bias`).
inline float code_term(double sq, int metric) {
  if (!std::isfinite(static_cast<float>(sq))) return NAN;
  if (metric == L2) return static_cast<float>(sq);
  if (metric == COSINE) return static_cast<float>(-1.0 / std::max(std::sqrt(sq), static_cast<double>(COSINE_NORM_EPS)));
  return 0.0f;
}

// Code vector `v` (codes vW .. vW + W - 1 of one head's codes, `head` with strides s_k, s_d) ->
// packed[v][steps][W] operands rounded to the precision and packed_bias[vW ..] (`code_term`); the
// unrounded fp32 values into fp32_copy (K, D) unless null. Padding codes (past K) are zero with a
// NaN term, so never chosen. `row`: D floats of scratch.
template <typename T, typename code_t>
void pack_code_vector(const code_t* head, int64_t s_k, int64_t s_d, int64_t K, int64_t D, int64_t v, int metric,
                      int precision, float* row, T* packed, float* packed_bias, float* fp32_copy) {
  const int64_t S = steps<T>(D);
  for (int64_t k = v * W; k < (v + 1) * W; ++k) {
    T* dst = packed + v * S * W + k % W;
    double sq = 0.0;
    for (int64_t d = 0; d < D && k < K; ++d) {
      const float value = static_cast<float>(head[k * s_k + d * s_d]);
      if (fp32_copy) fp32_copy[k * D + d] = value;
      row[d] = round_operand(value, precision);
      sq += static_cast<double>(row[d]) * row[d];
    }
    for (int64_t s = 0; s < S; ++s) dst[s * W] = k < K ? operand_step<T>(row, 1, D, s, 1.0f, IEEE) : T(0);
    packed_bias[k] = k < K ? code_term(sq, metric) : NAN;
  }
}

// Scores of the TN tokens of `xs` (S steps of TN operands) against `n_vec` code vectors (a multiple
// of CV) into `scores` (TN rows of SUB), and each token's minimum over them into `minima_out`. The
// minima live in a local array until the end: GCC keeps an array it was given by pointer in memory
// and stored it after every code vector (11 % of the time at D = 8, 19 % with bf16 pairs).
template <bool COSINE, typename T>
inline void score_sub_tile(const T* xs, int64_t S, const T* codes, const float* bias, int n_vec,
                           float* scores, vec* minima_out) {
  vec minima[TN];
  for (int t = 0; t < TN; ++t) minima[t] = splat(INF);
  for (int j = 0; j < n_vec; j += CV) {
    vec acc[TN][CV];
    for (int c = 0; c < CV; ++c) {
      const vec init = COSINE ? splat(0.0f) : load(bias + (j + c) * W);
      for (int t = 0; t < TN; ++t) acc[t][c] = init;
    }
    const T* code = codes + static_cast<int64_t>(j) * S * W;
    const T* xd = xs;
#pragma GCC unroll 8
    for (int64_t s = 0; s < S; ++s, xd += TN, code += W) {
      decltype(load_codes(code)) cv[CV];
      for (int c = 0; c < CV; ++c) cv[c] = load_codes(code + c * S * W);
      for (int t = 0; t < TN; ++t)
        for (int c = 0; c < CV; ++c) acc[t][c] = multiply_add(acc[t][c], xd[t], cv[c]);
    }
    for (int c = 0; c < CV; ++c) {
      const vec scale = COSINE ? load(bias + (j + c) * W) : splat(1.0f);
      for (int t = 0; t < TN; ++t) {
        const vec s = COSINE ? mul(acc[t][c], scale) : acc[t][c];
        store(scores + t * SUB + (j + c) * W, s);
        minima[t] = min_keep_first(s, minima[t]);  // a NaN score never becomes the minimum
      }
    }
  }
  for (int t = 0; t < TN; ++t) minima_out[t] = minima[t];
}

// Insert `score` of code `index` into the sorted list (k long) after any equal score.
inline void insert(float* best, int64_t* best_index, int k, float score, int64_t index) {
  int slot = k - 1;
  while (slot > 0 && score < best[slot - 1]) {
    best[slot] = best[slot - 1];
    best_index[slot] = best_index[slot - 1];
    --slot;
  }
  best[slot] = score;
  best_index[slot] = index;
}

// Distance of token `x` (D values, stride sx_d, taken as fp32) to `code` (D contiguous fp32 values),
// rounded once to fp32 from fp64 sums: products and differences of fp32 values are exact in fp64, and
// LANES running sums in a fixed order keep the error near D 2^-53, so the result is the fp32 value
// nearest the exact distance at any D (an fp32 sum drifted by ~D 2^-24). Its intermediate values do
// not overflow: only a distance past the fp32 range is not finite.
template <typename scalar_t, int METRIC>
inline float exact_distance(const scalar_t* x, int64_t sx_d, const float* code, int64_t D) {
  constexpr int LANES = 8;
  double acc[LANES] = {}, x_sq[LANES] = {}, c_sq[LANES] = {};  // acc: (x - c)^2 (l2) or x c
  for (int64_t d0 = 0; d0 < D; d0 += LANES)
    for (int l = 0; l < LANES && d0 + l < D; ++l) {
      const double xv = static_cast<float>(x[(d0 + l) * sx_d]), cv = code[d0 + l];
      if (METRIC == L2) {
        acc[l] += (xv - cv) * (xv - cv);
      } else {
        acc[l] += xv * cv;
        if (METRIC == COSINE) x_sq[l] += xv * xv, c_sq[l] += cv * cv;
      }
    }
  double sum = 0.0, x_norm = 0.0, c_norm = 0.0;
  for (int l = 0; l < LANES; ++l) sum += acc[l], x_norm += x_sq[l], c_norm += c_sq[l];
  if (METRIC == L2) return static_cast<float>(sum);
  if (METRIC == DOT) return static_cast<float>(-sum);
  const double eps = COSINE_NORM_EPS;
  return static_cast<float>(1.0 - sum / (std::max(std::sqrt(x_norm), eps) * std::max(std::sqrt(c_norm), eps)));
}

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How a call's work is cut: items (head, token block, code split), the split varying fastest. Codes
// are split only when there are too few token blocks to keep every thread busy with a few items each.
struct WorkPlan {
  int64_t heads, blocks, splits, split_codes;  // split_codes: codes per split, a multiple of SUB
  int threads;                                 // threads the call runs on, the caller's included
  int64_t items() const { return heads * blocks * splits; }
};

constexpr int ITEMS_PER_THREAD = 8;         // items per thread at least, when codes can be split
constexpr int64_t MIN_SPLIT_SUB_TILES = 4;  // sub-tiles of codes per split at least (1024 codes)
constexpr int64_t MIN_THREAD_WORK = 1 << 22;  // multiply-adds per thread at least (~0.3 ms): a thread costs ~30 us

// `splits` > 0 forces that many code splits (tests: the answer does not depend on it).
WorkPlan plan_work(int64_t heads, int64_t n_tokens, int64_t K_pad, int64_t D, int threads, int64_t splits) {
  const int64_t blocks = ceil_div(n_tokens, TOKEN_BLOCK), sub_tiles = ceil_div(K_pad, SUB);
  const int64_t work = heads * n_tokens * K_pad * D;
  threads = static_cast<int>(std::clamp<int64_t>(work / MIN_THREAD_WORK, 1, threads));
  if (splits <= 0)
    splits = std::min(ceil_div(ITEMS_PER_THREAD * threads, heads * blocks), sub_tiles / MIN_SPLIT_SUB_TILES);
  splits = std::clamp<int64_t>(splits, 1, sub_tiles);
  const int64_t split_codes = ceil_div(sub_tiles, splits) * SUB;
  splits = ceil_div(K_pad, split_codes);  // no empty split
  threads = static_cast<int>(std::min<int64_t>(threads, heads * blocks * splits));
  return {heads, blocks, splits, split_codes, threads};
}

// Runs `work()` on the calling thread and on `count - 1` threads started here, then joins them. A
// thread that finishes first blocks in join (no spinning: it gives its core to the others); fewer
// threads when the system refuses to start one (the work is handed out dynamically anyway). Rethrows
// the first exception a thread raised.
template <typename F>
void run_threads(int count, const F& work) {
  std::mutex mutex;
  std::exception_ptr error;
  const auto guarded = [&] {
    try {
      work();
    } catch (...) {
      const std::lock_guard<std::mutex> lock(mutex);
      if (!error) error = std::current_exception();
    }
  };
  std::vector<std::thread> helpers;
  for (int i = 1; i < count; ++i) {
    try {
      helpers.emplace_back(guarded);
    } catch (const std::system_error&) {
      break;
    }
  }
  guarded();
  for (std::thread& helper : helpers) helper.join();
  if (error) std::rethrow_exception(error);
}

// Counts finished steps of a phase; `wait` blocks (no spinning) until all `total` are done.
class Latch {
 public:
  explicit Latch(int64_t total) : left_(total) {}
  void count_down() {
    if (left_.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    const std::lock_guard<std::mutex> lock(mutex_);
    done_.notify_all();
  }
  void wait() {
    if (left_.load(std::memory_order_acquire) == 0) return;
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return left_.load(std::memory_order_acquire) == 0; });
  }

 private:
  std::atomic<int64_t> left_;
  std::mutex mutex_;
  std::condition_variable done_;
};

// One thread's buffers: its tokens' operands, a sub-tile's scores and the running lists.
template <typename T>
struct ThreadBuffers {
  std::vector<T> xs;
  std::vector<float> scores, best;
  std::vector<int64_t> best_index;
  ThreadBuffers(int64_t S, int k) : xs(TOKEN_BLOCK * S), scores(TN * SUB), best(TOKEN_BLOCK * k), best_index(TOKEN_BLOCK * k) {}
};

// The search of every item of `plan`: x (H, N, D) strided, codes packed as operands of type T.
template <typename scalar_t, int METRIC, typename T>
struct Search {
  const scalar_t* x;
  int64_t sx_h, sx_n, sx_d, n_tokens, D, S;
  const float* codebook;  // (Hc, K, D) fp32, for the exact distances
  const T* packed;        // (Hc, K_pad / W, S, W)
  const float* packed_bias;
  int64_t heads_c, K, K_pad, tile_codes;
  int precision, k;
  WorkPlan plan;
  float* split_best;        // (H, blocks, splits, TOKEN_BLOCK, k) when splits > 1
  int64_t* split_index;
  std::atomic<int64_t>* splits_done;  // (H, blocks)
  int64_t* out;
  float* out_distance;

  static constexpr float x_scale = METRIC == COSINE ? 1.0f : METRIC == DOT ? -1.0f : -2.0f;

  void run_item(int64_t item, ThreadBuffers<T>& buf) const {
    const int64_t block = item / plan.splits, split = item % plan.splits;
    const int64_t h = block / plan.blocks, n0 = (block % plan.blocks) * TOKEN_BLOCK;
    const int rows = static_cast<int>(std::min<int64_t>(TOKEN_BLOCK, n_tokens - n0));
    load_tokens(h, n0, rows, buf.xs.data());
    std::fill(buf.best.begin(), buf.best.end(), INF);
    std::fill(buf.best_index.begin(), buf.best_index.end(), -1);
    const int64_t k_begin = split * plan.split_codes, k_end = std::min(K_pad, k_begin + plan.split_codes);
    scan(h, rows, k_begin, k_end, buf);
    if (plan.splits == 1) return finish_block(h, n0, rows, buf.best.data(), buf.best_index.data());
    const int64_t list = (block * plan.splits + split) * TOKEN_BLOCK * k;
    std::copy_n(buf.best.data(), rows * k, split_best + list);
    std::copy_n(buf.best_index.data(), rows * k, split_index + list);
    if (splits_done[block].fetch_add(1, std::memory_order_acq_rel) != plan.splits - 1) return;
    merge_splits(block, rows, buf);  // this item finished the block last
    finish_block(h, n0, rows, buf.best.data(), buf.best_index.data());
  }

  // Tokens n0 .. n0 + rows of head h, rounded and scaled, into xs (TN-token groups of S steps).
  void load_tokens(int64_t h, int64_t n0, int rows, T* xs) const {
    const int padded_rows = (rows + TN - 1) / TN * TN;
    for (int r = 0; r < padded_rows; ++r)
      for (int64_t s = 0; s < S; ++s)
        xs[(r / TN * S + s) * TN + r % TN] =
            r < rows ? operand_step<T>(x + h * sx_h + (n0 + r) * sx_n, sx_d, D, s, x_scale, precision) : T(0);
  }

  // The lists of the block's tokens over codes k_begin .. k_end of head h's packed codes.
  void scan(int64_t h, int rows, int64_t k_begin, int64_t k_end, ThreadBuffers<T>& buf) const {
    const int64_t hc = heads_c == 1 ? 0 : h;
    const T* head_codes = packed + hc * K_pad * S;
    const float* head_bias = packed_bias + hc * K_pad;
    vec minima[TN];
    for (int64_t tile0 = k_begin; tile0 < k_end; tile0 += tile_codes) {
      const int64_t tile_end = std::min(k_end, tile0 + tile_codes);
      for (int r0 = 0; r0 < rows; r0 += TN) {
        for (int64_t k0 = tile0; k0 < tile_end; k0 += SUB) {
          const int n_codes = static_cast<int>(std::min<int64_t>(SUB, tile_end - k0));
          score_sub_tile<METRIC == COSINE>(buf.xs.data() + r0 * S, S, head_codes + k0 * S, head_bias + k0, n_codes / W,
                                           buf.scores.data(), minima);
          for (int t = 0; t < TN && r0 + t < rows; ++t)
            update_list(buf.scores.data() + t * SUB, minima[t], n_codes, k0, buf.best.data() + (r0 + t) * k,
                        buf.best_index.data() + (r0 + t) * k);
        }
      }
    }
  }

  // One token's list with the sub-tile of n_codes scores s (codes k0 ..), whose minimum is in `minima`.
  void update_list(const float* s, vec minima, int n_codes, int64_t k0, float* best, int64_t* best_index) const {
    if (!any_below(minima, best[k - 1])) return;
    if (k == 1) {  // the first code with the sub-tile's minimum, unless that is -inf
      const float m = horizontal_min(minima);
      if (m != -INF) {
        best[0] = m;
        best_index[0] = k0 + first_equal(s, n_codes, m);
        return;
      }
    }
    for (int l = 0; l < n_codes; ++l)  // code order: strict < keeps the lower index on ties
      if (s[l] < best[k - 1] && s[l] != -INF) insert(best, best_index, k, s[l], k0 + l);
  }

  // The block's lists over all splits, in split (code) order, into buf.best / buf.best_index.
  void merge_splits(int64_t block, int rows, ThreadBuffers<T>& buf) const {
    std::fill(buf.best.begin(), buf.best.end(), INF);
    std::fill(buf.best_index.begin(), buf.best_index.end(), -1);
    for (int64_t split = 0; split < plan.splits; ++split) {
      const int64_t list = (block * plan.splits + split) * TOKEN_BLOCK * k;
      for (int r = 0; r < rows; ++r)
        for (int j = 0; j < k; ++j) {
          const float score = split_best[list + r * k + j];
          if (!(score < buf.best[r * k + k - 1])) break;  // the split's list is sorted: no later entry enters
          insert(buf.best.data() + r * k, buf.best_index.data() + r * k, k, score, split_index[list + r * k + j]);
        }
    }
  }

  // Exact distances of the block's chosen codes, and the outputs: a chosen code whose distance is not
  // finite gives way, so a token's list holds its valid codes first (ascending score, ties to the
  // lower index) and -1 / NaN only after them.
  void finish_block(int64_t h, int64_t n0, int rows, const float* best, const int64_t* best_index) const {
    const float* head_codes = codebook + (heads_c == 1 ? 0 : h) * K * D;
    for (int r = 0; r < rows; ++r) {
      const scalar_t* token = x + h * sx_h + (n0 + r) * sx_n;
      int64_t* token_out = out + (h * n_tokens + n0 + r) * k;
      float* token_distance = out_distance + (h * n_tokens + n0 + r) * k;
      int valid = 0;
      for (int j = 0; j < k && best_index[r * k + j] >= 0; ++j) {
        const int64_t index = best_index[r * k + j];
        const float distance = exact_distance<scalar_t, METRIC>(token, sx_d, head_codes + index * D, D);
        if (!std::isfinite(distance)) continue;
        token_out[valid] = index;
        token_distance[valid++] = distance;
      }
      std::fill(token_out + valid, token_out + k, -1);
      std::fill(token_distance + valid, token_distance + k, NAN);
    }
  }
};

// The codebook (Hc, K, D), any float dtype and strides, packed for the kernel by `pack_step` (steps
// of PACK_VECTORS code vectors, run by every thread of the call): operands rounded to the precision
// (Hc, K_pad / W, S, W), per-code terms (Hc, K_pad), and the unrounded fp32 codes for the exact
// distances (the codebook's own data when it is fp32 and contiguous, else a copy).
template <typename T>
struct PackedCodes {
  static constexpr int64_t PACK_VECTORS = 64;
  const at::Tensor& codebook;
  int metric, precision;
  int64_t heads_c, K, D, S, K_pad;
  std::unique_ptr<T[]> operands;
  std::unique_ptr<float[]> bias;
  std::vector<float> copy;
  const float* fp32;

  PackedCodes(const at::Tensor& codebook, int metric, int precision)
      : codebook(codebook), metric(metric), precision(precision), heads_c(codebook.size(0)), K(codebook.size(1)),
        D(codebook.size(2)), S(steps<T>(D)), K_pad(ceil_div(K, W * CV) * (W * CV)),
        operands(new T[heads_c * K_pad * S]), bias(new float[heads_c * K_pad]) {  // filled by pack_step
    const bool own = codebook.scalar_type() == at::kFloat && codebook.is_contiguous();
    if (!own) copy.resize(heads_c * K * D);
    fp32 = own ? codebook.data_ptr<float>() : copy.data();
  }
  int64_t vectors() const { return K_pad / W; }
  int64_t pack_steps() const { return heads_c * ceil_div(vectors(), PACK_VECTORS); }

  void pack_step(int64_t step) {
    const int64_t hc = step % heads_c, v0 = step / heads_c * PACK_VECTORS;
    std::vector<float> row(D);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, codebook.scalar_type(), "fastvq_cpu_pack", [&] {
      const scalar_t* head = codebook.data_ptr<scalar_t>() + hc * codebook.stride(0);
      for (int64_t v = v0; v < std::min(vectors(), v0 + PACK_VECTORS); ++v)
        pack_code_vector(head, codebook.stride(1), codebook.stride(2), K, D, v, metric, precision, row.data(),
                         operands.get() + hc * K_pad * S, bias.get() + hc * K_pad,
                         copy.empty() ? nullptr : copy.data() + hc * K * D);
    });
  }
};

// The codes packed as operands of type T (every thread packs steps of code vectors, then waits for
// the rest), then the search of every item.
template <typename T>
void search_operands(const at::Tensor& x, const at::Tensor& codebook, int64_t metric, int64_t precision, int64_t k,
                     int64_t threads, int64_t splits, at::Tensor& out, at::Tensor& out_distance) {
  PackedCodes<T> codes(codebook, static_cast<int>(metric), static_cast<int>(precision));
  const WorkPlan plan = plan_work(x.size(0), x.size(1), codes.K_pad, codes.D, static_cast<int>(threads), splits);
  const bool split = plan.splits > 1;
  std::vector<float> split_best(split ? plan.items() * TOKEN_BLOCK * k : 0);
  std::vector<int64_t> split_index(split_best.size());
  const std::unique_ptr<std::atomic<int64_t>[]> splits_done(new std::atomic<int64_t>[plan.heads * plan.blocks]());
  std::atomic<int64_t> next_pack{0}, next_item{0};
  Latch packing(codes.pack_steps());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastvq_cpu_search", [&] {
    const auto run = [&](auto search) {
      search.x = x.data_ptr<scalar_t>();
      search.sx_h = x.stride(0), search.sx_n = x.stride(1), search.sx_d = x.stride(2);
      search.n_tokens = x.size(1), search.D = codes.D, search.S = codes.S;
      search.codebook = codes.fp32, search.packed = codes.operands.get(), search.packed_bias = codes.bias.get();
      search.heads_c = codes.heads_c, search.K = codes.K, search.K_pad = codes.K_pad;
      search.tile_codes = std::max<int64_t>(SUB, TILE_BYTES / (codes.S * sizeof(T) * SUB) * SUB);  // a multiple of SUB
      search.precision = static_cast<int>(precision), search.k = static_cast<int>(k), search.plan = plan;
      search.split_best = split_best.data(), search.split_index = split_index.data();
      search.splits_done = splits_done.get();
      search.out = out.data_ptr<int64_t>(), search.out_distance = out_distance.data_ptr<float>();
      run_threads(plan.threads, [&] {
        for (int64_t step = next_pack++; step < codes.pack_steps(); step = next_pack++)
          codes.pack_step(step), packing.count_down();
        packing.wait();
        ThreadBuffers<T> buf(codes.S, static_cast<int>(k));
        for (int64_t item = next_item++; item < plan.items(); item = next_item++) search.run_item(item, buf);
      });
    };
    if (metric == COSINE)
      run(Search<scalar_t, COSINE, T>{});
    else if (metric == DOT)
      run(Search<scalar_t, DOT, T>{});
    else
      run(Search<scalar_t, L2, T>{});
  });
}

std::tuple<at::Tensor, at::Tensor> search(const at::Tensor& x, const at::Tensor& codebook, int64_t metric,
                                          int64_t precision, int64_t k, int64_t threads, int64_t splits) {
  TORCH_CHECK(x.dim() == 3 && codebook.dim() == 3, "search: x (H, N, D), codebook (Hc, K, D)");
  TORCH_CHECK(x.device().is_cpu() && codebook.device().is_cpu(), "search: CPU tensors only");
  TORCH_CHECK(k >= 1 && threads >= 1, "search: k >= 1 and threads >= 1");
  TORCH_CHECK(metric == L2 || metric == COSINE || metric == DOT, "search: metric 0 (l2), 1 (cosine) or 2 (dot)");
  TORCH_CHECK(precision >= IEEE && precision <= FP16, "search: precision 0 (ieee), 1 (tf32), 2 (bf16) or 3 (fp16)");
  const int64_t heads_c = codebook.size(0), D = codebook.size(2);
  TORCH_CHECK(x.size(2) == D && codebook.size(1) >= 1 && (heads_c == 1 || heads_c == x.size(0)),
              "search: shapes of x and codebook disagree");
  at::Tensor out = at::empty({x.size(0), x.size(1), k}, x.options().dtype(at::kLong));
  at::Tensor out_distance = at::empty({x.size(0), x.size(1), k}, x.options().dtype(at::kFloat));
  if (x.size(1) == 0) return {out, out_distance};
#ifdef __AVX512BF16__
  if (precision == BF16) {
    search_operands<bf16_pair>(x, codebook, metric, precision, k, threads, splits, out, out_distance);
    return {out, out_distance};
  }
#endif
  search_operands<float>(x, codebook, metric, precision, k, threads, splits, out, out_distance);
  return {out, out_distance};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("search", &search, "Fused nearest-code / top-k search on CPU (see kernels/cpu/search.cpp)", py::arg("x"),
        py::arg("codebook"), py::arg("metric"), py::arg("precision"), py::arg("k"), py::arg("threads"),
        py::arg("splits") = 0);
  m.def("work_plan", [](int64_t heads, int64_t n_tokens, int64_t K, int64_t D, int64_t threads, int64_t splits) {
    const WorkPlan plan = plan_work(heads, n_tokens, ceil_div(K, W * CV) * (W * CV), D, static_cast<int>(threads), splits);
    return std::make_tuple(plan.threads, plan.splits, plan.items());
  }, "(threads, code splits, work items) of a search of x (H, N, D) against K codes", py::arg("heads"),
        py::arg("n_tokens"), py::arg("K"), py::arg("D"), py::arg("threads"), py::arg("splits") = 0);
}
