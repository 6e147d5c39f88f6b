#include "flux_engine/int4.h"

#include <cstring>
#include <type_traits>

namespace flux_engine {
namespace cpu {
namespace {

uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// Round to nearest even, NaN to the canonical quiet NaN: the results of torch's float -> bfloat16 cast.
uint16_t to_bfloat16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// IEEE float -> binary16, round to nearest even (the results of torch's float -> float16 cast).
uint16_t to_float16(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u);
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // |f| >= 65520 rounds to infinity
  if (a >= 0x38800000u) {
    // Normal half: rebias the exponent (127 -> 15) and round off the 13 low mantissa bits; a carry out of
    // the mantissa correctly bumps the exponent.
    return static_cast<uint16_t>(sign | ((a - 0x38000000u + 0xFFFu + ((a >> 13) & 1u)) >> 13));
  }
  // Subnormal half: the magnitude in units of 2^-24 is mantissa * 2^-shift, shift >= 14.
  const uint32_t shift = 126u - (a >> 23);
  if (shift > 24u) return static_cast<uint16_t>(sign);
  const uint32_t mantissa = (a & 0x7FFFFFu) | 0x800000u;
  uint32_t h = mantissa >> shift;
  const uint32_t rest = mantissa & ((1u << shift) - 1u);
  const uint32_t tie = 1u << (shift - 1u);
  if (rest > tie || (rest == tie && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

// 16-bit outputs as their bit patterns, distinct types so each picks its rounding.
struct Float16 {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

template <typename Out>
Out from_float(float v);
template <>
Float16 from_float<Float16>(float v) {
  return {to_float16(v)};
}
template <>
BFloat16 from_float<BFloat16>(float v) {
  return {to_bfloat16(v)};
}

// Expands the `bytes` packed bytes of one group into 2*bytes outputs.
template <typename Out>
void expand_group(const uint8_t* src, int64_t bytes, float scale, int32_t zero, Out* dst) {
  if constexpr (std::is_same_v<Out, float>) {
    // The plain expression vectorises.
    for (int64_t j = 0; j < bytes; ++j) {
      dst[2 * j] = static_cast<float>(static_cast<int32_t>(src[j] & 0xF) - zero) * scale;
      dst[2 * j + 1] = static_cast<float>(static_cast<int32_t>(src[j] >> 4) - zero) * scale;
    }
  } else {
    // Scalar 16-bit rounding per element would dominate; a group has only 16 distinct outputs, so they are
    // rounded once into a table and the bytes are expanded by lookup.
    Out table[16];
    for (int32_t c = 0; c < 16; ++c) table[c] = from_float<Out>(static_cast<float>(c - zero) * scale);
    for (int64_t j = 0; j < bytes; ++j) {
      dst[2 * j] = table[src[j] & 0xF];
      dst[2 * j + 1] = table[src[j] >> 4];
    }
  }
}

template <typename Out>
void dequantize_rows(const uint8_t* packed, const float* scales, const uint8_t* zeros, int64_t K,
                     int64_t group_size, Out* out, int64_t row_begin, int64_t row_end) {
  const int64_t groups = K / group_size;
  const int64_t group_bytes = group_size / 2;
  for (int64_t r = row_begin; r < row_end; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t q = r * groups + g;
      const int32_t zero = zeros ? static_cast<int32_t>(zeros[q]) : kInt4SymmetricZero;
      expand_group(packed + r * (K / 2) + g * group_bytes, group_bytes, scales[q], zero,
                   out + r * K + g * group_size);
    }
  }
}

}  // namespace

void pack_int4(const uint8_t* codes, uint8_t* packed, int64_t begin, int64_t end) {
  for (int64_t j = begin; j < end; ++j) {
    packed[j] = static_cast<uint8_t>(codes[2 * j] | (codes[2 * j + 1] << 4));
  }
}

void unpack_int4(const uint8_t* packed, uint8_t* codes, int64_t begin, int64_t end) {
  for (int64_t j = begin; j < end; ++j) {
    codes[2 * j] = packed[j] & 0xF;
    codes[2 * j + 1] = packed[j] >> 4;
  }
}

void dequantize_int4(const uint8_t* packed, const float* scales, const uint8_t* zeros, int64_t K,
                     int64_t group_size, OutType out_type, void* out, int64_t row_begin, int64_t row_end) {
  switch (out_type) {
    case OutType::kFloat32:
      dequantize_rows(packed, scales, zeros, K, group_size, static_cast<float*>(out), row_begin, row_end);
      break;
    case OutType::kFloat16:
      dequantize_rows(packed, scales, zeros, K, group_size, static_cast<Float16*>(out), row_begin, row_end);
      break;
    case OutType::kBFloat16:
      dequantize_rows(packed, scales, zeros, K, group_size, static_cast<BFloat16*>(out), row_begin, row_end);
      break;
  }
}

}  // namespace cpu
}  // namespace flux_engine
