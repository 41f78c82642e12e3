// Host build of the CUDA kernels' per-element logic (vq_tile.cuh), with a C ABI for ctypes.
//
// CI has no GPU, so tests/test_cuda_host_check.py compiles this file with the host C++ compiler
// and compares its answers with fastvq.ops.reference: rounding of operands, scores, the (score,
// index) order and top-k insertion, the merge of code splits, the exact distance and the
// non-finite rules are the same functions the kernels call; only the thread mapping differs.
// Inputs are contiguous fp32 (fp16/bf16 tensors converted exactly by the caller).
#include <cstdint>
#include <algorithm>
#include <vector>

#include "vq_tile.cuh"

namespace {

constexpr int kList = 16;  // fastvq.ops.common.MAX_TOPK: the first k of the 16 best are the k best

}  // namespace

extern "C" {

// out[i] = round_operand(in[i], precision).
void fastvq_host_round_operand(const float* in, float* out, int64_t n, int precision) {
  for (int64_t i = 0; i < n; ++i) out[i] = fastvq::round_operand(in[i], precision);
}

// The search of kernels/nearest_code.cu: x (H, N, D), codes (Hc, K, D), bias (Hc, K) ->
// indices / distances (H, N, k), with the codes split into ranges of codes_per_split whose lists
// are merged in split order.
void fastvq_host_search(const float* x, const float* codes, const float* bias, int64_t heads, int64_t code_heads,
                        int64_t n_tokens, int64_t n_codes, int64_t dim, int metric, int precision, int k,
                        int64_t codes_per_split, int64_t* indices, float* distances) {
  std::vector<float> row(dim);
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t hc = code_heads == 1 ? 0 : h;
    for (int64_t n = 0; n < n_tokens; ++n) {
      const float* token = x + (h * n_tokens + n) * dim;
      for (int64_t d = 0; d < dim; ++d) row[d] = fastvq::round_operand(token[d], precision);
      float merged_score[kList];
      int32_t merged_index[kList];
      fastvq::clear_list(merged_score, merged_index);
      for (int64_t k_lo = 0; k_lo < n_codes; k_lo += codes_per_split) {
        float score[kList];
        int32_t index[kList];
        fastvq::clear_list(score, index);
        for (int64_t c = k_lo; c < n_codes && c < k_lo + codes_per_split; ++c) {
          const float* code = codes + (hc * n_codes + c) * dim;
          float dot = 0.0f;
          for (int64_t d = 0; d < dim; ++d) dot = fmaf(row[d], fastvq::round_operand(code[d], precision), dot);
          fastvq::insert(score, index, fastvq::rank_score(dot, bias[hc * n_codes + c], metric),
                         static_cast<int32_t>(c));
        }
        for (int j = 0; j < kList; ++j) fastvq::insert(merged_score, merged_index, score[j], index[j]);
      }
      for (int j = 0; j < k; ++j) {
        int64_t chosen = fastvq::slot_code(merged_score[j], merged_index[j]);
        float distance = NAN;
        if (chosen >= 0) {
          fastvq::DistanceSums sums;
          const float* code = codes + (hc * n_codes + chosen) * dim;
          for (int64_t d = 0; d < dim; ++d) fastvq::accumulate(sums, token[d], code[d], metric);
          distance = fastvq::finish_distance(sums, metric);
        }
        fastvq::mark_unassigned(chosen, distance);
        indices[(h * n_tokens + n) * k + j] = chosen;
        distances[(h * n_tokens + n) * k + j] = distance;
      }
    }
  }
}

// The per-code sums of kernels/code_stats.cu: x (H, N, D), indices (H, N), mask (H, N) bytes or
// null -> counts (H, K), sums (H, K, D); token order within each of `splits` ranges, then split order.
void fastvq_host_code_stats(const float* x, const int64_t* indices, const uint8_t* mask, int64_t heads,
                            int64_t n_tokens, int64_t n_codes, int64_t dim, int64_t splits, float* counts,
                            float* sums) {
  const int64_t per_split = (n_tokens + splits - 1) / splits;
  std::vector<float> part_counts(n_codes), part_sums(n_codes * dim);
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t c = 0; c < n_codes; ++c) counts[h * n_codes + c] = 0.0f;
    for (int64_t e = 0; e < n_codes * dim; ++e) sums[h * n_codes * dim + e] = 0.0f;
    for (int64_t t_lo = 0; t_lo < n_tokens; t_lo += per_split) {
      std::fill(part_counts.begin(), part_counts.end(), 0.0f);
      std::fill(part_sums.begin(), part_sums.end(), 0.0f);
      for (int64_t n = t_lo; n < n_tokens && n < t_lo + per_split; ++n) {
        const int64_t index = indices[h * n_tokens + n];
        if (!fastvq::counted(index, n_codes, mask == nullptr || mask[h * n_tokens + n] != 0)) continue;
        part_counts[index] += 1.0f;
        for (int64_t d = 0; d < dim; ++d) part_sums[index * dim + d] += x[(h * n_tokens + n) * dim + d];
      }
      for (int64_t c = 0; c < n_codes; ++c) counts[h * n_codes + c] += part_counts[c];
      for (int64_t e = 0; e < n_codes * dim; ++e) sums[h * n_codes * dim + e] += part_sums[e];
    }
  }
}

}  // extern "C"
