// Internal to the CPU dequantize kernels (int4.cpp, int8.cpp): output element types, torch's float -> 16-bit
// rounding, and the loop over the groups of a block of rows.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "flux_engine/out_type.h"

namespace flux_engine {
namespace cpu {
namespace detail {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// Round to nearest even, NaN to the canonical quiet NaN: the results of torch's float -> bfloat16 cast.
inline uint16_t to_bfloat16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float float_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// IEEE float -> binary16, round to nearest even, NaN to sign | 0x7E00: the results of torch's float -> float16
// cast (c10's fp16_ieee_from_fp32_value). The float arithmetic does the rounding, so there are no branches and
// no per-element shifts, and loops over it vectorise.
inline uint16_t to_float16(float f) {
  // 4|f|, or infinity exactly when f rounds to a half infinity (|f| * 2^112 overflows).
  const float magnitude = (std::fabs(f) * float_from_bits(0x77800000u)) * float_from_bits(0x08800000u);
  const uint32_t u = float_bits(f);
  const uint32_t shl1 = u + u;  // exponent in the top byte, sign dropped
  const uint32_t sign = (u >> 16) & 0x8000u;
  // Adding 2^(e+15), e = the exponent of f clamped below at -14 (the smallest normal half's), rounds 4|f| to the
  // half's 10 mantissa bits, to nearest even, in the float addition. The sum's low 12 bits then hold the half's
  // mantissa with its leading 1, which carries into the exponent read from the sum's (subnormal halves: e = -14
  // gives them the fixed 2^-24 spacing).
  const uint32_t bias = std::max(shl1 & 0xFF000000u, 0x71000000u);
  const uint32_t sum = float_bits(float_from_bits((bias >> 1) + 0x07800000u) + magnitude);
  const uint32_t nonsign = ((sum >> 13) & 0x7C00u) + (sum & 0x0FFFu);
  // NaN picked by a mask: GCC would turn `?:` into a branch around the float arithmetic, which it may not
  // speculate, and the loop would no longer vectorise.
  const uint32_t nan_mask = 0u - static_cast<uint32_t>(shl1 > 0xFF000000u);
  return static_cast<uint16_t>(sign | (nonsign & ~nan_mask) | (0x7E00u & nan_mask));
}

// 16-bit outputs as their bit patterns, distinct types so each picks its rounding.
struct Float16 {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

// A float32 value as an output element.
template <typename Out>
Out from_float(float v);
template <>
inline float from_float<float>(float v) {
  return v;
}
template <>
inline Float16 from_float<Float16>(float v) {
  return {to_float16(v)};
}
template <>
inline BFloat16 from_float<BFloat16>(float v) {
  return {to_bfloat16(v)};
}

// Calls fn(typed_out) with `out` cast to the element type of `out_type` (float, Float16 or BFloat16).
template <typename Fn>
void with_out_type(OutType out_type, void* out, Fn&& fn) {
  switch (out_type) {
    case OutType::kFloat32:
      fn(static_cast<float*>(out));
      break;
    case OutType::kFloat16:
      fn(static_cast<Float16*>(out));
      break;
    case OutType::kBFloat16:
      fn(static_cast<BFloat16*>(out));
      break;
  }
}

// For every group of rows [row_begin, row_end) of a [R, K] output in groups of G = group_size columns, calls
// expand(column, scale, zero, dst): `column` is the flat index r*K + g*G of the group's first element (codes
// are addressed from it), scale and zero its entries of scales / zeros [R, K/G] (zero = default_zero when zeros
// is nullptr), and dst = out + column.
template <typename Out, typename Expand>
void for_each_group(const float* scales, const uint8_t* zeros, int32_t default_zero, int64_t K, int64_t group_size,
                    Out* out, int64_t row_begin, int64_t row_end, Expand&& expand) {
  const int64_t groups = K / group_size;
  for (int64_t q = row_begin * groups; q < row_end * groups; ++q) {
    const int64_t column = q * group_size;
    const int32_t zero = zeros ? static_cast<int32_t>(zeros[q]) : default_zero;
    expand(column, scales[q], zero, out + column);
  }
}

}  // namespace detail
}  // namespace cpu
}  // namespace flux_engine
