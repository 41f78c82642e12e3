// Host emulation of fp16 storage: the bits, converted to float exactly.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const int exponent = (h.bits >> 10) & 0x1F, mantissa = h.bits & 0x3FF;
  const float sign = (h.bits & 0x8000) ? -1.0f : 1.0f;
  if (exponent == 0x1F) return mantissa ? NAN : sign * INFINITY;
  if (exponent == 0) return sign * std::ldexp(static_cast<float>(mantissa), -24);
  return sign * std::ldexp(static_cast<float>(mantissa | 0x400), exponent - 25);
}

// Round to nearest even, by the host compiler's _Float16 conversion (subnormals and overflow included).
inline __half __float2half_rn(float value) {
  const _Float16 h = static_cast<_Float16>(value);
  __half out;
  std::memcpy(&out.bits, &h, sizeof out.bits);
  return out;
}
