// Per-code counts and sums (EMA statistics, k-means, codebook gradient), deterministic and sort-free.
//
// code_stats_kernel: a block of 8 warps owns 256 codes (32 per warp) and 32 columns of D, for the
// tokens of one split of one head. The block stages 256 token indices at a time in shared memory;
// every warp scans them in token order, finds the tokens of its own codes with a ballot, and adds
// those rows into its shared-memory accumulators (lane = column). A code's sum is therefore added
// in token order by one warp, with no atomics: bitwise the same result every run. When the blocks
// alone cannot fill the GPU (few codes, many tokens) the tokens are split; each split writes its
// partial sums and sum_splits_kernel adds them in split order.
#include <tuple>

#include "device.cuh"
#include "launchers.h"
#include "vq_tile.cuh"

namespace fastvq {
namespace {

constexpr int kWarps = 8;
constexpr int kCodesPerWarp = 32;
constexpr int kBlockCodes = kWarps * kCodesPerWarp;
constexpr int kColumns = 32;
constexpr int kTokenChunk = kWarps * 32;
constexpr int64_t kMinTokensPerSplit = 4096;

// counts (H * S, K) and sums (H * S, K, D): the outputs, or the splits' partials.
template <typename T>
__global__ void __launch_bounds__(kWarps * 32) code_stats_kernel(CodeStatsArgs args, int64_t splits,
                                                                 float* __restrict__ counts,
                                                                 float* __restrict__ sums) {
  __shared__ float acc[kWarps][kCodesPerWarp][kColumns];
  __shared__ float count[kWarps][kCodesPerWarp];
  __shared__ int32_t chunk_code[kTokenChunk];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t head = blockIdx.z / splits, split = blockIdx.z % splits;
  const int64_t code0 = static_cast<int64_t>(blockIdx.x) * kBlockCodes + warp * kCodesPerWarp;
  const int64_t column = static_cast<int64_t>(blockIdx.y) * kColumns + lane;
  const int64_t per_split = (args.n_tokens + splits - 1) / splits;
  const int64_t t_lo = split * per_split;
  const int64_t t_hi = t_lo + per_split < args.n_tokens ? t_lo + per_split : args.n_tokens;
  const T* x = static_cast<const T*>(args.x) + head * args.x_stride_h;

  for (int c = 0; c < kCodesPerWarp; ++c) acc[warp][c][lane] = 0.0f;
  count[warp][lane] = 0.0f;
  for (int64_t t0 = t_lo; t0 < t_hi; t0 += kTokenChunk) {
    __syncthreads();  // the previous chunk is scanned by every warp
    const int64_t token = t0 + threadIdx.x;
    int32_t code = -1;
    if (token < t_hi) {
      const int64_t index = args.indices[head * args.index_stride_h + token * args.index_stride_n];
      const bool mask = args.mask == nullptr || args.mask[head * args.mask_stride_h + token * args.mask_stride_n] != 0;
      if (counted(index, args.n_codes, mask)) code = static_cast<int32_t>(index);
    }
    chunk_code[threadIdx.x] = code;
    __syncthreads();
    for (int j = 0; j < kTokenChunk; j += 32) {
      const int64_t local = static_cast<int64_t>(chunk_code[j + lane]) - code0;
      const bool mine = chunk_code[j + lane] >= 0 && local >= 0 && local < kCodesPerWarp;
      unsigned hits = __ballot_sync(0xFFFFFFFFu, mine);
      while (hits) {  // in token order
        const int src = __ffs(hits) - 1;
        hits &= hits - 1;
        const int c = __shfl_sync(0xFFFFFFFFu, static_cast<int>(local), src);
        if (column < args.dim) acc[warp][c][lane] += to_float(x[(t0 + j + src) * args.x_stride_n + column * args.x_stride_d]);
        if (lane == 0) count[warp][c] += 1.0f;
      }
    }
  }
  __syncwarp();
  const int64_t out = blockIdx.z;  // head * splits + split
  for (int c = 0; c < kCodesPerWarp; ++c) {
    const int64_t code = code0 + c;
    if (code < args.n_codes && column < args.dim) sums[(out * args.n_codes + code) * args.dim + column] = acc[warp][c][lane];
  }
  if (blockIdx.y == 0 && code0 + lane < args.n_codes) counts[out * args.n_codes + code0 + lane] = count[warp][lane];
}

// out[h, e] = sum over s in order of partial[h, s, e], for e < per_head.
__global__ void sum_splits_kernel(const float* __restrict__ partial, float* __restrict__ out, int64_t splits,
                                  int64_t per_head, int64_t total) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  const int64_t head = e / per_head, rest = e % per_head;
  float sum = 0.0f;
  for (int64_t s = 0; s < splits; ++s) sum += partial[(head * splits + s) * per_head + rest];
  out[e] = sum;
}

template <typename T>
cudaError_t launch_typed(const CodeStatsArgs& args, int64_t splits, float* partial_counts, float* partial_sums,
                         float* counts, float* sums, cudaStream_t stream) {
  const int64_t code_blocks = (args.n_codes + kBlockCodes - 1) / kBlockCodes;
  const int64_t column_blocks = args.dim > 0 ? (args.dim + kColumns - 1) / kColumns : 1;  // D = 0 still counts
  float* kernel_counts = splits > 1 ? partial_counts : counts;
  float* kernel_sums = splits > 1 ? partial_sums : sums;
  auto* stats = code_stats_kernel<T>;
  FASTVQ_LAUNCH(stats, dim3(static_cast<unsigned>(code_blocks), static_cast<unsigned>(column_blocks),
                            static_cast<unsigned>(args.heads * splits)),
                kWarps * 32, stream, args, splits, kernel_counts, kernel_sums);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || splits == 1) return err;
  const int threads = 256;
  for (const auto& [partial, result, per_head] : {std::make_tuple(partial_counts, counts, args.n_codes),
                                                   std::make_tuple(partial_sums, sums, args.n_codes * args.dim)}) {
    const int64_t total = args.heads * per_head;
    if (total == 0) continue;
    auto* sum_splits = sum_splits_kernel;
    FASTVQ_LAUNCH(sum_splits, dim3(static_cast<unsigned>((total + threads - 1) / threads)), threads, stream, partial,
                  result, splits, per_head, total);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

int64_t code_stats_token_splits(const CodeStatsArgs& args, int target_blocks) {
  const int64_t code_blocks = (args.n_codes + kBlockCodes - 1) / kBlockCodes;
  const int64_t column_blocks = args.dim > 0 ? (args.dim + kColumns - 1) / kColumns : 1;
  const int64_t blocks = code_blocks * column_blocks * args.heads;
  int64_t splits = (target_blocks + blocks - 1) / blocks;
  const int64_t most = (args.n_tokens + kMinTokensPerSplit - 1) / kMinTokensPerSplit;
  splits = splits > most ? most : splits;
  splits = splits * args.heads > 65535 ? 65535 / args.heads : splits;  // grid z limit
  return splits < 1 ? 1 : splits;
}

cudaError_t launch_code_stats(const CodeStatsArgs& args, int64_t token_splits, float* partial_counts,
                              float* partial_sums, float* counts, float* sums, cudaStream_t stream) {
  if (token_splits < 1 || args.heads * token_splits > 65535 || args.n_codes > INT32_MAX - 1) {
    return cudaErrorInvalidValue;
  }
  if (args.heads == 0) return cudaSuccess;
  switch (args.dtype) {
    case DType::kFloat32:
      return launch_typed<float>(args, token_splits, partial_counts, partial_sums, counts, sums, stream);
    case DType::kFloat16:
      return launch_typed<__half>(args, token_splits, partial_counts, partial_sums, counts, sums, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(args, token_splits, partial_counts, partial_sums, counts, sums, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastvq
