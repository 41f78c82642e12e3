// Per-element logic of fastvq's CUDA kernels, shared by the device code and the host check.
//
// Everything here is a `__host__ __device__` inline function of plain floats and ints, so the same
// code runs inside the kernels (kernels/*.cu) and in the host harness (kernels/host_check.cpp) that
// CI executes against the reference (fastvq/ops/reference.py) without a GPU. Semantics:
//   - operands are rounded as `fastvq.ops.common.round_operand` rounds them (ieee, tf32 with ties
//     away from zero, bf16 / fp16 round to nearest even), then multiplied and summed in fp32;
//   - a code's score is `bias - 2 x.c` (l2, bias = |c|^2), `-(x.c) bias` (cosine, bias = 1/|c|) or
//     `bias - x.c` (dot, bias = 0), with bias from `fastvq.ops.common.code_bias` (NaN for a code with
//     a non-finite entry);
//   - a non-finite score never wins (it becomes +inf); candidates are ordered by (score, index), so
//     equal scores go to the lowest index whatever order they are met in;
//   - the distance of a chosen code is recomputed exactly in fp32; a token whose search found no
//     finite score, or whose distance is not finite, gets index -1 and distance NaN.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define FASTVQ_HD __host__ __device__ __forceinline__
#else
#define FASTVQ_HD inline
#endif
#ifdef __CUDA_ARCH__
#define FASTVQ_UNROLL _Pragma("unroll")
#else
#define FASTVQ_UNROLL  // host compilers unroll these short constant loops themselves
#endif

namespace fastvq {

// Same orders as fastvq.ops.common.PRECISIONS and METRICS.
enum Precision : int { kIeee = 0, kTf32 = 1, kBf16 = 2, kFp16 = 3 };
enum Metric : int { kL2 = 0, kCosine = 1, kDot = 2 };

constexpr float kCosineNormEps = 1e-12f;  // fastvq.ops.common.COSINE_NORM_EPS
constexpr int32_t kEmptySlot = INT32_MAX;  // index of an empty top-k slot (loses every tie)

FASTVQ_HD uint32_t float_bits(float v) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(v);
#else
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits;
#endif
}

FASTVQ_HD float bits_float(uint32_t bits) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
#endif
}

// Not NaN and not +-inf, from the bits (unaffected by fast-math flags).
FASTVQ_HD bool is_finite(float v) { return (float_bits(v) & 0x7F800000u) != 0x7F800000u; }

FASTVQ_HD float round_fp16(float v) {
  const uint32_t sign = float_bits(v) & 0x80000000u;
  const float a = bits_float(float_bits(v) & 0x7FFFFFFFu);
  if (!is_finite(v)) return v;
  if (a >= 65520.0f) return bits_float(sign | 0x7F800000u);  // past fp16's largest value: +-inf
  float r;
  if (a < 6.103515625e-05f) {  // fp16 subnormal: a multiple of 2^-24, nearest even (exact scaling)
    r = rintf(a * 16777216.0f) * 5.9604644775390625e-08f;
  } else {  // keep 10 mantissa bits, round to nearest even
    const uint32_t bits = float_bits(a);
    r = bits_float((bits + 0x0FFFu + ((bits >> 13) & 1u)) & ~0x1FFFu);
  }
  return bits_float(float_bits(r) | sign);
}

// `v` as the product of `precision` sees it (fastvq.ops.common.round_operand).
FASTVQ_HD float round_operand(float v, int precision) {
  const uint32_t bits = float_bits(v);
  switch (precision) {
    case kTf32:  // half a tf32 ulp added to the magnitude, 13 low bits dropped: ties away from zero
      return is_finite(v) ? bits_float((bits + 0x1000u) & ~0x1FFFu) : v;
    case kBf16:  // nearest even; overflow carries into the exponent and gives +-inf
      return is_finite(v) ? bits_float((bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u) : v;
    case kFp16:
      return round_fp16(v);
    default:
      return v;
  }
}

// Score that ranks codes as the distance does (lower is nearer); +inf when not finite.
FASTVQ_HD float rank_score(float dot, float bias, int metric) {
  const float score = metric == kCosine ? -dot * bias : (metric == kDot ? bias - dot : bias - 2.0f * dot);
  return is_finite(score) ? score : INFINITY;
}

// (score, index) order: the lower score, then the lower index.
FASTVQ_HD bool precedes(float score, int32_t index, float other_score, int32_t other_index) {
  return score < other_score || (score == other_score && index < other_index);
}

template <int KPAD>
FASTVQ_HD void clear_list(float (&score)[KPAD], int32_t (&index)[KPAD]) {
FASTVQ_UNROLL
  for (int j = 0; j < KPAD; ++j) {
    score[j] = INFINITY;
    index[j] = kEmptySlot;
  }
}

// Insert a candidate into a list sorted by (score, index), dropping the last entry. Unrolled with
// constant indices, so the list stays in registers.
template <int KPAD>
FASTVQ_HD void insert(float (&score)[KPAD], int32_t (&index)[KPAD], float new_score, int32_t new_index) {
  if (!precedes(new_score, new_index, score[KPAD - 1], index[KPAD - 1])) return;
FASTVQ_UNROLL
  for (int j = 0; j < KPAD; ++j) {
    if (precedes(new_score, new_index, score[j], index[j])) {
      const float s = score[j];
      const int32_t i = index[j];
      score[j] = new_score;
      index[j] = new_index;
      new_score = s;
      new_index = i;
    }
  }
}

// The code a list slot holds, or -1 when no code with a finite score reached it.
FASTVQ_HD int64_t slot_code(float score, int32_t index) { return score == INFINITY ? -1 : index; }

// Sums from which the exact fp32 distance of a (token, code) pair is finished: in fp64, where products
// and differences of fp32 values are exact, rounded once at the end (as every backend), so the
// distance is the fp32 value nearest the exact one at any D, also for dot and cosine, whose fp32 sums
// would drift by ~D 2^-24 of sum |x_d c_d|.
struct DistanceSums {
  double sq_diff = 0.0;  // l2: sum (x - c)^2
  double dot = 0.0;      // cosine: x.c, |x|^2, |c|^2; dot: x.c
  double x_sq = 0.0;
  double c_sq = 0.0;
};

FASTVQ_HD void accumulate(DistanceSums& sums, float x, float c, int metric) {
  const double xd = x, cd = c;
  if (metric == kL2) {
    const double diff = xd - cd;
    sums.sq_diff += diff * diff;
  } else {
    sums.dot += xd * cd;
    sums.x_sq += xd * xd;
    sums.c_sq += cd * cd;
  }
}

FASTVQ_HD void add(DistanceSums& sums, const DistanceSums& other) {
  sums.sq_diff += other.sq_diff;
  sums.dot += other.dot;
  sums.x_sq += other.x_sq;
  sums.c_sq += other.c_sq;
}

FASTVQ_HD double clamp_min_eps(double v) { return v < kCosineNormEps ? kCosineNormEps : v; }  // NaN stays NaN

// Squared L2 distance, 1 - cosine similarity with norms clamped at COSINE_NORM_EPS, or -x.c (dot).
FASTVQ_HD float finish_distance(const DistanceSums& sums, int metric) {
  if (metric == kL2) return static_cast<float>(sums.sq_diff);
  if (metric == kDot) return static_cast<float>(-sums.dot);
  return static_cast<float>(1.0 - sums.dot / (clamp_min_eps(sqrt(sums.x_sq)) * clamp_min_eps(sqrt(sums.c_sq))));
}

// fastvq.ops.common.mark_unassigned for one token: -1 / NaN when nothing finite was found.
FASTVQ_HD void mark_unassigned(int64_t& index, float& distance) {
  if (index < 0 || !is_finite(distance)) {
    index = -1;
    distance = NAN;
  }
}

// code_stats: a token counts when its index is in [0, K) and its mask (if any) is set.
FASTVQ_HD bool counted(int64_t index, int64_t n_codes, bool mask) { return mask && index >= 0 && index < n_codes; }

}  // namespace fastvq
