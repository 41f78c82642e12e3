// What the .cu files share beyond the per-element logic: loads of each input dtype as fp32, and how
// a launcher starts a kernel. FASTVQ_LAUNCH is a macro so that the host emulation of the kernels
// (tests/cuda_emulator/) can run them without a GPU: it defines the macro before this header.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifndef FASTVQ_LAUNCH
// kernel: a pointer to a __global__ function (a variable, so that template arguments need no parentheses)
#define FASTVQ_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif

namespace fastvq {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Stores `v` as a shared-memory operand of its type (exact for values already rounded to that type).
__device__ __forceinline__ void store_operand(float& dst, float v) { dst = v; }
__device__ __forceinline__ void store_operand(__half& dst, float v) { dst = __float2half_rn(v); }
__device__ __forceinline__ void store_operand(__nv_bfloat16& dst, float v) { dst = __float2bfloat16_rn(v); }

}  // namespace fastvq
