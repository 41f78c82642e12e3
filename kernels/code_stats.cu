// Per-code counts and sums (EMA statistics, k-means, codebook gradient): a sorted segmented reduction,
// deterministic and O(N D), bitwise equal to the Triton backend's (fastvq/ops/triton/code_stats.py).
//
// Keys h K + code of the counted tokens are sorted stably (torch, in the glue), so each code's tokens
// form one run of the sorted order, in token order; a run is cut into chunks of kCodeStatsChunk
// tokens. A chunk's rows are added in token order and a run's chunk sums in chunk order, from 0.0f,
// as the Triton kernels add them: the order of every fp32 addition depends on the data only.
//   keys_kernel        the sort keys (skipped tokens get H K: sorted last)
//   run_bounds_kernel  each code's range [run_start, run_end) of the sorted tokens
//   code_sums_kernel   counts; the sums of runs of one chunk written directly (0.0f + chunk sum is the
//                      chunk sum); the number of chunks of each longer run
//   chunk_sums_kernel  the chunks of the longer runs, numbered by a prefix sum of those numbers (torch,
//                      in the glue), so a collapsed batch is spread over N / kCodeStatsChunk groups
//   run_sums_kernel    each longer run's chunk sums in chunk order
// No atomics and no two threads write one address: bitwise the same every run.
#include "device.cuh"
#include "launchers.h"
#include "vq_tile.cuh"

namespace fastvq {
namespace {

constexpr int kStatsThreads = 256;
constexpr int kRowsInFlight = 8;  // loads a thread issues before it adds them (latency of a long run)

// Threads of a block are groups of `columns` (a power of two <= 32) consecutive threads: group g of
// block (bx, by) owns item bx * (kStatsThreads / columns) + g and column by * columns + its lane in the group.
struct GroupThread {
  int64_t item, column;
  bool lead;  // lane 0 of the group in the first column block: writes the item's per-item outputs
};

__device__ __forceinline__ GroupThread group_thread(int columns) {
  const int lane = static_cast<int>(threadIdx.x) % columns;
  return {static_cast<int64_t>(blockIdx.x) * (kStatsThreads / columns) + threadIdx.x / columns,
          static_cast<int64_t>(blockIdx.y) * columns + lane, lane == 0 && blockIdx.y == 0};
}

// sum over s in [begin, end) in order of x[order[s] - head N, column], from 0.0f.
template <typename T>
__device__ float sorted_rows_sum(const CodeStatsArgs& args, const int64_t* __restrict__ order, int64_t head,
                                 int64_t column, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(args.x) + head * args.x_stride_h + column * args.x_stride_d;
  const int64_t first_token = head * args.n_tokens;
  float acc = 0.0f;
  int64_t s = begin;
  for (; s + kRowsInFlight <= end; s += kRowsInFlight) {  // the loads of kRowsInFlight rows first
    float row[kRowsInFlight];
#pragma unroll
    for (int i = 0; i < kRowsInFlight; ++i) row[i] = to_float(x[(order[s + i] - first_token) * args.x_stride_n]);
#pragma unroll
    for (int i = 0; i < kRowsInFlight; ++i) acc += row[i];
  }
  for (; s < end; ++s) acc += to_float(x[(order[s] - first_token) * args.x_stride_n]);
  return acc;
}

__global__ void __launch_bounds__(kStatsThreads) keys_kernel(CodeStatsArgs args, int64_t* __restrict__ keys) {
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kStatsThreads + threadIdx.x;  // h N + n
  if (token >= args.heads * args.n_tokens) return;
  const int64_t head = token / args.n_tokens, n = token % args.n_tokens;
  const int64_t index = args.indices[head * args.index_stride_h + n * args.index_stride_n];
  const bool mask = args.mask == nullptr || args.mask[head * args.mask_stride_h + n * args.mask_stride_n] != 0;
  keys[token] = counted(index, args.n_codes, mask) ? head * args.n_codes + index : args.heads * args.n_codes;
}

__global__ void __launch_bounds__(kStatsThreads) run_bounds_kernel(CodeStatsArgs args,
                                                                   const int64_t* __restrict__ sorted_keys,
                                                                   int64_t* __restrict__ run_start,
                                                                   int64_t* __restrict__ run_end) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kStatsThreads + threadIdx.x;
  const int64_t tokens = args.heads * args.n_tokens;
  if (s >= tokens) return;
  const int64_t key = sorted_keys[s];
  if (key == args.heads * args.n_codes) return;  // skipped tokens
  if (s == 0 || sorted_keys[s - 1] != key) run_start[key] = s;
  if (s == tokens - 1 || sorted_keys[s + 1] != key) run_end[key] = s + 1;
}

template <typename T>
__global__ void __launch_bounds__(kStatsThreads) code_sums_kernel(CodeStatsArgs args, int columns,
                                                                  const int64_t* __restrict__ order,
                                                                  const int64_t* __restrict__ run_start,
                                                                  const int64_t* __restrict__ run_end,
                                                                  int64_t* __restrict__ run_chunks,
                                                                  float* __restrict__ counts,
                                                                  float* __restrict__ sums) {
  const GroupThread me = group_thread(columns);
  const int64_t key = me.item;  // h K + code
  if (key >= args.heads * args.n_codes) return;
  const int64_t begin = run_start[key], length = run_end[key] - begin;
  if (me.lead) {
    counts[key] = static_cast<float>(length);  // rounded to nearest, as torch's int64 -> fp32
    run_chunks[key] = length > kCodeStatsChunk ? (length + kCodeStatsChunk - 1) / kCodeStatsChunk : 0;
  }
  if (length > kCodeStatsChunk || me.column >= args.dim) return;
  sums[key * args.dim + me.column] = sorted_rows_sum<T>(args, order, key / args.n_codes, me.column, begin,
                                                        begin + length);
}

// The longer run that chunk c (< the total number of chunks) belongs to: the first key whose
// chunk_end exceeds c.
__device__ int64_t chunk_key(const CodeStatsArgs& args, const int64_t* __restrict__ chunk_end, int64_t c) {
  int64_t lo = 0, hi = args.heads * args.n_codes - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (chunk_end[mid] > c) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// partial[c] = the sum of chunk c of the longer runs, its rows in token order.
template <typename T>
__global__ void __launch_bounds__(kStatsThreads) chunk_sums_kernel(CodeStatsArgs args, int columns,
                                                                   const int64_t* __restrict__ order,
                                                                   const int64_t* __restrict__ run_start,
                                                                   const int64_t* __restrict__ run_end,
                                                                   const int64_t* __restrict__ run_chunks,
                                                                   const int64_t* __restrict__ chunk_end,
                                                                   float* __restrict__ partial) {
  const GroupThread me = group_thread(columns);
  const int64_t c = me.item;
  if (c >= chunk_end[args.heads * args.n_codes - 1] || me.column >= args.dim) return;
  const int64_t key = chunk_key(args, chunk_end, c);
  const int64_t begin = run_start[key] + (c - (chunk_end[key] - run_chunks[key])) * kCodeStatsChunk;
  const int64_t end = begin + kCodeStatsChunk < run_end[key] ? begin + kCodeStatsChunk : run_end[key];
  partial[c * args.dim + me.column] = sorted_rows_sum<T>(args, order, key / args.n_codes, me.column, begin, end);
}

// sums[key] = the chunk sums of a longer run in chunk order, from 0.0f, by the group of its first chunk.
__global__ void __launch_bounds__(kStatsThreads) run_sums_kernel(CodeStatsArgs args, int columns,
                                                                 const int64_t* __restrict__ run_chunks,
                                                                 const int64_t* __restrict__ chunk_end,
                                                                 const float* __restrict__ partial,
                                                                 float* __restrict__ sums) {
  const GroupThread me = group_thread(columns);
  const int64_t c = me.item;
  if (c >= chunk_end[args.heads * args.n_codes - 1] || me.column >= args.dim) return;
  const int64_t key = chunk_key(args, chunk_end, c);
  const int64_t first = chunk_end[key] - run_chunks[key];
  if (c != first) return;
  float acc = 0.0f;
#pragma unroll 8
  for (int64_t j = first; j < chunk_end[key]; ++j) acc += partial[j * args.dim + me.column];
  sums[key * args.dim + me.column] = acc;
}

int columns_per_item(int64_t dim) {
  int columns = 1;
  while (columns < 32 && columns < dim) columns *= 2;
  return columns;
}

dim3 token_grid(int64_t tokens) { return dim3(static_cast<unsigned>((tokens + kStatsThreads - 1) / kStatsThreads)); }

dim3 group_grid(int64_t items, int64_t dim, int columns) {
  const int64_t per_block = kStatsThreads / columns;
  const int64_t column_blocks = dim > 0 ? (dim + columns - 1) / columns : 1;  // D = 0 still counts
  return dim3(static_cast<unsigned>((items + per_block - 1) / per_block), static_cast<unsigned>(column_blocks));
}

// Sizes the grids can cover: at most 2^31 - 1 blocks of tokens or codes, 65535 column blocks.
bool stats_args_valid(const CodeStatsArgs& args) {
  const int64_t items = args.heads * (args.n_tokens > args.n_codes ? args.n_tokens : args.n_codes);
  return args.heads >= 0 && args.n_tokens >= 0 && args.n_codes >= 1 && args.dim >= 0 &&
         (items + kStatsThreads - 1) / kStatsThreads <= INT32_MAX && (args.dim + 31) / 32 <= 65535;
}

template <typename T>
cudaError_t launch_sums(const CodeStatsArgs& args, const int64_t* order, const int64_t* run_start,
                        const int64_t* run_end, int64_t* run_chunks, float* counts, float* sums,
                        cudaStream_t stream) {
  const int columns = columns_per_item(args.dim);
  auto* kernel = code_sums_kernel<T>;
  FASTVQ_LAUNCH(kernel, group_grid(args.heads * args.n_codes, args.dim, columns), kStatsThreads, stream, args, columns,
                order, run_start, run_end, run_chunks, counts, sums);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_long(const CodeStatsArgs& args, const int64_t* order, const int64_t* run_start,
                        const int64_t* run_end, const int64_t* run_chunks, const int64_t* chunk_end,
                        float* partial, float* sums, cudaStream_t stream) {
  const int columns = columns_per_item(args.dim);
  const dim3 grid = group_grid(code_stats_max_chunks(args), args.dim, columns);
  auto* chunk_sums = chunk_sums_kernel<T>;
  FASTVQ_LAUNCH(chunk_sums, grid, kStatsThreads, stream, args, columns, order, run_start, run_end, run_chunks,
                chunk_end, partial);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  auto* run_sums = run_sums_kernel;
  FASTVQ_LAUNCH(run_sums, grid, kStatsThreads, stream, args, columns, run_chunks, chunk_end, partial, sums);
  return cudaGetLastError();
}

}  // namespace

int64_t code_stats_max_chunks(const CodeStatsArgs& args) {
  // a run longer than a chunk has ceil(L / chunk) <= 2 L / chunk chunks
  return 2 * ((args.heads * args.n_tokens + kCodeStatsChunk - 1) / kCodeStatsChunk);
}

cudaError_t launch_code_stats_keys(const CodeStatsArgs& args, int64_t* keys, cudaStream_t stream) {
  if (!stats_args_valid(args)) return cudaErrorInvalidValue;
  const int64_t tokens = args.heads * args.n_tokens;
  if (tokens == 0) return cudaSuccess;  // an empty grid is a launch error
  auto* kernel = keys_kernel;
  FASTVQ_LAUNCH(kernel, token_grid(tokens), kStatsThreads, stream, args, keys);
  return cudaGetLastError();
}

cudaError_t launch_code_stats_runs(const CodeStatsArgs& args, const int64_t* sorted_keys, const int64_t* order,
                                   int64_t* run_start, int64_t* run_end, int64_t* run_chunks, float* counts,
                                   float* sums, cudaStream_t stream) {
  if (!stats_args_valid(args)) return cudaErrorInvalidValue;
  const int64_t tokens = args.heads * args.n_tokens;
  if (args.heads == 0) return cudaSuccess;
  if (tokens > 0) {
    auto* bounds = run_bounds_kernel;
    FASTVQ_LAUNCH(bounds, token_grid(tokens), kStatsThreads, stream, args, sorted_keys, run_start, run_end);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  switch (args.dtype) {
    case DType::kFloat32:
      return launch_sums<float>(args, order, run_start, run_end, run_chunks, counts, sums, stream);
    case DType::kFloat16:
      return launch_sums<__half>(args, order, run_start, run_end, run_chunks, counts, sums, stream);
    case DType::kBFloat16:
      return launch_sums<__nv_bfloat16>(args, order, run_start, run_end, run_chunks, counts, sums, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_code_stats_long_runs(const CodeStatsArgs& args, const int64_t* order, const int64_t* run_start,
                                        const int64_t* run_end, const int64_t* run_chunks, const int64_t* chunk_end,
                                        float* partial, float* sums, cudaStream_t stream) {
  if (!stats_args_valid(args)) return cudaErrorInvalidValue;
  if (args.heads * args.n_tokens <= kCodeStatsChunk || args.dim == 0) return cudaSuccess;  // no longer run, or no sum
  switch (args.dtype) {
    case DType::kFloat32:
      return launch_long<float>(args, order, run_start, run_end, run_chunks, chunk_end, partial, sums, stream);
    case DType::kFloat16:
      return launch_long<__half>(args, order, run_start, run_end, run_chunks, chunk_end, partial, sums, stream);
    case DType::kBFloat16:
      return launch_long<__nv_bfloat16>(args, order, run_start, run_end, run_chunks, chunk_end, partial, sums,
                                        stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastvq
