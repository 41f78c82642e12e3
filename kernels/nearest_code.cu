// Fused code search (nearest_code, topk_codes): score tiles and a running (score, index) list,
// never writing an N x K tensor.
//
// search_kernel: a block of 16 x 16 threads owns BLOCK_N tokens of one head and streams the codes of
// its split in tiles of 64 codes, D in chunks of 32 staged in shared memory (operands rounded to the
// precision on the way in). Thread (tx, ty) accumulates the fp32 products of TOKENS_PER_THREAD
// tokens with 4 codes, turns them into scores and keeps, per token, a sorted list of the KPAD best
// (score, index) pairs in registers; at the end the 16 threads of a token row merge their lists by
// warp shuffles. Ties go to the lowest index because candidates are ordered by (score, index),
// whatever order they arrive in. finalize_kernel (one warp per token) merges the splits' lists in
// split order and recomputes the exact fp32 distance of each chosen code.
#include "device.cuh"
#include "launchers.h"
#include "vq_tile.cuh"

namespace fastvq {
namespace {

constexpr int kThreads = 256;
constexpr int kThreadsX = 16;  // threads along the codes of a tile (a token row of lanes)
constexpr int kCodesPerThread = 4;
constexpr int kBlockK = kThreadsX * kCodesPerThread;
constexpr int kBlockD = 32;
constexpr int kFinalizeWarps = 8;

template <int KPAD>
struct SearchTile {
  // A longer list costs registers: fewer tokens per thread.
  static constexpr int kTokensPerThread = KPAD <= 2 ? 4 : (KPAD == 4 ? 2 : 1);
  static constexpr int kBlockN = (kThreads / kThreadsX) * kTokensPerThread;
};

// rows [row0, row0 + ROWS) x columns [d0, d0 + cols) of a (rows, D) matrix into tile[d][row],
// rounded to `precision`, zero for rows past row_end (columns past cols are left as they are: the
// products stop at cols, so a small D costs no padded work).
template <typename T, int ROWS, int PITCH>
__device__ __forceinline__ void stage_tile(float (&tile)[kBlockD][PITCH], const T* __restrict__ base,
                                           int64_t row0, int64_t row_end, int64_t d0, int cols,
                                           int64_t stride_row, int64_t stride_d, int precision) {
  for (int e = threadIdx.x; e < ROWS * cols; e += kThreads) {
    const int r = e / cols, d = e % cols;
    const int64_t row = row0 + r;
    float v = 0.0f;
    if (row < row_end) v = round_operand(to_float(base[row * stride_row + (d0 + d) * stride_d]), precision);
    tile[d][r] = v;
  }
}

__device__ __forceinline__ int chunk_columns(int64_t d0, int64_t dim) {
  return dim - d0 < kBlockD ? static_cast<int>(dim - d0) : kBlockD;
}

template <typename T, int KPAD>
__global__ void __launch_bounds__(kThreads) search_kernel(SearchArgs args, int64_t codes_per_split,
                                                          float* __restrict__ partial_score,
                                                          int32_t* __restrict__ partial_index) {
  constexpr int TM = SearchTile<KPAD>::kTokensPerThread;
  constexpr int BLOCK_N = SearchTile<KPAD>::kBlockN;
  __shared__ __align__(16) float x_tile[kBlockD][BLOCK_N + 4];
  __shared__ __align__(16) float c_tile[kBlockD][kBlockK + 4];

  const int tx = threadIdx.x % kThreadsX, ty = threadIdx.x / kThreadsX;
  const int64_t head = blockIdx.z, split = blockIdx.y, splits = gridDim.y;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BLOCK_N;
  const int64_t k_lo = split * codes_per_split;
  const int64_t k_hi = k_lo + codes_per_split < args.n_codes ? k_lo + codes_per_split : args.n_codes;
  const T* x = static_cast<const T*>(args.x) + head * args.x_stride_h;
  const T* codes = static_cast<const T*>(args.codes) + head * args.code_stride_h;
  const float* bias = args.bias + head * args.bias_stride_h;

  float best_score[TM][KPAD];
  int32_t best_index[TM][KPAD];
#pragma unroll
  for (int i = 0; i < TM; ++i) clear_list(best_score[i], best_index[i]);

  const bool x_resident = args.dim <= kBlockD;  // the token rows fit one chunk: stage them once
  if (x_resident) {
    stage_tile<T, BLOCK_N>(x_tile, x, n0, args.n_tokens, 0, chunk_columns(0, args.dim), args.x_stride_n,
                           args.x_stride_d, args.precision);
  }
  for (int64_t k0 = k_lo; k0 < k_hi; k0 += kBlockK) {
    float acc[TM][kCodesPerThread] = {};
    for (int64_t d0 = 0; d0 < args.dim; d0 += kBlockD) {
      const int cols = chunk_columns(d0, args.dim);
      if (!x_resident) {
        stage_tile<T, BLOCK_N>(x_tile, x, n0, args.n_tokens, d0, cols, args.x_stride_n, args.x_stride_d,
                               args.precision);
      }
      stage_tile<T, kBlockK>(c_tile, codes, k0, k_hi, d0, cols, args.code_stride_k, args.code_stride_d,
                             args.precision);
      __syncthreads();
#pragma unroll 8
      for (int d = 0; d < cols; ++d) {
        const float4 c = *reinterpret_cast<const float4*>(&c_tile[d][tx * kCodesPerThread]);
#pragma unroll
        for (int i = 0; i < TM; ++i) {
          const float xv = x_tile[d][ty * TM + i];
          acc[i][0] = fmaf(xv, c.x, acc[i][0]);
          acc[i][1] = fmaf(xv, c.y, acc[i][1]);
          acc[i][2] = fmaf(xv, c.z, acc[i][2]);
          acc[i][3] = fmaf(xv, c.w, acc[i][3]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < kCodesPerThread; ++j) {
      const int64_t code = k0 + tx * kCodesPerThread + j;
      if (code < k_hi) {
        const float b = bias[code];
#pragma unroll
        for (int i = 0; i < TM; ++i) {
          insert(best_score[i], best_index[i], rank_score(acc[i][j], b, args.metric), static_cast<int32_t>(code));
        }
      }
    }
  }

  // merge the lists of the 16 threads of each token row (lanes that differ in their low 4 bits)
#pragma unroll
  for (int offset = kThreadsX / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      float other_score[KPAD];
      int32_t other_index[KPAD];
#pragma unroll
      for (int j = 0; j < KPAD; ++j) {
        other_score[j] = __shfl_xor_sync(0xFFFFFFFFu, best_score[i][j], offset);
        other_index[j] = __shfl_xor_sync(0xFFFFFFFFu, best_index[i][j], offset);
      }
#pragma unroll
      for (int j = 0; j < KPAD; ++j) insert(best_score[i], best_index[i], other_score[j], other_index[j]);
    }
  }
  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const int64_t n = n0 + ty * TM + i;
      if (n < args.n_tokens) {
        const int64_t out = ((head * splits + split) * args.n_tokens + n) * KPAD;
#pragma unroll
        for (int j = 0; j < KPAD; ++j) {
          partial_score[out + j] = best_score[i][j];
          partial_index[out + j] = best_index[i][j];
        }
      }
    }
  }
}

template <typename T, int KPAD>
__global__ void __launch_bounds__(kFinalizeWarps * 32) finalize_kernel(SearchArgs args, int64_t splits,
                                                                       const float* __restrict__ partial_score,
                                                                       const int32_t* __restrict__ partial_index,
                                                                       int64_t* __restrict__ indices,
                                                                       float* __restrict__ distances) {
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kFinalizeWarps + threadIdx.x / 32;
  const int64_t head = blockIdx.y;
  if (n >= args.n_tokens) return;  // the whole warp
  float best_score[KPAD];
  int32_t best_index[KPAD];
  clear_list(best_score, best_index);
  for (int64_t s = 0; s < splits; ++s) {
    const int64_t in = ((head * splits + s) * args.n_tokens + n) * KPAD;
#pragma unroll
    for (int j = 0; j < KPAD; ++j) insert(best_score, best_index, partial_score[in + j], partial_index[in + j]);
  }
  const T* x = static_cast<const T*>(args.x) + head * args.x_stride_h + n * args.x_stride_n;
  const T* codes = static_cast<const T*>(args.codes) + head * args.code_stride_h;
#pragma unroll
  for (int j = 0; j < KPAD; ++j) {
    if (j < args.k) {
      int64_t code = slot_code(best_score[j], best_index[j]);
      float distance = NAN;
      if (code >= 0) {
        DistanceSums sums;
        for (int64_t d = lane; d < args.dim; d += 32) {
          accumulate(sums, to_float(x[d * args.x_stride_d]),
                     to_float(codes[code * args.code_stride_k + d * args.code_stride_d]), args.metric);
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) {
          DistanceSums other;
          other.sq_diff = __shfl_xor_sync(0xFFFFFFFFu, sums.sq_diff, offset);
          other.dot = __shfl_xor_sync(0xFFFFFFFFu, sums.dot, offset);
          other.x_sq = __shfl_xor_sync(0xFFFFFFFFu, sums.x_sq, offset);
          other.c_sq = __shfl_xor_sync(0xFFFFFFFFu, sums.c_sq, offset);
          add(sums, other);
        }
        distance = finish_distance(sums, args.metric);
      }
      mark_unassigned(code, distance);
      if (lane == 0) {
        const int64_t out = (head * args.n_tokens + n) * args.k + j;
        indices[out] = code;
        distances[out] = distance;
      }
    }
  }
}

template <typename T, int KPAD>
cudaError_t launch_typed(const SearchArgs& args, int64_t codes_per_split, float* partial_score,
                         int32_t* partial_index, int64_t* indices, float* distances, cudaStream_t stream) {
  const int64_t splits = (args.n_codes + codes_per_split - 1) / codes_per_split;
  const int64_t token_blocks = (args.n_tokens + SearchTile<KPAD>::kBlockN - 1) / SearchTile<KPAD>::kBlockN;
  auto* search = search_kernel<T, KPAD>;
  FASTVQ_LAUNCH(search, dim3(static_cast<unsigned>(token_blocks), static_cast<unsigned>(splits),
                             static_cast<unsigned>(args.heads)),
                kThreads, stream, args, codes_per_split, partial_score, partial_index);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t finalize_blocks = (args.n_tokens + kFinalizeWarps - 1) / kFinalizeWarps;
  auto* finalize = finalize_kernel<T, KPAD>;
  FASTVQ_LAUNCH(finalize, dim3(static_cast<unsigned>(finalize_blocks), static_cast<unsigned>(args.heads)),
                kFinalizeWarps * 32, stream, args, splits, partial_score, partial_index, indices, distances);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_list_size(const SearchArgs& args, int64_t codes_per_split, float* partial_score,
                             int32_t* partial_index, int64_t* indices, float* distances, cudaStream_t stream) {
  switch (search_list_size(args.k)) {
    case 1:
      return launch_typed<T, 1>(args, codes_per_split, partial_score, partial_index, indices, distances, stream);
    case 2:
      return launch_typed<T, 2>(args, codes_per_split, partial_score, partial_index, indices, distances, stream);
    case 4:
      return launch_typed<T, 4>(args, codes_per_split, partial_score, partial_index, indices, distances, stream);
    case 8:
      return launch_typed<T, 8>(args, codes_per_split, partial_score, partial_index, indices, distances, stream);
    case 16:
      return launch_typed<T, 16>(args, codes_per_split, partial_score, partial_index, indices, distances, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

int block_tokens(int list_size) {
  switch (list_size) {
    case 1: return SearchTile<1>::kBlockN;
    case 2: return SearchTile<2>::kBlockN;
    case 4: return SearchTile<4>::kBlockN;
    case 8: return SearchTile<8>::kBlockN;
    default: return SearchTile<16>::kBlockN;
  }
}

}  // namespace

int search_list_size(int k) {
  int size = 1;
  while (size < k) size *= 2;
  return size;
}

int64_t search_codes_per_split(const SearchArgs& args, int target_blocks) {
  const int64_t tokens = block_tokens(search_list_size(args.k));
  const int64_t token_blocks = (args.n_tokens + tokens - 1) / tokens * args.heads;
  const int64_t code_tiles = (args.n_codes + kBlockK - 1) / kBlockK;
  int64_t splits = (target_blocks + token_blocks - 1) / token_blocks;
  splits = splits < 1 ? 1 : (splits > code_tiles ? code_tiles : splits);
  splits = splits > 65535 ? 65535 : splits;  // grid y limit
  return (code_tiles + splits - 1) / splits * kBlockK;
}

cudaError_t launch_search(const SearchArgs& args, int64_t codes_per_split, float* partial_score,
                          int32_t* partial_index, int64_t* indices, float* distances, cudaStream_t stream) {
  if (args.k < 1 || args.k > kMaxTopK || args.n_codes > INT32_MAX - 1 || args.heads > 65535 ||
      codes_per_split < 1) {
    return cudaErrorInvalidValue;
  }
  if (args.n_tokens == 0 || args.heads == 0) return cudaSuccess;
  switch (args.dtype) {
    case DType::kFloat32:
      return launch_list_size<float>(args, codes_per_split, partial_score, partial_index, indices, distances, stream);
    case DType::kFloat16:
      return launch_list_size<__half>(args, codes_per_split, partial_score, partial_index, indices, distances, stream);
    case DType::kBFloat16:
      return launch_list_size<__nv_bfloat16>(args, codes_per_split, partial_score, partial_index, indices, distances,
                                             stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastvq
