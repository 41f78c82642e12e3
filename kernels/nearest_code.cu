// Fused code search (nearest_code, topk_codes): score tiles and a running (score, index) list,
// never writing an N x K tensor.
//
// Two search kernels share everything but the product (one rule picks them: uses_tensor_cores):
// - search_kernel (precision ieee): a block of 16 x 16 threads owns BLOCK_N tokens of one head and
//   streams the codes of its split in tiles of 64 codes, D in chunks of 32 staged in shared memory.
//   Thread (tx, ty) accumulates the exact fp32 products of TOKENS_PER_THREAD tokens with 4 codes on
//   CUDA cores (FMAs) and ranks them in registers.
// - tensor_core_search_kernel (tf32, bf16, fp16; WMMA, sm_80+): a block of 8 warps owns 128 tokens
//   and streams the same 64-code tiles; D chunks of 32 are staged already rounded to the precision
//   (bf16 / fp16 as 16-bit values, tf32 as floats with the low 13 bits zero), each warp multiplies
//   its 32 tokens x 32 codes (2 x 2 fragments of 16 x 16, fp32 accumulators) and stores them to a
//   shared score tile, which the block then ranks: 2 threads per token, 32 codes each.
// Both keep, per token, a sorted list of the KPAD best (score, index) pairs in registers (ranked by
// rank_codes) and merge the lists of a token's threads by warp shuffles (merge_and_store). Ties go
// to the lowest index because candidates are ordered by (score, index), whatever order they arrive
// in. finalize_kernel (one warp per token) merges the splits' lists in split order and recomputes the
// exact fp32 distance of each chosen code.
#include "device.cuh"
#include "launchers.h"
#include "vq_tile.cuh"

#include <mma.h>

// WMMA tf32 and bf16 fragments need sm_80+: a device pass for an older GPU compiles the tensor-core
// kernel as a stub that launch_typed never starts there (uses_tensor_cores asks the GPU).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define FASTVQ_WMMA 1
#else
#define FASTVQ_WMMA 0
#endif

namespace fastvq {
namespace {

constexpr int kThreads = 256;
constexpr int kThreadsX = 16;  // threads along the codes of a tile (a token row of lanes)
constexpr int kCodesPerThread = 4;
constexpr int kBlockK = kThreadsX * kCodesPerThread;
constexpr int kBlockD = 32;
constexpr int kFinalizeWarps = 8;

// tensor_core_search_kernel: 8 warps as 4 (tokens) x 2 (codes), each owning 32 x 32 scores.
constexpr int kTcBlockN = 128;
#if FASTVQ_WMMA
constexpr int kTcWarpTile = 32;
constexpr int kTcWarpsK = kBlockK / kTcWarpTile;
constexpr int kTcThreadsPerToken = kThreads / kTcBlockN;
constexpr int kTcCodesPerThread = kBlockK / kTcThreadsPerToken;
constexpr int kScorePitch = kBlockK + 4;  // floats per score-tile row (WMMA: a multiple of 4)
#endif

template <int KPAD>
struct SearchTile {
  // A longer list costs registers: fewer tokens per thread.
  static constexpr int kTokensPerThread = KPAD <= 2 ? 4 : (KPAD == 4 ? 2 : 1);
  static constexpr int kBlockN = (kThreads / kThreadsX) * kTokensPerThread;
};

// rows [row0, row0 + ROWS) x columns [d0, d0 + cols) of a (rows, D) matrix, rounded to `precision`,
// into tile[r * row_pitch + d * d_pitch] as S; zero for rows past row_end and for the columns
// [cols, padded_cols) (columns past padded_cols are left as they are). Lane = column of a kBlockD
// chunk and a constant trip count: no integer division, and 4 loads in flight per thread.
template <typename T, typename S, int ROWS>
__device__ __forceinline__ void stage_tile(S* tile, int row_pitch, int d_pitch, const T* __restrict__ base,
                                           int64_t row0, int64_t row_end, int64_t d0, int cols, int padded_cols,
                                           int64_t stride_row, int64_t stride_d, int precision) {
  static_assert(kThreads % kBlockD == 0 && ROWS % (kThreads / kBlockD) == 0, "whole rows per pass");
  constexpr int kRowsPerPass = kThreads / kBlockD;
  const int d = threadIdx.x % kBlockD;
  if (d >= padded_cols) return;
#pragma unroll 4
  for (int r = threadIdx.x / kBlockD; r < ROWS; r += kRowsPerPass) {
    const int64_t row = row0 + r;
    float v = 0.0f;
    if (row < row_end && d < cols) v = round_operand(to_float(base[row * stride_row + (d0 + d) * stride_d]), precision);
    store_operand(tile[r * row_pitch + d * d_pitch], v);
  }
}

__device__ __forceinline__ int chunk_columns(int64_t d0, int64_t dim) {
  return dim - d0 < kBlockD ? static_cast<int>(dim - d0) : kBlockD;
}

// What one block of either search kernel searches: tokens [n0, n0 + block_n) of `head` against the
// codes [k_lo, k_hi) of its split (blockIdx: x token block, y split, z head).
template <typename T>
struct BlockRange {
  int64_t head, split, splits, n0, k_lo, k_hi;
  const T* x;
  const T* codes;
  const float* bias;
};

template <typename T>
__device__ __forceinline__ BlockRange<T> block_range(const SearchArgs& args, int64_t codes_per_split, int block_n) {
  BlockRange<T> r;
  r.head = blockIdx.z;
  r.split = blockIdx.y;
  r.splits = gridDim.y;
  r.n0 = static_cast<int64_t>(blockIdx.x) * block_n;
  r.k_lo = r.split * codes_per_split;
  r.k_hi = r.k_lo + codes_per_split < args.n_codes ? r.k_lo + codes_per_split : args.n_codes;
  r.x = static_cast<const T*>(args.x) + r.head * args.x_stride_h;
  r.codes = static_cast<const T*>(args.codes) + r.head * args.code_stride_h;
  r.bias = args.bias + r.head * args.bias_stride_h;
  return r;
}

// The epilogue of a code tile: inserts the codes code0 + j * step (j < CODES, those below k_hi) into
// the lists of a thread's TM tokens; dot(i, j) is the fp32 product of token i with code j.
template <int TM, int KPAD, int CODES, typename Dot>
__device__ __forceinline__ void rank_codes(float (&best_score)[TM][KPAD], int32_t (&best_index)[TM][KPAD],
                                           int64_t code0, int step, int64_t k_hi, const float* __restrict__ bias,
                                           int metric, Dot dot) {
#pragma unroll 4
  for (int j = 0; j < CODES; ++j) {
    const int64_t code = code0 + static_cast<int64_t>(j) * step;
    if (code < k_hi) {
      const float b = bias[code];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        insert(best_score[i], best_index[i], rank_score(dot(i, j), b, metric), static_cast<int32_t>(code));
      }
    }
  }
}

// The LANES threads of a token row (consecutive lanes of a warp; `lane` is the position in the row)
// merge their lists by shuffles; the row's first thread writes the lists of tokens token0 + i
// (i < TM) to the block's split of partial_score / partial_index, (H, splits, N, KPAD).
template <int TM, int KPAD, int LANES, typename T>
__device__ __forceinline__ void merge_and_store(float (&best_score)[TM][KPAD], int32_t (&best_index)[TM][KPAD],
                                                int lane, int64_t token0, const SearchArgs& args,
                                                const BlockRange<T>& r, float* __restrict__ partial_score,
                                                int32_t* __restrict__ partial_index) {
#pragma unroll
  for (int offset = LANES / 2; offset > 0; offset /= 2) {
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
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const int64_t n = token0 + i;
      if (n < args.n_tokens) {
        const int64_t out = ((r.head * r.splits + r.split) * args.n_tokens + n) * KPAD;
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
__global__ void __launch_bounds__(kThreads) search_kernel(SearchArgs args, int64_t codes_per_split,
                                                          float* __restrict__ partial_score,
                                                          int32_t* __restrict__ partial_index) {
  constexpr int TM = SearchTile<KPAD>::kTokensPerThread;
  constexpr int BLOCK_N = SearchTile<KPAD>::kBlockN;
  constexpr int X_PITCH = BLOCK_N + 4, C_PITCH = kBlockK + 4;
  __shared__ __align__(16) float x_tile[kBlockD][X_PITCH];
  __shared__ __align__(16) float c_tile[kBlockD][C_PITCH];

  const int tx = threadIdx.x % kThreadsX, ty = threadIdx.x / kThreadsX;
  const BlockRange<T> r = block_range<T>(args, codes_per_split, BLOCK_N);

  float best_score[TM][KPAD];
  int32_t best_index[TM][KPAD];
#pragma unroll
  for (int i = 0; i < TM; ++i) clear_list(best_score[i], best_index[i]);

  const bool x_resident = args.dim <= kBlockD;  // the token rows fit one chunk: stage them once
  if (x_resident) {
    const int cols = chunk_columns(0, args.dim);
    stage_tile<T, float, BLOCK_N>(&x_tile[0][0], 1, X_PITCH, r.x, r.n0, args.n_tokens, 0, cols, cols,
                                  args.x_stride_n, args.x_stride_d, args.precision);
  }
  for (int64_t k0 = r.k_lo; k0 < r.k_hi; k0 += kBlockK) {
    float acc[TM][kCodesPerThread] = {};
    for (int64_t d0 = 0; d0 < args.dim; d0 += kBlockD) {
      const int cols = chunk_columns(d0, args.dim);
      if (!x_resident) {
        stage_tile<T, float, BLOCK_N>(&x_tile[0][0], 1, X_PITCH, r.x, r.n0, args.n_tokens, d0, cols, cols,
                                      args.x_stride_n, args.x_stride_d, args.precision);
      }
      stage_tile<T, float, kBlockK>(&c_tile[0][0], 1, C_PITCH, r.codes, k0, r.k_hi, d0, cols, cols,
                                    args.code_stride_k, args.code_stride_d, args.precision);
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
    rank_codes<TM, KPAD, kCodesPerThread>(best_score, best_index, k0 + tx * kCodesPerThread, 1, r.k_hi, r.bias,
                                          args.metric, [&](int i, int j) { return acc[i][j]; });
  }
  // the 16 threads of a token row are the lanes that differ in their low 4 bits
  merge_and_store<TM, KPAD, kThreadsX>(best_score, best_index, tx, r.n0 + ty * TM, args, r, partial_score,
                                       partial_index);
}

// Operands of the tensor-core products, by precision: how a D chunk is stored in shared memory,
// the WMMA fragment element type, and the fragment depth (m16n16k16 for 16-bit, m16n16k8 for tf32).
#if FASTVQ_WMMA
struct Tf32Operand {
  using Stored = float;  // already rounded to tf32 (ties away), so the tensor core reads it exactly
  using Element = nvcuda::wmma::precision::tf32;
  static constexpr int kDepth = 8;
};
struct Bf16Operand {
  using Stored = __nv_bfloat16;
  using Element = __nv_bfloat16;
  static constexpr int kDepth = 16;
};
struct Fp16Operand {
  using Stored = __half;
  using Element = __half;
  static constexpr int kDepth = 16;
};
#else
struct Tf32Operand {};
struct Bf16Operand {};
struct Fp16Operand {};
#endif

template <typename T, typename Operand, int KPAD>
__global__ void __launch_bounds__(kThreads) tensor_core_search_kernel(SearchArgs args, int64_t codes_per_split,
                                                                      float* __restrict__ partial_score,
                                                                      int32_t* __restrict__ partial_index) {
#if FASTVQ_WMMA
  namespace wmma = nvcuda::wmma;
  using S = typename Operand::Stored;
  constexpr int DEPTH = Operand::kDepth;
  constexpr int STEPS = kBlockD / DEPTH;                  // fragment steps per D chunk
  constexpr int FRAGMENTS = kTcWarpTile / 16;             // per warp, along tokens and along codes
  constexpr int PITCH = kBlockD + 16 / sizeof(S);         // operand row: 16 bytes of padding (WMMA ldm)
  constexpr int OPERAND_BYTES = (kTcBlockN + kBlockK) * PITCH * sizeof(S);
  constexpr int SCORE_BYTES = kTcBlockN * kScorePitch * sizeof(float);
  // the operand tiles and the score tile are never live at once: one buffer
  __shared__ __align__(32) unsigned char smem[OPERAND_BYTES > SCORE_BYTES ? OPERAND_BYTES : SCORE_BYTES];
  S* const x_tile = reinterpret_cast<S*>(smem);          // [kTcBlockN][PITCH], token-major
  S* const c_tile = x_tile + kTcBlockN * PITCH;          // [kBlockK][PITCH], code-major (B column-major)
  float* const scores = reinterpret_cast<float*>(smem);  // [kTcBlockN][kScorePitch]

  const int warp = threadIdx.x / 32;
  const int warp_n = warp / kTcWarpsK * kTcWarpTile, warp_k = warp % kTcWarpsK * kTcWarpTile;
  const BlockRange<T> r = block_range<T>(args, codes_per_split, kTcBlockN);

  float best_score[1][KPAD];
  int32_t best_index[1][KPAD];
  clear_list(best_score[0], best_index[0]);

  wmma::fragment<wmma::matrix_a, 16, 16, DEPTH, typename Operand::Element, wmma::row_major> a[FRAGMENTS][STEPS];
  wmma::fragment<wmma::matrix_b, 16, 16, DEPTH, typename Operand::Element, wmma::col_major> b[FRAGMENTS];
  wmma::fragment<wmma::accumulator, 16, 16, DEPTH, float> acc[FRAGMENTS][FRAGMENTS];
  // x_tile's columns [cols, next multiple of DEPTH) are zero-padded; fragment steps past them are skipped
  const auto stage_x = [&](int64_t d0, int cols) {
    stage_tile<T, S, kTcBlockN>(x_tile, PITCH, 1, r.x, r.n0, args.n_tokens, d0, cols,
                                (cols + DEPTH - 1) / DEPTH * DEPTH, args.x_stride_n, args.x_stride_d, args.precision);
  };
  const auto load_x = [&](int cols) {
#pragma unroll
    for (int s = 0; s < STEPS; ++s) {
      if (s * DEPTH < cols) {
#pragma unroll
        for (int i = 0; i < FRAGMENTS; ++i) {
          wmma::load_matrix_sync(a[i][s], x_tile + (warp_n + i * 16) * PITCH + s * DEPTH, PITCH);
        }
      }
    }
  };

  const bool x_resident = args.dim <= kBlockD;  // the token rows fit one chunk: fragments loaded once
  if (x_resident) {
    stage_x(0, chunk_columns(0, args.dim));
    __syncthreads();
    load_x(chunk_columns(0, args.dim));  // before the first tile's scores overwrite x_tile (a barrier apart)
  }
  for (int64_t k0 = r.k_lo; k0 < r.k_hi; k0 += kBlockK) {
#pragma unroll
    for (int i = 0; i < FRAGMENTS; ++i) {
#pragma unroll
      for (int j = 0; j < FRAGMENTS; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    }
    for (int64_t d0 = 0; d0 < args.dim; d0 += kBlockD) {
      const int cols = chunk_columns(d0, args.dim);
      if (!x_resident) stage_x(d0, cols);
      stage_tile<T, S, kBlockK>(c_tile, PITCH, 1, r.codes, k0, r.k_hi, d0, cols, (cols + DEPTH - 1) / DEPTH * DEPTH,
                                args.code_stride_k, args.code_stride_d, args.precision);
      __syncthreads();
      if (!x_resident) load_x(cols);
#pragma unroll
      for (int s = 0; s < STEPS; ++s) {  // D ascending
        if (s * DEPTH < cols) {
#pragma unroll
          for (int j = 0; j < FRAGMENTS; ++j) {
            wmma::load_matrix_sync(b[j], c_tile + (warp_k + j * 16) * PITCH + s * DEPTH, PITCH);
          }
#pragma unroll
          for (int i = 0; i < FRAGMENTS; ++i) {
#pragma unroll
            for (int j = 0; j < FRAGMENTS; ++j) wmma::mma_sync(acc[i][j], a[i][s], b[j], acc[i][j]);
          }
        }
      }
      __syncthreads();  // the operand tiles are free: the next chunk, or the scores, may overwrite them
    }
#pragma unroll
    for (int i = 0; i < FRAGMENTS; ++i) {
#pragma unroll
      for (int j = 0; j < FRAGMENTS; ++j) {
        wmma::store_matrix_sync(scores + (warp_n + i * 16) * kScorePitch + warp_k + j * 16, acc[i][j], kScorePitch,
                                wmma::mem_row_major);
      }
    }
    __syncthreads();
    // thread t ranks token t / 2 against the codes of its parity (interleaved: fewer bank conflicts)
    const int row = threadIdx.x / kTcThreadsPerToken, lane_in_row = threadIdx.x % kTcThreadsPerToken;
    const float* score_row = scores + row * kScorePitch + lane_in_row;
    rank_codes<1, KPAD, kTcCodesPerThread>(best_score, best_index, k0 + lane_in_row, kTcThreadsPerToken, r.k_hi,
                                           r.bias, args.metric,
                                           [&](int, int j) { return score_row[j * kTcThreadsPerToken]; });
    __syncthreads();  // the next tile's operands overwrite the scores
  }
  merge_and_store<1, KPAD, kTcThreadsPerToken>(best_score, best_index, threadIdx.x % kTcThreadsPerToken,
                                               r.n0 + threadIdx.x / kTcThreadsPerToken, args, r, partial_score,
                                               partial_index);
#else
  (void)args, (void)codes_per_split, (void)partial_score, (void)partial_index;
  __trap();
#endif
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

// The one rule: precisions that round the operands (tf32, bf16, fp16) multiply on tensor cores when
// the current GPU has WMMA tf32 / bf16 (sm_80+); ieee, and older GPUs, use exact fp32 FMAs on CUDA
// cores (same ranking, within the same regret bound).
bool uses_tensor_cores(int precision) {
  if (precision == kIeee) return false;
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    return false;
  }
  return major >= 8;
}

// Tokens per block of the search kernel that `args` runs.
int block_tokens(const SearchArgs& args) {
  if (uses_tensor_cores(args.precision)) return kTcBlockN;
  switch (search_list_size(args.k)) {
    case 1: return SearchTile<1>::kBlockN;
    case 2: return SearchTile<2>::kBlockN;
    case 4: return SearchTile<4>::kBlockN;
    case 8: return SearchTile<8>::kBlockN;
    default: return SearchTile<16>::kBlockN;
  }
}

template <typename T, int KPAD>
cudaError_t launch_typed(const SearchArgs& args, int64_t codes_per_split, float* partial_score,
                         int32_t* partial_index, int64_t* indices, float* distances, cudaStream_t stream) {
  const int64_t splits = (args.n_codes + codes_per_split - 1) / codes_per_split;
  const int64_t token_blocks = (args.n_tokens + block_tokens(args) - 1) / block_tokens(args);
  auto* search = search_kernel<T, KPAD>;
  if (uses_tensor_cores(args.precision)) {
    switch (args.precision) {
      case kTf32: search = tensor_core_search_kernel<T, Tf32Operand, KPAD>; break;
      case kBf16: search = tensor_core_search_kernel<T, Bf16Operand, KPAD>; break;
      default: search = tensor_core_search_kernel<T, Fp16Operand, KPAD>; break;
    }
  }
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

}  // namespace

int search_list_size(int k) {
  int size = 1;
  while (size < k) size *= 2;
  return size;
}

int64_t search_codes_per_split(const SearchArgs& args, int target_blocks) {
  const int64_t tokens = block_tokens(args);
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
