// Host emulation of the CUDA runtime and built-ins, as far as kernels/*.cu use them, so that the
// kernels and launchers compile with the host compiler and run on the CPU (emulated_kernels.cpp).
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <vector>

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr { cudaDevAttrComputeCapabilityMajor = 75 };
using cudaStream_t = void*;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __align__(bytes) __attribute__((aligned(bytes)))
#define __shared__ static  // blocks run one after another, so a static is the block's shared memory

struct alignas(16) float4 {
  float x, y, z, w;
};

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace cuda_emulator {

// Each CUDA thread of a block is a fiber (ucontext) on the calling thread; blocks run one after
// another. A fiber runs until it waits at a barrier (__syncthreads, or its warp's for the shuffles
// and __syncwarp) and the scheduler resumes the fibers round-robin: deterministic, and cheap enough
// for small shapes.
struct Barrier {
  unsigned expected = 0, arrived = 0, generation = 0;
};

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  dim3 thread_index;
  bool done = false;
};

inline constexpr size_t kStackBytes = 256 << 10;
inline dim3 grid_dim, block_dim, block_index;
inline Fiber* current = nullptr;
inline ucontext_t scheduler;
inline Barrier block_barrier;
inline std::vector<Barrier> warp_barriers;
inline std::vector<uint64_t> lanes;  // one exchange slot per thread of the block
inline cudaError_t last_error = cudaSuccess;
inline int compute_capability_major = 9;  // the emulated GPU: a Hopper unless a test says otherwise

inline void wait(Barrier& barrier) {
  const unsigned generation = barrier.generation;
  if (++barrier.arrived == barrier.expected) {
    barrier.arrived = 0;
    ++barrier.generation;
    return;
  }
  while (barrier.generation == generation) swapcontext(&current->context, &scheduler);
}

// A fresh context for thread `t` that calls entry(low, high) with the halves of `bits`. Not inlined:
// getcontext returns twice as far as the compiler knows, which it must not see in launch's loops.
[[gnu::noinline]] inline void prepare(Fiber& fiber, unsigned t, void (*entry)(), uintptr_t bits) {
  fiber.stack.resize(kStackBytes);
  fiber.thread_index = dim3(t);
  fiber.done = false;
  getcontext(&fiber.context);
  fiber.context.uc_stack.ss_sp = fiber.stack.data();
  fiber.context.uc_stack.ss_size = fiber.stack.size();
  fiber.context.uc_link = &scheduler;
  makecontext(&fiber.context, entry, 2, static_cast<int>(bits & 0xFFFFFFFFu), static_cast<int>(bits >> 32));
}

template <typename Kernel>
struct Launch {
  Kernel* body;
  static void run(int low, int high) {  // makecontext passes ints: the Launch pointer in two halves
    const uintptr_t bits = (static_cast<uintptr_t>(static_cast<unsigned>(high)) << 32) | static_cast<unsigned>(low);
    reinterpret_cast<Launch*>(bits)->body->operator()();
    current->done = true;
  }
};

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 threads_per_block, Args... args) {
  const unsigned threads = threads_per_block.x * threads_per_block.y * threads_per_block.z;
  if (threads % 32 != 0 || threads > 1024 || threads_per_block.y != 1 || threads_per_block.z != 1) {
    last_error = cudaErrorInvalidValue;
    return;
  }
  grid_dim = grid;
  block_dim = threads_per_block;
  std::vector<Fiber> fibers(threads);
  auto body = [&] { kernel(args...); };
  Launch<decltype(body)> state{&body};
  const uintptr_t bits = reinterpret_cast<uintptr_t>(&state);
  // blocks, and threads within a round, run in descending index order: a GPU keeps no order, and a
  // kernel whose answer depends on it (a last write winning) then fails here rather than passing by luck
  for (unsigned z = grid.z; z-- > 0;)
    for (unsigned y = grid.y; y-- > 0;)
      for (unsigned x = grid.x; x-- > 0;) {
        block_index = dim3(x, y, z);
        block_barrier = Barrier{threads};
        warp_barriers.assign(threads / 32, Barrier{32});
        lanes.assign(threads, 0);
        for (unsigned t = 0; t < threads; ++t) {
          prepare(fibers[t], t, reinterpret_cast<void (*)()>(&Launch<decltype(body)>::run), bits);
        }
        for (unsigned running = threads; running > 0;) {
          running = 0;
          for (auto fiber_it = fibers.rbegin(); fiber_it != fibers.rend(); ++fiber_it) {
            Fiber& fiber = *fiber_it;
            if (fiber.done) continue;
            current = &fiber;
            swapcontext(&scheduler, &fiber.context);
            running += fiber.done ? 0 : 1;
          }
        }
      }
}

template <typename T>
T exchange(T value, int source_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  const unsigned me = current->thread_index.x, warp = me / 32;
  uint64_t slot = 0;
  std::memcpy(&slot, &value, sizeof(T));
  lanes[me] = slot;
  wait(warp_barriers[warp]);
  T result;
  std::memcpy(&result, &lanes[warp * 32 + source_lane], sizeof(T));
  wait(warp_barriers[warp]);
  return result;
}

}  // namespace cuda_emulator

#define threadIdx (cuda_emulator::current->thread_index)
#define blockIdx (cuda_emulator::block_index)
#define gridDim (cuda_emulator::grid_dim)
#define blockDim (cuda_emulator::block_dim)

inline void __syncthreads() { cuda_emulator::wait(cuda_emulator::block_barrier); }
inline void __syncwarp() { cuda_emulator::wait(cuda_emulator::warp_barriers[threadIdx.x / 32]); }
template <typename T>
T __shfl_sync(unsigned, T value, int lane) { return cuda_emulator::exchange(value, lane); }
template <typename T>
T __shfl_xor_sync(unsigned, T value, int offset) {
  return cuda_emulator::exchange(value, static_cast<int>(threadIdx.x % 32) ^ offset);
}
inline unsigned __ballot_sync(unsigned, bool predicate) {
  const unsigned warp = threadIdx.x / 32;
  cuda_emulator::lanes[threadIdx.x] = predicate ? 1 : 0;
  cuda_emulator::wait(cuda_emulator::warp_barriers[warp]);
  unsigned bits = 0;
  for (unsigned lane = 0; lane < 32; ++lane) bits |= static_cast<unsigned>(cuda_emulator::lanes[warp * 32 + lane]) << lane;
  cuda_emulator::wait(cuda_emulator::warp_barriers[warp]);
  return bits;
}
inline int __ffs(unsigned bits) { return __builtin_ffs(static_cast<int>(bits)); }
inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "invalid argument";
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (attribute != cudaDevAttrComputeCapabilityMajor || device != 0) return cudaErrorInvalidValue;
  *value = cuda_emulator::compute_capability_major;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t error = cuda_emulator::last_error;
  cuda_emulator::last_error = cudaSuccess;
  return error;
}

#define FASTVQ_LAUNCH(kernel, grid, threads, stream, ...) cuda_emulator::launch(kernel, grid, threads, __VA_ARGS__)
