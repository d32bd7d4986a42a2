// __nv_bfloat16 on the host, with torch's conversions (round to nearest even).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) { return c10::detail::f32_from_bits(h.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return {c10::detail::round_to_nearest_even(f)};
}
