// Host emulation of bf16 storage: the high half of an fp32.
#pragma once

#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t bits = static_cast<uint32_t>(h.bits) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}
