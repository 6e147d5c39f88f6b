#include "flux_engine/int4.h"

#include <type_traits>

#include "dequantize.h"

namespace flux_engine {
namespace cpu {
namespace {

using detail::from_float;

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
  detail::with_out_type(out_type, out, [&](auto* dst) {
    detail::for_each_group(scales, zeros, kInt4SymmetricZero, K, group_size, dst, row_begin, row_end,
                           [&](int64_t column, float scale, int32_t zero, auto* group_out) {
                             expand_group(packed + column / 2, group_size / 2, scale, zero, group_out);
                           });
  });
}

}  // namespace cpu
}  // namespace flux_engine
