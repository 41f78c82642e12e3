// Launchers of fastvq's CUDA kernels: plain C++ over pointers, sizes, strides (in elements) and a
// stream, with no torch header, so that the .cu files compile with nvcc alone (CI checks them for
// sm_90 and sm_80 without a GPU). kernels/torch_glue.cpp checks tensors, allocates and calls these.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastvq {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kMaxTopK = 16;  // fastvq.ops.common.MAX_TOPK

// nearest_code / topk_codes on canonical shapes: x (H, N, D), codes (Hc, K, D) with Hc = H or a
// shared codebook (code_stride_h = 0), bias (Hc, K) fp32 from fastvq.ops.common.code_bias; metric
// l2, cosine or dot (maximum inner product).
struct SearchArgs {
  const void* x;
  const void* codes;  // same dtype as x
  const float* bias;
  DType dtype;
  int64_t heads, n_tokens, n_codes, dim;
  int64_t x_stride_h, x_stride_n, x_stride_d;
  int64_t code_stride_h, code_stride_k, code_stride_d;
  int64_t bias_stride_h;
  int metric;     // fastvq::Metric
  int precision;  // fastvq::Precision
  int k;          // 1 <= k <= min(kMaxTopK, K)
};

// Length of the per-token candidate list the search keeps for `k` (a power of two >= k).
int search_list_size(int k);

// Codes per split (a multiple of the code tile) so that about `target_blocks` blocks run.
int64_t search_codes_per_split(const SearchArgs& args, int target_blocks);

// Splits the codes into ceil(K / codes_per_split) ranges searched by separate blocks; each writes
// its sorted candidate list to partial_score / partial_index, (H, splits, N, list size), and a
// second kernel merges the lists (the (score, index) order makes the merge independent of the
// split) and recomputes the exact fp32 distance of each chosen code. indices (H, N, k) int64 and
// distances (H, N, k) fp32, contiguous; -1 / NaN past the codes with a finite score.
cudaError_t launch_search(const SearchArgs& args, int64_t codes_per_split, float* partial_score,
                          int32_t* partial_index, int64_t* indices, float* distances, cudaStream_t stream);

// code_stats on canonical shapes: x (H, N, D), indices (H, N) int64, mask (H, N) bytes or null.
struct CodeStatsArgs {
  const void* x;
  DType dtype;
  const int64_t* indices;
  const uint8_t* mask;
  int64_t heads, n_tokens, n_codes, dim;
  int64_t x_stride_h, x_stride_n, x_stride_d;
  int64_t index_stride_h, index_stride_n;
  int64_t mask_stride_h, mask_stride_n;
};

// Token splits (>= 1) so that about `target_blocks` blocks run.
int64_t code_stats_token_splits(const CodeStatsArgs& args, int target_blocks);

// counts (H, K) and sums (H, K, D) fp32, contiguous, fully written (no zeroing needed). Each code's
// sums are added in token order within a split and the splits' partial sums (partial_counts
// (H, S, K), partial_sums (H, S, K, D); unused when S = 1) in split order: bitwise the same every run.
cudaError_t launch_code_stats(const CodeStatsArgs& args, int64_t token_splits, float* partial_counts,
                              float* partial_sums, float* counts, float* sums, cudaStream_t stream);

}  // namespace fastvq
