// kernels/*.cu compiled for the host: the CUDA built-ins they use come from the stub headers of
// this folder (cuda_runtime.h: one fiber per CUDA thread, barriers for __syncthreads and the warp
// shuffles; mma.h: the WMMA fragments of the tensor-core search), so the real kernels and launchers
// run, thread mapping and all, without a GPU.
// tests/test_cuda_emulated.py builds this with the host compiler and calls the launchers by ctypes.
#include <cuda_runtime.h>  // the emulation (this folder), first: it defines FASTVQ_LAUNCH

#include <cstring>

#include "../../../kernels/code_stats.cu"
#include "../../../kernels/nearest_code.cu"

extern "C" {

// launch_search on host buffers; returns the cudaError_t.
int fastvq_emulated_search(const fastvq::SearchArgs* args, int target_blocks, float* partial_score,
                           int32_t* partial_index, int64_t* indices, float* distances) {
  const int64_t codes_per_split = fastvq::search_codes_per_split(*args, target_blocks);
  return fastvq::launch_search(*args, codes_per_split, partial_score, partial_index, indices, distances, nullptr);
}

int64_t fastvq_emulated_search_splits(const fastvq::SearchArgs* args, int target_blocks) {
  const int64_t codes_per_split = fastvq::search_codes_per_split(*args, target_blocks);
  return (args->n_codes + codes_per_split - 1) / codes_per_split;
}

int fastvq_emulated_search_list_size(int k) { return fastvq::search_list_size(k); }

// WMMA mma_sync calls so far (tests/cuda_emulator/mma.h): which search kernel ran.
uint64_t fastvq_emulated_mma_calls() { return cuda_emulator::mma_calls; }

// The compute capability (major) the emulated GPU reports; returns the previous one.
int fastvq_emulated_set_capability(int major) {
  const int previous = cuda_emulator::compute_capability_major;
  cuda_emulator::compute_capability_major = major;
  return previous;
}

// The three launchers of code_stats on host buffers (the test sorts and takes the prefix sum between them).
int fastvq_emulated_code_stats_keys(const fastvq::CodeStatsArgs* args, int64_t* keys) {
  return fastvq::launch_code_stats_keys(*args, keys, nullptr);
}

int fastvq_emulated_code_stats_runs(const fastvq::CodeStatsArgs* args, const int64_t* sorted_keys,
                                    const int64_t* order, int64_t* run_start, int64_t* run_end, int64_t* run_chunks,
                                    float* counts, float* sums) {
  return fastvq::launch_code_stats_runs(*args, sorted_keys, order, run_start, run_end, run_chunks, counts, sums,
                                        nullptr);
}

int64_t fastvq_emulated_code_stats_max_chunks(const fastvq::CodeStatsArgs* args) {
  return fastvq::code_stats_max_chunks(*args);
}

int fastvq_emulated_code_stats_long_runs(const fastvq::CodeStatsArgs* args, const int64_t* order,
                                         const int64_t* run_start, const int64_t* run_end, const int64_t* run_chunks,
                                         const int64_t* chunk_end, float* partial, float* sums) {
  return fastvq::launch_code_stats_long_runs(*args, order, run_start, run_end, run_chunks, chunk_end, partial, sums,
                                             nullptr);
}

}  // extern "C"
