// Fused nearest-code / top-k search on CPU: the score tile and the running best codes stay in cache.
//
// search(x (H, N, D) float any strides, codebook (Hc, K, D) fp32, codes (Hc, K, D) fp32 rounded to
// the precision, bias (Hc, K) fp32, metric (0 l2, 1 cosine, 2 dot: `fastvq.ops.common.METRICS`),
// precision, k, threads) -> indices (H, N, k) int64, the k lowest scores per token, lowest first, ties
// to the lowest index, and distances (H, N, k) fp32, the exact fp32 distance of each chosen code to the
// unrounded token (squared l2, 1 - cosine with norms clamped to COSINE_NORM_EPS, or -(x . c)); -1 / NaN
// where fewer than k codes score finitely or where the distance is not finite
// (`fastvq.ops.common.chosen_distance`'s rule).
//
// score = bias + sum_d (-2 x_d) c_d (l2, bias = |c|^2), -(x . c) / |c| (cosine, bias = 1 / |c|) or
// bias + sum_d (-x_d) c_d (dot, bias = 0), on
// x rounded as the codes were (`fastvq.ops.common.round_operand`). A NaN or -inf score never wins
// (as the reference's nan_to_num to +inf); a NaN bias (code with a non-finite entry) makes every
// score of that code NaN.
//
// Work: tasks of TOKEN_BLOCK tokens of one head, taken from a shared counter by each thread (so a
// thread slowed by another process takes fewer). A task copies its tokens, rounded and scaled, into
// a buffer, then walks the codes in L2-sized tiles; inside, TN tokens x CV code vectors of W codes
// are scored in registers, written to a small score buffer (one sub-tile of codes per token) and
// reduced to a per-token minimum; only when that minimum beats the token's current k-th score is the
// sub-tile rescanned in code order to insert its codes (strict <, so ties keep the lower index).
//
// Operands: fp32, one dimension per FMA; or, for precision bf16 on a CPU with AVX512-BF16 (built with
// -mavx512bf16), bf16 pairs, two dimensions per vdpbf16ps: the operands are bf16 values already, their
// products are exact in fp32 and the two sums round as two FMAs would, at twice the FMA's rate (bf16
// subnormals, below 1.2e-38, count as zero there).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
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

// Code vector `v` (codes vW .. vW + W - 1 of (K, D)) -> packed[v][steps][W] and bias -> packed_bias[vW ..]
// (l2, dot: bias, cosine: -bias); padding codes (past K) are zero with a NaN bias, so never chosen.
template <typename T>
void pack_code_vector(const float* codes, const float* bias, int64_t K, int64_t D, int64_t v, bool cosine,
                      T* packed, float* packed_bias) {
  const int64_t S = steps<T>(D);
  for (int64_t k = v * W; k < (v + 1) * W; ++k) {
    const bool real = k < K;
    T* dst = packed + v * S * W + k % W;
    for (int64_t s = 0; s < S; ++s) dst[s * W] = real ? operand_step<T>(codes + k * D, 1, D, s, 1.0f, IEEE) : T(0);
    packed_bias[k] = real ? (cosine ? -bias[k] : bias[k]) : std::numeric_limits<float>::quiet_NaN();
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

// Exact fp32 distance of token `x` (D values, stride sx_d) to `code` (D contiguous fp32 values).
template <typename scalar_t, int METRIC>
inline float exact_distance(const scalar_t* x, int64_t sx_d, const float* code, int64_t D) {
  float dot = 0.0f, xx = 0.0f, cc = 0.0f, sq = 0.0f;
  for (int64_t d = 0; d < D; ++d) {
    const float xv = static_cast<float>(x[d * sx_d]), cv = code[d];
    if (METRIC == L2) {
      sq += (xv - cv) * (xv - cv);
    } else {
      dot += xv * cv;
      xx += xv * xv;
      cc += cv * cv;
    }
  }
  if (METRIC == L2) return sq;
  if (METRIC == DOT) return -dot;
  return 1.0f - dot / (std::max(std::sqrt(xx), COSINE_NORM_EPS) * std::max(std::sqrt(cc), COSINE_NORM_EPS));
}

template <typename scalar_t, int METRIC, typename T>
void search_kernel(const at::Tensor& x, const float* codebook, const T* packed, const float* packed_bias,
                   int64_t heads_c, int64_t K, int64_t K_pad, int precision, int k, int threads, int64_t* out,
                   float* out_distance) {
  const int64_t heads = x.size(0), n_tokens = x.size(1), D = x.size(2);
  const int64_t sx_h = x.stride(0), sx_n = x.stride(1), sx_d = x.stride(2);
  const scalar_t* x_data = x.data_ptr<scalar_t>();
  const int64_t blocks = (n_tokens + TOKEN_BLOCK - 1) / TOKEN_BLOCK;
  const int64_t n_tasks = heads * blocks;
  const int64_t S = steps<T>(D);
  const int64_t tile_codes =
      std::max<int64_t>(SUB, TILE_BYTES / (S * sizeof(T) * SUB) * SUB);  // codes per L2 tile, a multiple of SUB
  const float x_scale = METRIC == COSINE ? 1.0f : METRIC == DOT ? -1.0f : -2.0f;
  std::atomic<int64_t> next_task{0};

  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    std::vector<T> xs(TOKEN_BLOCK * S);
    std::vector<float> scores(TN * SUB), best(TOKEN_BLOCK * k);
    std::vector<int64_t> best_index(TOKEN_BLOCK * k);
    vec minima[TN];
    for (int64_t task = next_task++; task < n_tasks; task = next_task++) {
      const int64_t h = task / blocks, n0 = (task % blocks) * TOKEN_BLOCK;
      const int64_t rows = std::min<int64_t>(TOKEN_BLOCK, n_tokens - n0);
      const int64_t padded_rows = (rows + TN - 1) / TN * TN;
      for (int64_t r = 0; r < padded_rows; ++r)
        for (int64_t s = 0; s < S; ++s)
          xs[(r / TN * S + s) * TN + r % TN] =
              r < rows ? operand_step<T>(x_data + h * sx_h + (n0 + r) * sx_n, sx_d, D, s, x_scale, precision) : T(0);
      std::fill(best.begin(), best.end(), INF);
      std::fill(best_index.begin(), best_index.end(), -1);
      const int64_t hc = heads_c == 1 ? 0 : h;
      const T* head_codes = packed + hc * K_pad * S;
      const float* head_bias = packed_bias + hc * K_pad;
      for (int64_t tile0 = 0; tile0 < K_pad; tile0 += tile_codes) {
        const int64_t tile_end = std::min(K_pad, tile0 + tile_codes);
        for (int64_t r0 = 0; r0 < padded_rows; r0 += TN) {
          for (int64_t k0 = tile0; k0 < tile_end; k0 += SUB) {
            const int n_codes = static_cast<int>(std::min<int64_t>(SUB, tile_end - k0));
            score_sub_tile<METRIC == COSINE>(xs.data() + r0 * S, S, head_codes + k0 * S, head_bias + k0, n_codes / W,
                                             scores.data(), minima);
            for (int t = 0; t < TN && r0 + t < rows; ++t) {
              float* token_best = best.data() + (r0 + t) * k;
              int64_t* token_index = best_index.data() + (r0 + t) * k;
              if (!any_below(minima[t], token_best[k - 1])) continue;
              const float* s = scores.data() + t * SUB;
              if (k == 1) {  // the first code with the sub-tile's minimum, unless that is -inf
                const float m = horizontal_min(minima[t]);
                if (m != -INF) {
                  token_best[0] = m;
                  token_index[0] = k0 + first_equal(s, n_codes, m);
                  continue;
                }
              }
              for (int l = 0; l < n_codes; ++l)  // code order: strict < keeps the lower index on ties
                if (s[l] < token_best[k - 1] && s[l] != -INF) insert(token_best, token_index, k, s[l], k0 + l);
            }
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* token = x_data + h * sx_h + (n0 + r) * sx_n;
        for (int j = 0; j < k; ++j) {
          int64_t index = best_index[r * k + j];
          float distance = index < 0 ? NAN : exact_distance<scalar_t, METRIC>(token, sx_d, codebook + (hc * K + index) * D, D);
          if (!std::isfinite(distance)) index = -1, distance = NAN;
          out[(h * n_tokens + n0 + r) * k + j] = index;
          out_distance[(h * n_tokens + n0 + r) * k + j] = distance;
        }
      }
    }
  });
}

// The codes packed as operands of type T, then the search of every token.
template <typename T>
void search_operands(const at::Tensor& x, const at::Tensor& codebook, const at::Tensor& codes, const at::Tensor& bias,
                     int64_t metric, int64_t precision, int64_t k, int64_t threads, at::Tensor& out,
                     at::Tensor& out_distance) {
  const int64_t heads_c = codes.size(0), K = codes.size(1), D = codes.size(2);
  const int64_t K_pad = (K + W * CV - 1) / (W * CV) * (W * CV);
  const std::unique_ptr<T[]> packed(new T[heads_c * K_pad * steps<T>(D)]);  // filled in parallel below
  const std::unique_ptr<float[]> packed_bias(new float[heads_c * K_pad]);
  const int64_t S = steps<T>(D), vectors = K_pad / W;
  at::parallel_for(0, heads_c * vectors, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t hc = i / vectors;
      pack_code_vector(codes.data_ptr<float>() + hc * K * D, bias.data_ptr<float>() + hc * K, K, D, i % vectors,
                       metric == COSINE, packed.get() + hc * K_pad * S, packed_bias.get() + hc * K_pad);
    }
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastvq_cpu_search", [&] {
    const auto run = [&](auto kernel) {
      kernel(x, codebook.data_ptr<float>(), packed.get(), packed_bias.get(), heads_c, K, K_pad,
             static_cast<int>(precision), static_cast<int>(k), static_cast<int>(threads), out.data_ptr<int64_t>(),
             out_distance.data_ptr<float>());
    };
    if (metric == COSINE)
      run(search_kernel<scalar_t, COSINE, T>);
    else if (metric == DOT)
      run(search_kernel<scalar_t, DOT, T>);
    else
      run(search_kernel<scalar_t, L2, T>);
  });
}

std::tuple<at::Tensor, at::Tensor> search(const at::Tensor& x, const at::Tensor& codebook, const at::Tensor& codes,
                                          const at::Tensor& bias, int64_t metric, int64_t precision, int64_t k,
                                          int64_t threads) {
  TORCH_CHECK(x.dim() == 3 && codes.dim() == 3 && bias.dim() == 2, "search: x (H, N, D), codes (Hc, K, D), bias (Hc, K)");
  TORCH_CHECK(codes.scalar_type() == at::kFloat && bias.scalar_type() == at::kFloat &&
              codebook.scalar_type() == at::kFloat, "search: codebook, codes and bias must be fp32");
  TORCH_CHECK(codebook.sizes() == codes.sizes(), "search: codebook and codes must have one shape");
  TORCH_CHECK(x.device().is_cpu() && codes.device().is_cpu() && bias.device().is_cpu(), "search: CPU tensors only");
  TORCH_CHECK(k >= 1 && threads >= 1, "search: k >= 1 and threads >= 1");
  TORCH_CHECK(metric == L2 || metric == COSINE || metric == DOT, "search: metric 0 (l2), 1 (cosine) or 2 (dot)");
  const at::Tensor codes_c = codes.contiguous(), bias_c = bias.contiguous(), codebook_c = codebook.contiguous();
  const int64_t heads_c = codes.size(0), D = codes.size(2);
  TORCH_CHECK(x.size(2) == D && (heads_c == 1 || heads_c == x.size(0)), "search: shapes of x and codes disagree");
  at::Tensor out = at::empty({x.size(0), x.size(1), k}, x.options().dtype(at::kLong));
  at::Tensor out_distance = at::empty({x.size(0), x.size(1), k}, x.options().dtype(at::kFloat));
  if (x.size(1) == 0) return {out, out_distance};
#ifdef __AVX512BF16__
  if (precision == BF16) {
    search_operands<bf16_pair>(x, codebook_c, codes_c, bias_c, metric, precision, k, threads, out, out_distance);
    return {out, out_distance};
  }
#endif
  search_operands<float>(x, codebook_c, codes_c, bias_c, metric, precision, k, threads, out, out_distance);
  return {out, out_distance};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("search", &search, "Fused nearest-code / top-k search on CPU (see kernels/cpu/search.cpp)");
}
