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

constexpr int64_t kCodeStatsChunk = 256;  // fastvq.ops.triton.code_stats.CHUNK: part of the result's bits

// code_stats as a sorted segmented reduction (kernels/code_stats.cu), in three steps; the glue sorts
// and takes a prefix sum with torch between them. Bitwise equal to the Triton backend's result.
// 1. keys (H N) int64: h K + index of each counted token (index in [0, K), mask set), H K for the others.
cudaError_t launch_code_stats_keys(const CodeStatsArgs& args, int64_t* keys, cudaStream_t stream);

// 2. After a stable sort of the keys (sorted_keys, and order: the flat token h N + n of each):
// run_start / run_end (H K), zeroed by the caller, get each code's range of the sorted tokens;
// counts (H, K) and sums (H, K, D) fp32, contiguous, are written for every code except the sums of
// runs longer than kCodeStatsChunk tokens, whose chunk counts go to run_chunks (H K) (0 for the others).
cudaError_t launch_code_stats_runs(const CodeStatsArgs& args, const int64_t* sorted_keys, const int64_t* order,
                                   int64_t* run_start, int64_t* run_end, int64_t* run_chunks, float* counts,
                                   float* sums, cudaStream_t stream);

// Rows of `partial` that step 3 may use: at least the number of chunks of all longer runs.
int64_t code_stats_max_chunks(const CodeStatsArgs& args);

// 3. After chunk_end = the inclusive prefix sum of run_chunks: the sums of the longer runs, each
// chunk's rows added in token order into partial (code_stats_max_chunks, D) fp32, then each run's
// chunk sums in chunk order into sums.
cudaError_t launch_code_stats_long_runs(const CodeStatsArgs& args, const int64_t* order, const int64_t* run_start,
                                        const int64_t* run_end, const int64_t* run_chunks, const int64_t* chunk_end,
                                        float* partial, float* sums, cudaStream_t stream);

}  // namespace fastvq
