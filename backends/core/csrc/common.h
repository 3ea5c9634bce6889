// Helpers shared by our CPU kernels: float <-> element conversions (bf16 is the top half of a
// float: widening is a shift, narrowing rounds to nearest even as c10's conversion does), in
// forms the compiler vectorizes.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

namespace distserve {

inline float load(float x) { return x; }
inline float load(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline void store(float* p, float x) { *p = x; }
inline void store(c10::BFloat16* p, float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  p->x = static_cast<uint16_t>(bits >> 16);
}

// out[0, n) = o[0, n) / l, rounded to bf16: an attention row's output from its running sum
inline void store_normalized(c10::BFloat16* out, const float* o, float l, int64_t n) {
  const float inv = 1.f / l;
  for (int64_t i = 0; i < n; ++i) store(out + i, o[i] * inv);
}

}  // namespace distserve
