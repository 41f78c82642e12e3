// Host emulation of the WMMA API (nvcuda::wmma), as far as kernels/nearest_code.cu uses it.
//
// A fragment holds its whole tile in every thread of the warp (row-major), so nothing depends on
// the hardware's element layout: the kernels may only load, store, fill and multiply fragments.
// load_matrix_sync reads the whole tile (a tf32 operand drops its low 13 mantissa bits, as tensor
// cores ignore them); store_matrix_sync writes from each lane only the elements e with
// e % 32 == lane, so a missing barrier between the store and a read shows up as in hardware.
// mma_sync computes D = A B + C in fp32 with one fmaf per product, k ascending: every product of
// tf32 / bf16 / fp16 values is exact in fp32, so this is the kernels' CUDA-core sum order (and the
// host check's). Real tensor cores add the products of a fragment step in another order (and may
// keep more bits in between): results agree only to the regret bound of the precision
// (tests/vq_checks.py), which is what the tests assert beside the exact emulated answer.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace cuda_emulator {
inline uint64_t mma_calls = 0;  // mma_sync calls by any thread, for the tests
}  // namespace cuda_emulator

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

namespace detail {

template <typename Element>
struct storage {
  using type = Element;
};
template <>
struct storage<precision::tf32> {
  using type = float;
};

inline float value(float v) { return v; }
inline float value(__half v) { return __half2float(v); }
inline float value(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename Element, typename T>
T loaded(T v) {
  return v;
}
template <>
inline float loaded<precision::tf32, float>(float v) {  // tensor cores read the 19 high bits
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits &= ~0x1FFFu;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// rows and columns of a fragment: A is M x K, B is K x N, the accumulator M x N
template <typename Use, int M, int N, int K>
struct extent;
template <int M, int N, int K>
struct extent<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct extent<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct extent<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

}  // namespace detail

template <typename Use, int M, int N, int K, typename Element, typename Layout = void>
struct fragment {
  using storage_element_type = typename detail::storage<Element>::type;
  static constexpr int rows = detail::extent<Use, M, N, K>::rows, cols = detail::extent<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  storage_element_type x[num_elements];  // (row, col) at row * cols + col
};

template <typename Use, int M, int N, int K, typename Element, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, Element, Layout>& a,
                      const typename fragment<Use, M, N, K, Element, Layout>::storage_element_type* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, Element, Layout>;
  for (int r = 0; r < F::rows; ++r) {
    for (int c = 0; c < F::cols; ++c) {
      const auto v = std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r];
      a.x[r * F::cols + c] = detail::loaded<Element>(v);
    }
  }
}

template <typename Use, int M, int N, int K, typename Element, typename Layout>
void fill_fragment(fragment<Use, M, N, K, Element, Layout>& a,
                   typename fragment<Use, M, N, K, Element, Layout>::storage_element_type v) {
  for (auto& e : a.x) e = v;
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& a, unsigned ldm, layout_t layout) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  for (int e = lane; e < M * N; e += 32) {
    const int r = e / N, c = e % N;
    p[layout == mem_row_major ? r * ldm + c : c * ldm + r] = a.x[e];
  }
}

template <int M, int N, int K, typename Element, typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, Element, LayoutA>& a,
              const fragment<matrix_b, M, N, K, Element, LayoutB>& b, const fragment<accumulator, M, N, K, float>& c) {
  ++cuda_emulator::mma_calls;
  float out[M * N];
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      float acc = c.x[m * N + n];
      for (int k = 0; k < K; ++k) acc = std::fmaf(detail::value(a.x[m * K + k]), detail::value(b.x[k * N + n]), acc);
      out[m * N + n] = acc;
    }
  }
  std::memcpy(d.x, out, sizeof out);
}

}  // namespace wmma
}  // namespace nvcuda
