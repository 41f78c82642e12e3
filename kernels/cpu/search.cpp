// Fused nearest-code / top-k search on CPU: the score tile and the running best codes stay in cache.
//
// search(x (H, N, D) and codebook (Hc, K, D), any float dtype and strides, metric (0 l2, 1 cosine,
// 2 dot: `fastvq.ops.common.METRICS`), precision (`PRECISIONS`), k, threads, splits = 0: chosen here,
// prefilter = `PrefilterUse`)
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
// a shared counter to the caller's thread and the process's helper threads (workers.h): no thread waits
// by spinning, so one that another process slows down takes fewer items and one that waits gives its
// core away. An item copies its tokens, rounded and scaled, into a buffer, then walks its codes in
// L2-sized tiles; inside, TN tokens x CV code vectors of W codes are scored in registers, written to
// a small score buffer (one sub-tile of codes per token) and reduced to a per-token minimum; only when
// that minimum beats the token's current k-th score is the sub-tile rescanned in code order to insert
// its codes (strict <, so ties keep the lower index). For k = 1, each token keeps instead a running
// minimum per lane and the pair of code vectors it came from (`sub_tile_argmin`, strict <, a whole tile
// per call), reduced once at the end of the item to the lowest code among the lanes' equal minima
// (`lane_argmin`): no rescans, the same answer. The last item of a token block to finish merges
// the splits' lists in code order (`merge_splits`), so the answer is the same for every thread count
// and work split, bit for bit.
//
// Operands: fp32, one dimension per FMA; or, for precision bf16 on a CPU with AVX512-BF16 (built with
// -mavx512bf16), bf16 pairs, two dimensions per vdpbf16ps: the operands are bf16 values already, their
// products are exact in fp32 and the two sums round as two FMAs would, at twice the FMA's rate (bf16
// subnormals, below 1.2e-38, count as zero there).
//
// Prefilter (every other precision on an AVX512-BF16 build): a work item ranks its codes first by bf16
// pairs (twice the rate of fp32 FMAs) and scores in fp32 only the candidates whose bf16 score is below
// the token's k-th fp32 score plus a proven error bound (`PrefilterBound`), so the answer is the fp32
// ranking's, bit for bit; it gives way (fp32 operands for the rest of the item) when an entry is past
// PREFILTER_LIMIT or when candidates are so many that the fp32 scores cost more than it saves, and for
// k = 1 it is not used on short dot products over few codes (PREFILTER_MIN_WORK), where it costs more.
// Layout: tile.h holds the register tile (vectors, the TN x CV scores, list insertion), packed_codes.h
// the packed codebook and per-code terms, workers.h the helper threads, this file the work plan,
// prefilter and outputs.

#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <tuple>
#include <utility>
#include <type_traits>
#include <vector>

#include "packed_codes.h"
#include "tile.h"
#include "workers.h"

namespace fastvq_cpu {

constexpr int TOKEN_BLOCK = 96;             // tokens per work item, a multiple of TN
constexpr int64_t TILE_BYTES = 256 * 1024;  // packed codes per L2 tile
// The prefilter gives way when its fp32 scores cost more than half what it saves: a (token, code) pair
// costs D / 16 cycles ranked by fp32 operands, D / 32 by bf16 pairs, and an fp32 score about
// D / 2 + EVALUATION_COST cycles; PREFILTER_GRACE pairs per token pay for filling the list.
constexpr int64_t EVALUATION_COST = 20, PREFILTER_GRACE = 1024;
constexpr int64_t SHORT_STEPS = 4;  // dot products of at most this many steps keep no scores (`sub_tile_scores`)
constexpr int EXACT_CHAINS = 4;  // the prefilter's candidates scored at once (independent FMA chains)
// The prefilter pays for k = 1 only past PREFILTER_MIN_WORK (dimensions x codes per split): below, its
// first sub-tile per token (list empty: every code a candidate) and rescans cost more than the bf16 pairs
// save (D = 4, K = 16384: 1.4x slower than fp32 operands; D = 8: 1.2x faster; K = 1024: even at D = 64,
// 2.8x slower at D = 4).
constexpr int64_t PREFILTER_MIN_WORK = 65536;
enum PrefilterUse { PREFILTER_NEVER = 0, PREFILTER_WHERE_IT_PAYS = 1, PREFILTER_ALWAYS = 2 };  // `search`'s argument

// Distance of token `x` (D values, stride sx_d, taken as fp32) to `code` (D contiguous fp32 values),
// rounded once to fp32 from fp64 sums: products and differences of fp32 values are exact in fp64, and
// `LaneSum`'s running sums in a fixed order keep the error near D 2^-53, so the result is the fp32 value
// nearest the exact distance at any D (an fp32 sum drifted by ~D 2^-24). Its intermediate values do
// not overflow: only a distance past the fp32 range is not finite.
template <typename scalar_t, int METRIC>
inline float exact_distance(const scalar_t* x, int64_t sx_d, const float* code, int64_t D) {
  LaneSum acc, x_sq, c_sq;  // acc: (x - c)^2 (l2) or x c
  for (int64_t d = 0; d < D; ++d) {
    const double xv = static_cast<float>(x[d * sx_d]), cv = code[d];
    if (METRIC == L2) {
      acc.add(d, (xv - cv) * (xv - cv));
    } else {
      acc.add(d, xv * cv);
      if (METRIC == COSINE) x_sq.add(d, xv * xv), c_sq.add(d, cv * cv);
    }
  }
  const double sum = acc.total(), x_norm = x_sq.total(), c_norm = c_sq.total();
  if (METRIC == L2) return static_cast<float>(sum);
  if (METRIC == DOT) return static_cast<float>(-sum);
  const double eps = COSINE_NORM_EPS;
  return static_cast<float>(1.0 - sum / (std::max(std::sqrt(x_norm), eps) * std::max(std::sqrt(c_norm), eps)));
}

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

// The prefilter's error bound: |bf16-pair score - fp32 score| <= |x| M alpha + B beta + tau (1 + |x| + M)
// for a token with |x| (the norm of its operands, scaled) and a sub-tile whose valid codes have |c| (or
// |c| / |c| for cosine) <= M and |bias| <= B, where every operand is within PREFILTER_LIMIT:
// - bf16 rounding of both operands (unit roundoff u = 2^-8): sum_d |x_d c_d| (2u + u^2) <= |x| |c| (2u + u^2);
// - the two chains of D fp32 roundings (vdpbf16ps rounds as two FMAs would): gamma_D (|bias| + sum |x_d c_d|)
//   each, gamma_D = D 2^-24 / (1 - D 2^-24), with (1 + 2u + u^2) on the bf16 side;
// - cosine's final product by 1 / |c|: 2^-24 of each result (|score| <= |x| M);
// - bf16 and fp32 results and bf16 operands below 2^-126 flushed to zero: 2^-126 (1 + |x| + M) per step.
// Each factor is rounded up (the sums in fp32 round up again: `update_limit`, `gather_candidates`).
struct PrefilterBound {
  float alpha, beta, tau;
  explicit PrefilterBound(int64_t D = 1) {
    const double gamma = (D + 2) * 0x1p-24 / (1 - (D + 2) * 0x1p-24), u = 0x1p-8;
    alpha = static_cast<float>((2 * u + u * u + 2 * gamma * (1 + 2 * u + u * u) + 0x1p-23) * (1 + 0x1p-20));
    beta = static_cast<float>(2 * gamma * (1 + 0x1p-20));
    tau = static_cast<float>((D + 2) * 0x1p-125);
  }
};

// One thread's buffers: its tokens' operands (fp32 or bf16 pairs as the codes are ranked, and bf16
// pairs for the prefilter), a token's scores over a sub-tile, the running lists and the prefilter's
// token norms.
template <typename T>
struct ThreadBuffers {
  std::vector<T> xs;
  std::vector<bf16_pair> xs_bf16;
  std::vector<float> scores, row, best, x_norm, error, limit;  // error, limit: the prefilter's, per token
  std::vector<int64_t> best_index;
  std::vector<float> lane_best;  // k = 1: each token's running argmin per lane (`sub_tile_argmin`)
  std::vector<int32_t> lane_pair;
  bool fits = false;  // the tokens' operands are within PREFILTER_LIMIT
  std::vector<int> pending_rows;  // the prefilter's candidates still to score: token row, code
  std::vector<int64_t> pending_codes;
  ThreadBuffers(int64_t D, int k, bool prefilter)
      : xs(TOKEN_BLOCK * steps<T>(D)), xs_bf16(prefilter ? TOKEN_BLOCK * steps<bf16_pair>(D) : 0),
        scores(TN * SUB), row(SUB), best(TOKEN_BLOCK * k), x_norm(TOKEN_BLOCK), error(TOKEN_BLOCK), limit(TOKEN_BLOCK),
        best_index(TOKEN_BLOCK * k), lane_best(k == 1 ? TOKEN_BLOCK * W : 0), lane_pair(lane_best.size()) {
    pending_rows.reserve(prefilter ? TN * SUB : 0);
    pending_codes.reserve(pending_rows.capacity());
  }
};

// The search of every item of `plan`: x (H, N, D) strided against the packed codes, ranked by operands
// of type T (fp32, or bf16 pairs for precision bf16), with the bf16 prefilter when `codes.prefilter`.
template <typename scalar_t, int METRIC, typename T>
struct Search {
  const scalar_t* x;
  int64_t sx_h, sx_n, sx_d, n_tokens;
  PackedCodes* codes;
  int k;
  WorkPlan plan;
  PrefilterBound bound;
  float* split_best;                  // (H, blocks, splits, TOKEN_BLOCK, k) when splits > 1
  int64_t* split_index;
  std::atomic<int64_t>* splits_done;  // (H, blocks)
  std::atomic<int64_t>* stats;        // prefiltered items, items that left the prefilter, exact evaluations
  int64_t* out;
  float* out_distance;

  static constexpr float x_scale = METRIC == COSINE ? 1.0f : METRIC == DOT ? -1.0f : -2.0f;
  static constexpr bool CAN_PREFILTER = BF16_PAIRS && std::is_same_v<T, float>;
  int64_t D() const { return codes->D; }

  void run_item(int64_t item, ThreadBuffers<T>& buf) const {
    const int64_t block = item / plan.splits, split = item % plan.splits;
    const int64_t h = block / plan.blocks, n0 = (block % plan.blocks) * TOKEN_BLOCK;
    const int rows = static_cast<int>(std::min<int64_t>(TOKEN_BLOCK, n_tokens - n0));
    load_tokens(h, n0, rows, buf);
    std::fill(buf.best.begin(), buf.best.end(), INF);
    std::fill(buf.best_index.begin(), buf.best_index.end(), -1);
    const int64_t k_begin = split * plan.split_codes, k_end = std::min(codes->K_pad, k_begin + plan.split_codes);
    scan(h, rows, k_begin, k_end, buf);
    if (plan.splits == 1) return finish_block(h, n0, rows, buf.best.data(), buf.best_index.data());
    const int64_t list = (block * plan.splits + split) * TOKEN_BLOCK * k;
    std::copy_n(buf.best.data(), rows * k, split_best + list);
    std::copy_n(buf.best_index.data(), rows * k, split_index + list);
    if (splits_done[block].fetch_add(1, std::memory_order_acq_rel) != plan.splits - 1) return;
    merge_splits(block, rows, buf);  // this item finished the block last
    finish_block(h, n0, rows, buf.best.data(), buf.best_index.data());
  }

  // Tokens n0 .. n0 + rows of head h, rounded and scaled, into buf.xs (groups of TN tokens, S steps each),
  // and for the prefilter their bf16 pairs, norms and whether they fit its bound.
  void load_tokens(int64_t h, int64_t n0, int rows, ThreadBuffers<T>& buf) const {
    const int64_t S = steps<T>(D()), S2 = steps<bf16_pair>(D());
    const int padded_rows = (rows + TN - 1) / TN * TN;
    buf.fits = !buf.xs_bf16.empty();
    const int precision = rounding_keeps<scalar_t>(codes->precision) ? IEEE : codes->precision;
    std::vector<float> operands(D());
    for (int r = 0; r < padded_rows; ++r) {
      const scalar_t* token = x + h * sx_h + (n0 + r) * sx_n;
      for (int64_t s = 0; s < S; ++s)
        buf.xs[(r / TN * S + s) * TN + r % TN] =
            r < rows ? operand_step<T>(token, sx_d, D(), s, x_scale, precision) : T(0);
      if (buf.xs_bf16.empty()) continue;
      LaneSum sq;
      for (int64_t d = 0; d < D(); ++d) {
        operands[d] = r < rows ? x_scale * round_operand(static_cast<float>(token[d * sx_d]), precision) : 0.0f;
        buf.fits = buf.fits && std::abs(operands[d]) <= PREFILTER_LIMIT;
        sq.add(d, static_cast<double>(operands[d]) * operands[d]);
      }
      buf.x_norm[r] = static_cast<float>(std::sqrt(sq.total()) * (1 + 0x1p-20));
      for (int64_t s = 0; s < S2; ++s)
        buf.xs_bf16[(r / TN * S2 + s) * TN + r % TN] = operand_step<bf16_pair>(operands.data(), 1, D(), s, 1.0f, IEEE);
    }
  }

  // The lists of the block's tokens over codes k_begin .. k_end of head h, tile by tile, TN tokens at a
  // time: through the prefilter (SUB codes at a time) while the tokens fit its bound and it finds few
  // candidates, else with the ranking operands themselves (SUB codes at a time for k > 1, the whole
  // tile at once for k = 1).
  void scan(int64_t h, int rows, int64_t k_begin, int64_t k_end, ThreadBuffers<T>& buf) const {
    const int64_t hc = codes->heads_c == 1 ? 0 : h;
    const int64_t tile_codes = std::max<int64_t>(SUB, TILE_BYTES / (D() * sizeof(float) * SUB) * SUB);
    bool prefilter = CAN_PREFILTER && buf.fits && codes->prefilter_fits;
    const bool argmin = k == 1;
    stats[0] += prefilter;
    if (prefilter) set_limits(hc, rows, k_begin, k_end, buf);
    std::fill(buf.lane_best.begin(), buf.lane_best.end(), INF);
    std::fill(buf.lane_pair.begin(), buf.lane_pair.end(), -1);
    int64_t pairs = 0, evaluations = 0;  // (token, code) pairs through the prefilter, fp32 scores it asked for
    for (int64_t tile0 = k_begin; tile0 < k_end; tile0 += tile_codes)
      for (int r0 = 0; r0 < rows; r0 += TN) {
        if (argmin && !prefilter) {  // the whole tile in one call: its state stays in registers (D = 4, 8:
          // 1.2-1.3x faster than a call per sub-tile; K = 16384, D = 4: 1.2x faster than the sub-tiles'
          // minima rescanned where they improve, which cost 30 % of the time in checks and rescans)
          const int n_codes = static_cast<int>(std::min(k_end, tile0 + tile_codes) - tile0);
          ranked_sub_tile(hc, r0, std::min(TN, rows - r0), tile0, n_codes, true, buf);
          continue;
        }
        for (int64_t k0 = tile0; k0 < std::min(k_end, tile0 + tile_codes); k0 += SUB) {
          const int n_codes = static_cast<int>(std::min<int64_t>(SUB, k_end - k0));
          const int tokens = std::min(TN, rows - r0);
          if (!prefilter) {
            ranked_sub_tile(hc, r0, tokens, k0, n_codes, argmin, buf);
            continue;
          }
          evaluations += prefiltered_sub_tile(hc, r0, tokens, k0, n_codes, buf);
          pairs += tokens * n_codes;
          if (evaluations * (32 * D() + 64 * EVALUATION_COST) > (pairs + PREFILTER_GRACE * rows) * D()) {
            prefilter = false, stats[1] += 1;  // too many candidates: rank the rest with the fp32 operands
            evaluations += score_pending(hc, buf);
          }
        }
      }
    stats[2] += evaluations + score_pending(hc, buf);
    if (argmin && !prefilter) take_lane_argmins(hc, rows, buf);  // the argmins of the ranked sub-tiles
  }

  // k = 1: each token's code of the lowest score among its lanes' (`sub_tile_argmin`, `lane_argmin`), the
  // lowest code among equal ones, into its list. The first vector of the pair in each token's first
  // lane at its minimum is scored for TN tokens at once (independent chains: one token's chain of S
  // dependent FMAs cost 6 % of the search at D = 64, K = 1024); other lanes at the minimum (ties) one by one.
  void take_lane_argmins(int64_t hc, int rows, ThreadBuffers<T>& buf) const {
    const int64_t S = steps<T>(D());
    const T* ops = ranking_operands(hc);
    const float* bias = codes->bias.get() + hc * codes->K_pad;
    for (int r0 = 0; r0 < rows; r0 += TN) {
      const int tokens = std::min(TN, rows - r0);
      const T* x[TN];
      const T* first[TN];
      const float* first_bias[TN];
      int64_t first_vector[TN];
      int first_lane[TN];
      for (int t = 0; t < TN; ++t) {
        const int r = r0 + std::min(t, tokens - 1);
        const vec lowest = load(buf.lane_best.data() + r * W);
        first_lane[t] = __builtin_ctz(equal_mask(lowest, horizontal_min(lowest)) | 1u << W);
        first_vector[t] = first_lane[t] < W ? std::max(buf.lane_pair[r * W + first_lane[t]], 0) : 0;
        x[t] = buf.xs.data() + r / TN * S * TN + r % TN;
        first[t] = ops + first_vector[t] * S * W, first_bias[t] = bias + first_vector[t] * W;
      }
      vec scores[TN];
      score_vectors<METRIC == COSINE, TN>(x, S, first, first_bias, scores);
      for (int t = 0; t < tokens; ++t) {
        float m;
        const int64_t code = lane_argmin(load(buf.lane_best.data() + (r0 + t) * W), buf.lane_pair.data() + (r0 + t) * W,
                                         m, [&](int64_t vector, int lane) {
                                           vec s = scores[t];
                                           if (vector != first_vector[t] || lane != first_lane[t]) {
                                             const T* code_ops = ops + vector * S * W;
                                             const float* code_bias = bias + vector * W;
                                             score_vectors<METRIC == COSINE, 1>(&x[t], S, &code_ops, &code_bias, &s);
                                           }
                                           return (equal_mask(s, m) >> lane) & 1;
                                         });
        if (code >= 0) insert(buf.best.data() + r0 + t, buf.best_index.data() + r0 + t, 1, m, code);
      }
    }
  }

  // For the prefilter: each token's error bound over codes k_begin .. k_end of head hc (from their largest
  // |c| and |bias|), and its limit, INF while its list is not full (`update_limit`).
  void set_limits(int64_t hc, int rows, int64_t k_begin, int64_t k_end, ThreadBuffers<T>& buf) const {
    float norm = 0.0f, term = 0.0f;
    for (int64_t g = hc * codes->sub_tiles + k_begin / SUB; g < hc * codes->sub_tiles + ceil_div(k_end, SUB); ++g)
      norm = std::max(norm, codes->norm_bound[g]), term = std::max(term, codes->bias_bound[g]);
    for (int r = 0; r < rows; ++r) {
      const float x_norm = buf.x_norm[r];
      buf.error[r] = x_norm * norm * bound.alpha + term * bound.beta + bound.tau * (1 + x_norm + norm);
      buf.limit[r] = INF;
    }
  }

  // Token r's limit after its list changed: its k-th fp32 score plus its error bound, rounded up; a
  // sub-tile whose bf16-pair scores are all at or above it holds no candidate for the token.
  void update_limit(int r, ThreadBuffers<T>& buf) const {
    const float sum = buf.best[r * k + k - 1] + buf.error[r];
    buf.limit[r] = sum + std::abs(sum) * 0x1p-22f;
  }

  // The operands of type T that rank head hc's codes, (K_pad / W, S, W).
  const T* ranking_operands(int64_t hc) const {
    const int64_t offset = hc * codes->K_pad * steps<T>(D());
    if constexpr (std::is_same_v<T, float>) return codes->f32_operands() + offset;
    else return codes->bf16.get() + offset;
  }

  // Tokens r0 .. r0 + tokens against codes k0 .. k0 + n_codes, ranked by the operands of type T (with
  // `argmin`, k = 1, into the tokens' running argmins).
  void ranked_sub_tile(int64_t hc, int r0, int tokens, int64_t k0, int n_codes, bool argmin,
                       ThreadBuffers<T>& buf) const {
    const int64_t S = steps<T>(D());
    const T* ops = ranking_operands(hc);
    const float* bias = codes->bias.get() + hc * codes->K_pad + k0;
    if (argmin) return argmin_sub_tile(buf.xs.data() + r0 * S, S, ops + k0 * S, bias, n_codes, k0, r0, buf);
    vec minima[TN];
    const float* scores = sub_tile_scores(buf.xs.data() + r0 * S, S, ops + k0 * S, bias, n_codes, buf, minima);
    for (int t = 0; t < tokens; ++t) {
      float* best = buf.best.data() + (r0 + t) * k;
      if (!any_below(minima[t], best[k - 1])) continue;
      update_list(token_scores(scores, t, buf.xs.data() + r0 * S, S, ops + k0 * S, bias, n_codes, buf), n_codes, k0,
                  best, buf.best_index.data() + (r0 + t) * k);
    }
  }

  // k = 1: the running argmin (`sub_tile_argmin`) of tokens r0 .. r0 + TN over codes k0 .. k0 + n_codes,
  // with the dot product's length fixed at compile time for the short ones (D = 4, 8, 16 in fp32 or bf16
  // pairs); codes where a lane's minimum would be -inf are taken again without it.
  static void argmin_sub_tile(const T* xs, int64_t S, const T* ops, const float* bias, int n_codes, int64_t k0,
                              int r0, ThreadBuffers<T>& buf) {
    const int n_vec = n_codes / W;
    const int32_t number0 = static_cast<int32_t>(k0 / W);
    float* best = buf.lane_best.data() + r0 * W;
    int32_t* pair = buf.lane_pair.data() + r0 * W;
    const bool done = with_fixed_steps(S, [&](auto fixed_s) {
      return sub_tile_argmin<METRIC == COSINE, false, decltype(fixed_s)::value>(xs, S, ops, bias, n_vec, number0,
                                                                               best, pair);
    });
    if (!done) sub_tile_argmin<METRIC == COSINE, true, 0>(xs, S, ops, bias, n_vec, number0, best, pair);
  }

  // `sub_tile_minima` of TN tokens (operands xs, S steps) against n_codes codes: the scores are stored
  // (returned) only for dot products of more than SHORT_STEPS steps, else null (`token_scores` recomputes).
  template <typename U>
  static const float* sub_tile_scores(const U* xs, int64_t S, const U* ops, const float* bias, int n_codes,
                                      ThreadBuffers<T>& buf, vec* minima) {
    if (S <= SHORT_STEPS) {
      sub_tile_minima<METRIC == COSINE, false>(xs, S, ops, bias, n_codes / W, nullptr, minima);
      return nullptr;
    }
    sub_tile_minima<METRIC == COSINE, true>(xs, S, ops, bias, n_codes / W, buf.scores.data(), minima);
    return buf.scores.data();
  }

  // Token t's row of the scores `sub_tile_scores` returned, recomputed into buf.row when it kept none.
  template <typename U>
  static float* token_scores(const float* scores, int t, const U* xs, int64_t S, const U* ops, const float* bias,
                             int n_codes, ThreadBuffers<T>& buf) {
    if (!scores) {
      score_row<METRIC == COSINE>(xs + t, S, ops, bias, n_codes / W, buf.row.data());
      return buf.row.data();
    }
    std::copy_n(scores + t * SUB, n_codes, buf.row.data());
    return buf.row.data();
  }

  // One token's list with the sub-tile of n_codes scores s (codes k0 ..), whose minimum is below the
  // list's last score.
  void update_list(const float* s, int n_codes, int64_t k0, float* best, int64_t* best_index) const {
    for (int l = 0; l < n_codes; ++l)  // code order: strict < keeps the lower index on ties
      if (s[l] < best[k - 1] && s[l] != -INF) insert(best, best_index, k, s[l], k0 + l);
  }

  // Tokens r0 .. r0 + tokens against codes k0 .. k0 + n_codes, ranked by bf16 pairs first: a code enters
  // a token's list only through its fp32 score (`exact_scores`), computed for the codes whose bf16-pair
  // score is within the error bound of the token's k-th fp32 score, so the lists are those of the fp32
  // ranking, bit for bit. The candidates are scored one sub-tile later (`score_pending`), after their
  // fp32 codes were prefetched and the next sub-tile's bf16-pair scores computed meanwhile. Returns the
  // number of fp32 scores computed.
  int64_t prefiltered_sub_tile(int64_t hc, int r0, int tokens, int64_t k0, int n_codes, ThreadBuffers<T>& buf) const {
    if constexpr (!CAN_PREFILTER) {
      return 0;
    } else {
      const int64_t S2 = steps<bf16_pair>(D()), K_pad = codes->K_pad;
      const bf16_pair* ops = codes->bf16.get() + (hc * K_pad + k0) * S2;
      const float* bias = codes->bias.get() + hc * K_pad + k0;
      vec minima[TN];
      const bf16_pair* xs = buf.xs_bf16.data() + r0 * S2;
      const float* scores = sub_tile_scores(xs, S2, ops, bias, n_codes, buf, minima);
      int64_t evaluations = score_pending(hc, buf);
      for (int t = 0; t < tokens; ++t) {
        const int r = r0 + t;
        if (!any_below(minima[t], buf.limit[r])) continue;
        float* row = token_scores(scores, t, xs, S2, ops, bias, n_codes, buf);
        if (buf.best[r * k + k - 1] == INF) evaluations += fill_list(row, n_codes, hc, k0, r, buf);
        gather_candidates(row, n_codes, hc, k0, r, buf);
      }
      return evaluations;
    }
  }

  // Token r's list, not full yet, filled from the codes of the lowest bf16-pair scores among n_codes s
  // (codes k0 ..; taken ones become INF in s), so that its threshold drops at once. Returns the number
  // of fp32 scores computed.
  int fill_list(float* s, int n_codes, int64_t hc, int64_t k0, int r, ThreadBuffers<T>& buf) const {
    int evaluations = 0;
    for (; evaluations < k && buf.best[r * k + k - 1] == INF; ++evaluations) {
      const float m = row_min(s, n_codes);
      if (!(m < INF)) break;  // no finite score left
      const int l = first_equal(s, n_codes, m);
      s[l] = INF;
      const int64_t code = k0 + l;
      consider(hc, buf, 1, &r, &code);
    }
    return evaluations;
  }

  // Appends to the pending candidates token r's codes among n_codes bf16-pair scores s (codes k0 ..)
  // whose score is below its k-th fp32 score plus the error bound of that code, and prefetches their
  // fp32 codes.
  void gather_candidates(const float* s, int n_codes, int64_t hc, int64_t k0, int r, ThreadBuffers<T>& buf) const {
    const float* norm = codes->norm.get() + hc * codes->K_pad + k0;
    const float* bias = codes->bias.get() + hc * codes->K_pad + k0;
    const float x_norm = buf.x_norm[r];
    const vec per_norm = splat(x_norm * bound.alpha + bound.tau), base = splat(bound.tau * (1 + x_norm));
    const vec kth_best = splat(buf.best[r * k + k - 1]);
    for (int g = 0; g < n_codes / W; ++g) {
      vec slack = METRIC == L2 ? fma(load(bias + g * W), splat(bound.beta), base) : base;
      slack = fma(load(norm + g * W), per_norm, slack);
      const vec limit = add(kth_best, slack);
      for (uint32_t mask = below_mask(load(s + g * W), add(limit, mul(magnitude(limit), splat(0x1p-22f)))); mask;
           mask &= mask - 1) {
        const int64_t code = k0 + g * W + __builtin_ctz(mask);
        if (code >= codes->K) break;  // padding
        __builtin_prefetch(codes->fp32 + (hc * codes->K + code) * D());
        buf.pending_rows.push_back(r);
        buf.pending_codes.push_back(code);
      }
    }
  }

  // Scores the pending candidates and inserts them; returns how many there were.
  int score_pending(int64_t hc, ThreadBuffers<T>& buf) const {
    const int count = static_cast<int>(buf.pending_rows.size());
    for (int i0 = 0; i0 < count; i0 += EXACT_CHAINS)
      consider(hc, buf, std::min(EXACT_CHAINS, count - i0), buf.pending_rows.data() + i0, buf.pending_codes.data() + i0);
    buf.pending_rows.clear();
    buf.pending_codes.clear();
    return count;
  }

  // The fp32 scores of `count` <= EXACT_CHAINS (token row, code) pairs of head hc, as the fp32 register tile
  // computes them (the same operands, the same FMAs in the same order; the chains interleaved so that
  // their latencies overlap), each inserted into its token's list.
  void consider(int64_t hc, ThreadBuffers<T>& buf, int count, const int* rows, const int64_t* code_of) const {
    const int64_t dims = D(), S = steps<T>(dims);
    const T* x_ops[EXACT_CHAINS];
    const float* row[EXACT_CHAINS];
    float acc[EXACT_CHAINS], term[EXACT_CHAINS];
    for (int i = 0; i < EXACT_CHAINS; ++i) {
      const int r = rows[std::min(i, count - 1)];
      const int64_t code = code_of[std::min(i, count - 1)];
      x_ops[i] = buf.xs.data() + r / TN * S * TN + r % TN;
      row[i] = codes->fp32 + (hc * codes->K + code) * dims;
      term[i] = codes->bias[hc * codes->K_pad + code];
      acc[i] = METRIC == COSINE ? 0.0f : term[i];
    }
    if (codes->precision == IEEE) {
      for (int64_t d = 0; d < dims; ++d)
        for (int i = 0; i < EXACT_CHAINS; ++i) acc[i] = std::fma(x_ops[i][d * TN], row[i][d], acc[i]);
    } else {
      for (int64_t d = 0; d < dims; ++d)
        for (int i = 0; i < EXACT_CHAINS; ++i)
          acc[i] = std::fma(x_ops[i][d * TN], round_operand(row[i][d], codes->precision), acc[i]);
    }
    for (int i = 0; i < count; ++i) {
      const float score = METRIC == COSINE ? acc[i] * term[i] : acc[i];
      if (!(score < INF) || score == -INF) continue;  // never chosen
      insert(buf.best.data() + rows[i] * k, buf.best_index.data() + rows[i] * k, k, score, code_of[i]);
      update_limit(rows[i], buf);
    }
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
    const float* head_codes = codes->fp32 + (codes->heads_c == 1 ? 0 : h) * codes->K * D();
    for (int r = 0; r < rows; ++r) {
      const scalar_t* token = x + h * sx_h + (n0 + r) * sx_n;
      int64_t* token_out = out + (h * n_tokens + n0 + r) * k;
      float* token_distance = out_distance + (h * n_tokens + n0 + r) * k;
      int valid = 0;
      for (int j = 0; j < k && best_index[r * k + j] >= 0; ++j) {
        const int64_t index = best_index[r * k + j];
        const float distance = exact_distance<scalar_t, METRIC>(token, sx_d, head_codes + index * D(), D());
        if (!std::isfinite(distance)) continue;
        token_out[valid] = index;
        token_distance[valid++] = distance;
      }
      std::fill(token_out + valid, token_out + k, -1);
      std::fill(token_distance + valid, token_distance + k, NAN);
    }
  }
};

// Every thread of the call packs steps of the codes, waits for the rest, then searches items.
template <typename T>
void search_operands(const at::Tensor& x, PackedCodes& codes, int metric, int k, const WorkPlan& plan,
                     at::Tensor& out, at::Tensor& out_distance, std::atomic<int64_t>* stats) {
  std::vector<float> split_best(plan.splits > 1 ? plan.items() * TOKEN_BLOCK * k : 0);
  std::vector<int64_t> split_index(split_best.size());
  const std::unique_ptr<std::atomic<int64_t>[]> splits_done(new std::atomic<int64_t>[plan.heads * plan.blocks]());
  std::atomic<int64_t> next_pack{0}, next_item{0};
  Latch packing(codes.pack_steps());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastvq_cpu_search", [&] {
    const auto run = [&](auto search) {
      search.x = x.data_ptr<scalar_t>();
      search.sx_h = x.stride(0), search.sx_n = x.stride(1), search.sx_d = x.stride(2), search.n_tokens = x.size(1);
      search.codes = &codes, search.k = k, search.plan = plan, search.bound = PrefilterBound(codes.D);
      search.split_best = split_best.data(), search.split_index = split_index.data();
      search.splits_done = splits_done.get(), search.stats = stats;
      search.out = out.data_ptr<int64_t>(), search.out_distance = out_distance.data_ptr<float>();
      Workers::instance().run(plan.threads, [&] {
        for (int64_t step = next_pack++; step < codes.pack_steps(); step = next_pack++)
          codes.pack_step(step), packing.count_down();
        packing.wait();
        ThreadBuffers<T> buf(codes.D, k, codes.prefilter);
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

// The search's outputs and, in `stats`, (items through the prefilter, items that left it, exact scores).
std::tuple<at::Tensor, at::Tensor> search_with_stats(const at::Tensor& x, const at::Tensor& codebook, int64_t metric,
                                                     int64_t precision, int64_t k, int64_t threads, int64_t splits,
                                                     int64_t prefilter, std::atomic<int64_t>* stats) {
  TORCH_CHECK(x.dim() == 3 && codebook.dim() == 3, "search: x (H, N, D), codebook (Hc, K, D)");
  TORCH_CHECK(x.device().is_cpu() && codebook.device().is_cpu(), "search: CPU tensors only");
  TORCH_CHECK(k >= 1 && threads >= 1, "search: k >= 1 and threads >= 1");
  TORCH_CHECK(metric == L2 || metric == COSINE || metric == DOT, "search: metric 0 (l2), 1 (cosine) or 2 (dot)");
  TORCH_CHECK(precision >= IEEE && precision <= FP16, "search: precision 0 (ieee), 1 (tf32), 2 (bf16) or 3 (fp16)");
  TORCH_CHECK(prefilter >= PREFILTER_NEVER && prefilter <= PREFILTER_ALWAYS,
              "search: prefilter 0 (never), 1 (where it pays) or 2 (always)");
  const int64_t heads_c = codebook.size(0), D = codebook.size(2);
  TORCH_CHECK(x.size(2) == D && codebook.size(1) >= 1 && (heads_c == 1 || heads_c == x.size(0)),
              "search: shapes of x and codebook disagree");
  at::Tensor out = at::empty({x.size(0), x.size(1), k}, x.options().dtype(at::kLong));
  at::Tensor out_distance = at::empty({x.size(0), x.size(1), k}, x.options().dtype(at::kFloat));
  if (x.size(1) == 0) return {out, out_distance};
  const int64_t K_pad = padded_codes(codebook.size(1));
  const WorkPlan plan = plan_work(x.size(0), x.size(1), K_pad, D, static_cast<int>(threads), splits);
  const bool pays = k > 1 || D * plan.split_codes > PREFILTER_MIN_WORK;
  PackedCodes codes(codebook, static_cast<int>(metric), static_cast<int>(precision),
                    prefilter == PREFILTER_ALWAYS || (prefilter == PREFILTER_WHERE_IT_PAYS && pays));
  if constexpr (BF16_PAIRS) {  // bf16 pairs are multiplied only where the build has vdpbf16ps
    if (codes.bf16_ranks) {
      search_operands<bf16_pair>(x, codes, static_cast<int>(metric), static_cast<int>(k), plan, out, out_distance,
                                 stats);
      return {out, out_distance};
    }
  }
  search_operands<float>(x, codes, static_cast<int>(metric), static_cast<int>(k), plan, out, out_distance, stats);
  return {out, out_distance};
}

std::tuple<at::Tensor, at::Tensor> search(const at::Tensor& x, const at::Tensor& codebook, int64_t metric,
                                          int64_t precision, int64_t k, int64_t threads, int64_t splits,
                                          int64_t prefilter) {
  std::atomic<int64_t> stats[3] = {};
  return search_with_stats(x, codebook, metric, precision, k, threads, splits, prefilter, stats);
}

}  // namespace fastvq_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace fastvq_cpu;
  m.def("search", &search, "Fused nearest-code / top-k search on CPU (see kernels/cpu/search.cpp)", py::arg("x"),
        py::arg("codebook"), py::arg("metric"), py::arg("precision"), py::arg("k"), py::arg("threads"),
        py::arg("splits") = 0, py::arg("prefilter") = static_cast<int64_t>(PREFILTER_WHERE_IT_PAYS),
        py::call_guard<py::gil_scoped_release>());  // touches no Python object: other Python threads run meanwhile
  m.def("work_plan", [](int64_t heads, int64_t n_tokens, int64_t K, int64_t D, int64_t threads, int64_t splits) {
    const WorkPlan plan = plan_work(heads, n_tokens, padded_codes(K), D, static_cast<int>(threads), splits);
    return std::make_tuple(plan.threads, plan.splits, plan.items());
  }, "(threads, code splits, work items) of a search of x (H, N, D) against K codes", py::arg("heads"),
        py::arg("n_tokens"), py::arg("K"), py::arg("D"), py::arg("threads"), py::arg("splits") = 0);
  m.def("prefilter_stats", [](const at::Tensor& x, const at::Tensor& codebook, int64_t metric, int64_t precision,
                              int64_t k, int64_t threads) {
    std::atomic<int64_t> stats[3] = {};
    search_with_stats(x, codebook, metric, precision, k, threads, 0, PREFILTER_WHERE_IT_PAYS, stats);
    return std::make_tuple(stats[0].load(), stats[1].load(), stats[2].load());
  }, "(work items through the bf16 prefilter, items that left it for too many candidates, fp32 scores computed "
        "for its candidates) of a search", py::arg("x"), py::arg("codebook"), py::arg("metric"), py::arg("precision"),
        py::arg("k"), py::arg("threads"));
}
