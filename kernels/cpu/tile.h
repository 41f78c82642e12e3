// The register tile of the C++ CPU search (search.cpp): vectors of W codes, operands rounded to the
// precision, TN tokens x CV code vectors scored in registers per step of the dot product.
//
// Operands: fp32, one dimension per FMA; or, on a CPU with AVX512-BF16 (built with -mavx512bf16),
// bf16 pairs, two dimensions per vdpbf16ps: products of bf16 values are exact in fp32 and the two
// sums round as two FMAs would, at twice the FMA's rate (bf16 subnormals, below 1.2e-38, count as
// zero there, and results below 1.2e-38 are flushed to zero).

#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace fastvq_cpu {

constexpr int W = 16;  // codes per vector
constexpr float INF = std::numeric_limits<float>::infinity();

// One vector of W floats and the operations the kernel needs: intrinsics with AVX-512 (GCC's
// register allocator spills the generic version's accumulators there), GCC vectors elsewhere.
#ifdef __AVX512F__
typedef __m512 vec;
constexpr int TN = 6;  // tokens per register tile: TN * CV accumulators + 2 TN minima in 32 zmm
inline vec load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec splat(float v) { return _mm512_set1_ps(v); }
inline vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec magnitude(vec a) { return _mm512_abs_ps(a); }
inline uint32_t below_mask(vec a, vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }  // bit l: a[l] < b[l]
inline vec min_keep_first(vec a, vec b) { return _mm512_min_ps(a, b); }  // b where a is NaN
inline float horizontal_min(vec v) { return _mm512_reduce_min_ps(v); }
inline bool any_below(vec v, float bound) { return _mm512_cmp_ps_mask(v, splat(bound), _CMP_LT_OQ) != 0; }
typedef __m512i ivec;  // W int32 lanes
inline ivec splat_index(int32_t v) { return _mm512_set1_epi32(v); }
inline ivec load_index(const int32_t* p) { return _mm512_loadu_si512(p); }
inline void store_index(int32_t* p, ivec v) { _mm512_storeu_si512(p, v); }
inline uint32_t equal_mask(vec v, float value) { return _mm512_cmp_ps_mask(v, splat(value), _CMP_EQ_OQ); }
// Lanes where s is -inf become NaN (never kept by `lower_of`).
inline vec drop_minus_inf(vec s) { return _mm512_mask_mov_ps(s, _mm512_cmp_ps_mask(s, splat(-INF), _CMP_EQ_OQ), splat(NAN)); }
// Per lane: s where s < lowest, else lowest (a NaN s never replaces; lowest is never NaN).
inline vec lower_of(vec s, vec lowest) { return _mm512_min_ps(s, lowest); }
// Lanes where `lower` < `lowest` take `number` into `best_number`.
inline void mark_lower(vec lower, vec lowest, int32_t number, ivec& best_number) {
  best_number = _mm512_mask_mov_epi32(best_number, _mm512_cmp_ps_mask(lower, lowest, _CMP_LT_OQ), splat_index(number));
}
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
inline vec add(vec a, vec b) { return a + b; }
inline vec magnitude(vec a) { return a < 0 ? -a : a; }
inline uint32_t below_mask(vec a, vec b) {
  uint32_t mask = 0;
  for (int l = 0; l < W; ++l) mask |= static_cast<uint32_t>(a[l] < b[l]) << l;
  return mask;
}
inline vec min_keep_first(vec a, vec b) { return a < b ? a : b; }
inline float horizontal_min(vec v) {  // v holds no NaN
  float m = v[0];
  for (int l = 1; l < W; ++l) m = v[l] < m ? v[l] : m;
  return m;
}
inline bool any_below(vec v, float bound) { return horizontal_min(v) < bound; }
typedef int32_t ivec __attribute__((vector_size(W * sizeof(int32_t))));
typedef int32_t ivec_unaligned __attribute__((vector_size(W * sizeof(int32_t)), aligned(4)));
inline ivec splat_index(int32_t v) { return ivec{} + v; }
inline ivec load_index(const int32_t* p) { return *reinterpret_cast<const ivec_unaligned*>(p); }
inline void store_index(int32_t* p, ivec v) { *reinterpret_cast<ivec_unaligned*>(p) = v; }
inline uint32_t equal_mask(vec v, float value) {
  uint32_t mask = 0;
  for (int l = 0; l < W; ++l) mask |= static_cast<uint32_t>(v[l] == value) << l;
  return mask;
}
inline vec drop_minus_inf(vec s) { return s == -INF ? splat(NAN) : s; }
inline vec lower_of(vec s, vec lowest) { return s < lowest ? s : lowest; }
inline void mark_lower(vec lower, vec lowest, int32_t number, ivec& best_number) {
  best_number = lower < lowest ? splat_index(number) : best_number;
}
inline int first_equal(const float* s, int n, float value) {
  for (int l = 0; l < n; ++l)
    if (s[l] == value) return l;
  return -1;
}
#endif

// Scalar twins of the vector operations, so that one expression serves both (fma: fused, as the
// vector FMA, so that both give the same bits).
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
inline vec splat_like(float v, vec) { return splat(v); }
inline float splat_like(float v, float) { return v; }

// The smallest of n values (a multiple of W), NaN left out (INF when all are NaN).
inline float row_min(const float* s, int n) {
  vec m = splat(std::numeric_limits<float>::infinity());
  for (int l = 0; l < n; l += W) m = min_keep_first(load(s + l), m);
  return horizontal_min(m);
}

// One step of the dot product: a token's operand (x scaled) times a vector of W codes' operands.
inline vec load_codes(const float* p) { return load(p); }
inline vec multiply_add(vec acc, float x, vec codes) { return fma(splat(x), codes, acc); }
typedef uint32_t bf16_pair;  // two bf16 values: dimension 2s in the low half, 2s + 1 in the high half
#ifdef __AVX512BF16__
constexpr bool BF16_PAIRS = true;  // this build multiplies bf16 pairs (vdpbf16ps)
inline __m512i load_codes(const bf16_pair* p) { return _mm512_loadu_si512(p); }
inline vec multiply_add(vec acc, bf16_pair x, __m512i codes) {
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(static_cast<int>(x)), (__m512bh)codes);
}
#else
constexpr bool BF16_PAIRS = false;
#endif
constexpr int CV = 2;     // code vectors per register tile
constexpr int SUB = 256;  // codes per sub-tile (score buffer row)

enum Precision { IEEE = 0, TF32 = 1, BF16 = 2, FP16 = 3 };  // positions in `fastvq.ops.common.PRECISIONS`

// A sum of fp64 terms in LANES independent chains (term d into lane d % LANES), added up in lane order
// at the end: the same bits for the same terms, and no chain of D dependent adds (~4 cycles a term: it
// was 16 % of a search's time when the codebook's norms were summed that way, at D = 256).
struct LaneSum {
  static constexpr int LANES = 8;
  double lanes[LANES] = {};
  void add(int64_t d, double term) { lanes[d % LANES] += term; }
  double total() const {
    double sum = 0.0;
    for (const double lane : lanes) sum += lane;
    return sum;
  }
};

// The bits of v rounded to bf16, nearest even (NaN: 0x7FC0, as c10::BFloat16), without a branch on NaN:
// the bf16 precision's rounding and the packing of bf16 pairs.
inline uint32_t bf16_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return std::isnan(v) ? 0x7FC0u : rounded;
}

// `fastvq.ops.common.round_operand` for one value of a precision other than IEEE.
inline float round_to_precision(float v, int precision) {
  switch (precision) {
    case TF32: {
      if (!std::isfinite(v)) return v;
      uint32_t bits;
      std::memcpy(&bits, &v, 4);
      bits = (bits + 0x1000u) & ~0x1FFFu;
      std::memcpy(&v, &bits, 4);
      return v;
    }
    case BF16: {
      const uint32_t bits = bf16_bits(v) << 16;
      std::memcpy(&v, &bits, 4);
      return v;
    }
    case FP16: return static_cast<float>(c10::Half(v));
    default: return v;
  }
}

// `fastvq.ops.common.round_operand` for one value; IEEE keeps it without a call (packing a codebook
// called the rounding per value: 80 % of the packing time at D = 256).
inline float round_operand(float v, int precision) { return precision == IEEE ? v : round_to_precision(v, precision); }

// Whether rounding a scalar_t value to `precision` keeps it: IEEE, or bf16 / fp16 values at a precision
// of as many mantissa bits or more (bf16 at bf16 or tf32, fp16 at fp16 or tf32); the callers then skip
// the rounding (a call per value: 14 % of a bf16 search at D = 256, K = 1024).
template <typename scalar_t>
constexpr bool rounding_keeps(int precision) {
  return precision == IEEE || (std::is_same_v<scalar_t, c10::BFloat16> && (precision == BF16 || precision == TF32)) ||
         (std::is_same_v<scalar_t, c10::Half> && (precision == FP16 || precision == TF32));
}

// Dot-product steps of D dimensions: D fp32 values, or ceil(D / 2) bf16 pairs.
template <typename T>
constexpr int64_t steps(int64_t D) { return std::is_same_v<T, float> ? D : (D + 1) / 2; }

// f(std::integral_constant<int, S>{}) for the short dot products (S = 2, 4, 8 or 16 steps), whose loop
// then unrolls fully (a runtime S costs a branch per step), else f(std::integral_constant<int, 0>{}).
template <typename F>
inline decltype(auto) with_fixed_steps(int64_t S, F&& f) {
  switch (S) {
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    case 16: return f(std::integral_constant<int, 16>{});
    default: return f(std::integral_constant<int, 0>{});
  }
}

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
    return bf16_bits(value(2 * s)) | bf16_bits(value(2 * s + 1)) << 16;
  }
}

// Scores of the TN tokens of `xs` (S steps of TN operands; FIXED_S steps when it is not 0, so that the
// dot product unrolls fully) against `n_vec` code vectors (a multiple of CV), CV code vectors at a time,
// each vector of W scores handed to take(code vector, token, scores), token by token, each token's in code order.
template <bool COSINE, int FIXED_S, typename T, typename F>
inline void for_each_score_vector(const T* xs, int64_t S, const T* codes, const float* bias, int n_vec, F&& take) {
  const int64_t n_steps = FIXED_S > 0 ? FIXED_S : S;
  for (int j = 0; j < n_vec; j += CV) {
    vec acc[TN][CV];
    for (int c = 0; c < CV; ++c) {
      const vec init = COSINE ? splat(0.0f) : load(bias + (j + c) * W);
      for (int t = 0; t < TN; ++t) acc[t][c] = init;
    }
    const T* code = codes + static_cast<int64_t>(j) * n_steps * W;
    const T* xd = xs;
#pragma GCC unroll 8
    for (int64_t s = 0; s < n_steps; ++s, xd += TN, code += W) {
      decltype(load_codes(code)) cv[CV];
      for (int c = 0; c < CV; ++c) cv[c] = load_codes(code + c * n_steps * W);
      for (int t = 0; t < TN; ++t)
        for (int c = 0; c < CV; ++c) acc[t][c] = multiply_add(acc[t][c], xd[t], cv[c]);
    }
    for (int t = 0; t < TN; ++t)  // token by token: a token's values between its CV calls are transient
      for (int c = 0; c < CV; ++c) take(j + c, t, COSINE ? mul(acc[t][c], load(bias + (j + c) * W)) : acc[t][c]);
  }
}

// Scores of the TN tokens of `xs` against `n_vec` code vectors (`for_each_score_vector`), and each
// token's minimum over them into `minima_out`. With STORE the scores go to `scores` (TN rows of SUB);
// without, they are not kept (storing them cost 22 % of the time at D = 8, where a sub-tile's dot
// products are short), and `score_row` recomputes a token's when its minimum matters. The minima live
// in a local array until the end: GCC keeps an array it was given by pointer in memory and stored it
// after every code vector (11 % of the time at D = 8, 19 % with bf16 pairs).
template <bool COSINE, bool STORE, typename T>
inline void sub_tile_minima(const T* xs, int64_t S, const T* codes, const float* bias, int n_vec, float* scores,
                            vec* minima_out) {
  vec minima[TN];
  for (int t = 0; t < TN; ++t) minima[t] = splat(INF);
  for_each_score_vector<COSINE, 0>(xs, S, codes, bias, n_vec, [&](int j, int t, vec s) {
    if (STORE) store(scores + t * SUB + j * W, s);
    minima[t] = min_keep_first(s, minima[t]);  // a NaN score never becomes the minimum
  });
  for (int t = 0; t < TN; ++t) minima_out[t] = minima[t];
}

// The TN tokens' running argmin (k = 1) over `n_vec` more code vectors, numbered from `number0`, kept
// per lane and per pair of code vectors (the CV = 2 vectors of a register tile): lane l of token t's row
// of `best` (TN rows of W, in memory between calls) holds the lowest score of its codes in lane l so
// far, the same row of `best_pair` the number of the first vector of the pair it came from. Per code
// vector this costs one min; per pair, one compare and one masked move. Codes come in increasing order
// and only a strictly lower score replaces (a tie keeps the lower code, the pair's first vector being
// resolved by `lane_argmin`); a NaN score never does, nor with SKIP_MINUS_INF does -inf. Without
// SKIP_MINUS_INF, returns false and leaves the rows as they were when a lane would hold -inf (the
// caller then calls again with it); else true.
template <bool COSINE, bool SKIP_MINUS_INF, int FIXED_S, typename T>
inline bool sub_tile_argmin(const T* xs, int64_t S, const T* codes, const float* bias, int n_vec, int32_t number0,
                            float* best, int32_t* best_pair) {
  static_assert(CV == 2, "a pair of code vectors per register tile");
  vec lowest[TN], lower;
  ivec pair[TN];
  for (int t = 0; t < TN; ++t) lowest[t] = load(best + t * W), pair[t] = load_index(best_pair + t * W);
  for_each_score_vector<COSINE, FIXED_S>(xs, S, codes, bias, n_vec, [&](int j, int t, vec s) {
    if (SKIP_MINUS_INF) s = drop_minus_inf(s);
    if (j % CV == 0) {
      lower = lower_of(s, lowest[t]);
      return;
    }
    lower = lower_of(s, lower);
    mark_lower(lower, lowest[t], number0 + j - 1, pair[t]);
    lowest[t] = lower;
  });
  if (!SKIP_MINUS_INF)
    for (int t = 0; t < TN; ++t)
      if (equal_mask(lowest[t], -INF)) return false;
  for (int t = 0; t < TN; ++t) store(best + t * W, lowest[t]), store_index(best_pair + t * W, pair[t]);
  return true;
}

// A token's argmin from its row of `sub_tile_argmin` (lane minima `lowest`, pair numbers `pair`): the
// lowest score m and the lowest code among the lanes that hold it, each lane's code in the first vector
// of its pair where `holds_m(vector number, lane)` (the token's score there equals m), else the second;
// -1 when m is INF.
template <typename F>
inline int64_t lane_argmin(vec lowest, const int32_t* pair, float& m, const F& holds_m) {
  m = horizontal_min(lowest);
  if (!(m < INF)) return -1;
  int64_t code = std::numeric_limits<int64_t>::max();
  uint32_t lanes = equal_mask(lowest, m);  // not empty
  do {  // usually one lane; no branch on which vector of the pair (a coin flip for the predictor)
    const int l = __builtin_ctz(lanes);
    const int64_t vector = pair[l] + static_cast<int64_t>(!holds_m(pair[l], l));
    code = std::min(code, vector * W + l);
    lanes &= lanes - 1;
  } while (lanes);
  return code;
}

// C scores at once (independent chains): out[c] = token x[c] (its S operands, TN apart) against the code
// vector at codes[c] (S steps of W), with its W terms at bias[c].
template <bool COSINE, int C, typename T>
inline void score_vectors(const T* const* x, int64_t S, const T* const* codes, const float* const* bias, vec* out) {
  vec acc[C];
  for (int c = 0; c < C; ++c) acc[c] = COSINE ? splat(0.0f) : load(bias[c]);
  for (int64_t s = 0; s < S; ++s)
    for (int c = 0; c < C; ++c) acc[c] = multiply_add(acc[c], x[c][s * TN], load_codes(codes[c] + s * W));
  for (int c = 0; c < C; ++c) out[c] = COSINE ? mul(acc[c], load(bias[c])) : acc[c];
}

// One token's scores against `n_vec` code vectors (a multiple of CV) into `scores`, bit for bit those of
// `sub_tile_minima` (the same operations in the same order), four code vectors at a time.
template <bool COSINE, typename T>
inline void score_row(const T* x, int64_t S, const T* codes, const float* bias, int n_vec, float* scores) {
  const auto score = [&](auto vectors, int j) {
    constexpr int C = decltype(vectors)::value;
    const T* xs[C];
    const T* code[C];
    const float* terms[C];
    for (int c = 0; c < C; ++c) xs[c] = x, code[c] = codes + static_cast<int64_t>(j + c) * S * W, terms[c] = bias + (j + c) * W;
    vec out[C];
    score_vectors<COSINE, C>(xs, S, code, terms, out);
    for (int c = 0; c < C; ++c) store(scores + (j + c) * W, out[c]);
  };
  int j = 0;
  for (; j + 4 <= n_vec; j += 4) score(std::integral_constant<int, 4>{}, j);
  for (; j < n_vec; j += CV) score(std::integral_constant<int, CV>{}, j);
}

// Insert `score` of code `index` into the list (k long, sorted by score then index; empty slots are
// INF / -1) unless it is not before the last entry: with codes taken in index order, a tie keeps the
// lower index, and in any order the list ends up the k least (score, index) pairs.
inline void insert(float* best, int64_t* best_index, int k, float score, int64_t index) {
  const auto before = [&](int slot) {
    return score < best[slot] || (score == best[slot] && index < best_index[slot]);
  };
  if (!before(k - 1)) return;
  int slot = k - 1;
  for (; slot > 0 && before(slot - 1); --slot) {
    best[slot] = best[slot - 1];
    best_index[slot] = best_index[slot - 1];
  }
  best[slot] = score;
  best_index[slot] = index;
}

}  // namespace fastvq_cpu
