// The codebook packed for the C++ CPU search (search.cpp): operands in the register tile's layout
// (tile.h), the per-code term of the score, and what the bf16 prefilter needs.

#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "tile.h"

namespace fastvq_cpu {

constexpr float COSINE_NORM_EPS = 1e-12f;   // `fastvq.ops.common.COSINE_NORM_EPS`
constexpr int L2 = 0, COSINE = 1, DOT = 2;  // positions in `fastvq.ops.common.METRICS`
constexpr float PREFILTER_LIMIT = 0x1p50f;  // |operands| the prefilter's error bound covers (no overflow below)

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// The codes a search walks: K rounded up to whole register tiles (CV vectors of W codes).
constexpr int64_t padded_codes(int64_t K) { return ceil_div(K, W * CV) * (W * CV); }

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

// Operands of type T for one head's codes: (K_pad / W, S, W), code vector by code vector, from rows
// of D fp32 values; padding codes (past K) are zero.
template <typename T>
inline void put_code_operands(T* head_ops, int64_t S, int64_t D, int64_t k, const float* row) {
  T* dst = head_ops + k / W * S * W + k % W;
  for (int64_t s = 0; s < S; ++s) dst[s * W] = row ? operand_step<T>(row, 1, D, s, 1.0f, IEEE) : T(0);
}

// The codebook (Hc, K, D), any float dtype and strides, packed by `pack_step` (steps of PACK_VECTORS
// code vectors, taken by every thread of a call):
// - `f32`: fp32 operands rounded to the precision, which rank the codes, except for precision bf16
//   with AVX512-BF16, where `bf16` (bf16 pairs) rank them;
// - with a prefilter (any other precision with AVX512-BF16): `bf16` holds those fp32 operands rounded
//   again to bf16, which rank the codes first; candidates are then scored from the fp32 codes, so the
//   fp32 operands are packed only when a block needs them (`f32_operands`);
// - `bias` (Hc, K_pad): `code_term`, NaN past K;
// - `norm` (Hc, K_pad): |c| (times 1 / |c| for cosine: 1 or less) of a valid code, else 0, and per
//   sub-tile of SUB codes `norm_bound`, `bias_bound` (Hc, sub-tiles), the largest |c| and |bias| (l2)
//   of its valid codes: what the prefilter's error bound needs;
// - `fp32`: the unrounded fp32 codes (Hc, K, D), the codebook's own data when it is fp32 and contiguous.
struct PackedCodes {
  static constexpr int64_t PACK_VECTORS = SUB / W;  // one sub-tile a step: a codebook of 1024 codes takes 4 threads
  static_assert(PACK_VECTORS % (SUB / W) == 0, "a packing step must cover whole sub-tiles");
  const at::Tensor& codebook;
  int metric, precision;
  int64_t heads_c, K, D, K_pad, sub_tiles;
  bool bf16_ranks, prefilter;
  std::unique_ptr<float[]> f32, bias, norm, norm_bound, bias_bound;
  std::unique_ptr<bf16_pair[]> bf16;
  std::vector<float> copy;
  const float* fp32;
  std::atomic<bool> prefilter_fits{true};  // every valid code's |entries| <= PREFILTER_LIMIT
  std::once_flag f32_packed;

  PackedCodes(const at::Tensor& codebook, int metric, int precision, bool use_prefilter)
      : codebook(codebook), metric(metric), precision(precision), heads_c(codebook.size(0)), K(codebook.size(1)),
        D(codebook.size(2)), K_pad(padded_codes(K)), sub_tiles(ceil_div(K_pad, SUB)),
        bf16_ranks(BF16_PAIRS && precision == BF16), prefilter(BF16_PAIRS && precision != BF16 && use_prefilter),
        bias(new float[heads_c * K_pad]), norm(new float[heads_c * K_pad]), norm_bound(new float[heads_c * sub_tiles]),
        bias_bound(new float[heads_c * sub_tiles]) {  // filled by pack_step
    if (!bf16_ranks && !prefilter) f32.reset(new float[heads_c * K_pad * D]);
    if (bf16_ranks || prefilter) bf16.reset(new bf16_pair[heads_c * K_pad * steps<bf16_pair>(D)]);
    const bool own = codebook.scalar_type() == at::kFloat && codebook.is_contiguous();
    if (!own) copy.resize(heads_c * K * D);
    fp32 = own ? codebook.data_ptr<float>() : copy.data();
  }
  int64_t pack_steps() const { return heads_c * ceil_div(K_pad / W, PACK_VECTORS); }

  // Codes of step `step` (one head's PACK_VECTORS code vectors).
  void pack_step(int64_t step) {
    const int64_t hc = step % heads_c, k0 = step / heads_c * PACK_VECTORS * W;
    const int64_t k_end = std::min(K_pad, k0 + PACK_VECTORS * W);
    float* norms = norm_bound.get() + hc * sub_tiles;
    float* biases = bias_bound.get() + hc * sub_tiles;
    std::fill(norms + k0 / SUB, norms + ceil_div(k_end, SUB), 0.0f);
    std::fill(biases + k0 / SUB, biases + ceil_div(k_end, SUB), 0.0f);
    std::vector<float> row(D);
    float largest = 0.0f;
    for_each_code(hc, k0, k_end, row.data(), !copy.empty(), [&](int64_t k, double sq) {
      const float term = code_term(sq, metric);
      bias[hc * K_pad + k] = term;
      const float* operands = k < K ? row.data() : nullptr;
      if (f32) put_code_operands(f32.get() + hc * K_pad * D, D, D, k, operands);
      if (bf16) put_code_operands(bf16.get() + hc * K_pad * steps<bf16_pair>(D), steps<bf16_pair>(D), D, k, operands);
      norm[hc * K_pad + k] = 0.0f;
      if (!std::isfinite(term)) return;  // never chosen: no bound needed
      const float code_norm = static_cast<float>(std::sqrt(sq) * (metric == COSINE ? -term : 1.0) * (1 + 0x1p-20));
      norm[hc * K_pad + k] = code_norm;
      norms[k / SUB] = std::max(norms[k / SUB], code_norm);
      biases[k / SUB] = std::max(biases[k / SUB], metric == L2 ? term : 0.0f);
      for (int64_t d = 0; d < D; ++d) largest = std::max(largest, std::abs(row[d]));
    });
    if (!(largest <= PREFILTER_LIMIT)) prefilter_fits = false;
  }

  // The fp32 operands, packed now if a prefilter left them out (once, by the first thread that asks).
  const float* f32_operands() {
    std::call_once(f32_packed, [&] {
      if (f32) return;
      std::unique_ptr<float[]> ops(new float[heads_c * K_pad * D]);
      std::vector<float> row(D);
      for (int64_t hc = 0; hc < heads_c; ++hc)
        for_each_code(hc, 0, K_pad, row.data(), false, [&](int64_t k, double) {
          put_code_operands(ops.get() + hc * K_pad * D, D, D, k, k < K ? row.data() : nullptr);
        });
      f32 = std::move(ops);
    });
    return f32.get();
  }

 private:
  // visit(k, |c|^2 summed in fp64, NaN past K) for codes k0 .. k_end of head hc, each rounded to the
  // precision into `row` first (and its fp32 values into `copy` when `copy_codes`).
  template <typename F>
  void for_each_code(int64_t hc, int64_t k0, int64_t k_end, float* row, bool copy_codes, const F& visit) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, codebook.scalar_type(), "fastvq_cpu_pack", [&] {
      const scalar_t* head = codebook.data_ptr<scalar_t>() + hc * codebook.stride(0);
      const int64_t s_k = codebook.stride(1), s_d = codebook.stride(2);
      const int rounding = rounding_keeps<scalar_t>(precision) ? IEEE : precision;
      for (int64_t k = k0; k < k_end; ++k) {
        if (k >= K) {
          visit(k, NAN);
          continue;
        }
        LaneSum sq;
        for (int64_t d = 0; d < D; ++d) {
          const float value = static_cast<float>(head[k * s_k + d * s_d]);
          if (copy_codes) copy[(hc * K + k) * D + d] = value;
          row[d] = round_operand(value, rounding);
          sq.add(d, static_cast<double>(row[d]) * row[d]);
        }
        visit(k, sq.total());
      }
    });
  }
};

}  // namespace fastvq_cpu
