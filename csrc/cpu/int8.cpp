#include "flux_engine/int8.h"

#include "dequantize.h"

namespace flux_engine {
namespace cpu {
namespace {

// Expands the n codes of one group into n outputs.
template <typename Code, typename Out>
void expand_group(const Code* src, int64_t n, float scale, int32_t zero, Out* dst) {
  for (int64_t j = 0; j < n; ++j) {
    dst[j] = detail::from_float<Out>(static_cast<float>(static_cast<int32_t>(src[j]) - zero) * scale);
  }
}

template <typename Code>
void dequantize_rows(const Code* codes, const float* scales, const uint8_t* zeros, int64_t K, int64_t group_size,
                     OutType out_type, void* out, int64_t row_begin, int64_t row_end) {
  detail::with_out_type(out_type, out, [&](auto* dst) {
    detail::for_each_group(scales, zeros, 0, K, group_size, dst, row_begin, row_end,
                           [&](int64_t column, float scale, int32_t zero, auto* group_out) {
                             expand_group(codes + column, group_size, scale, zero, group_out);
                           });
  });
}

}  // namespace

void dequantize_int8(const void* codes, bool is_signed, const float* scales, const uint8_t* zeros, int64_t K,
                     int64_t group_size, OutType out_type, void* out, int64_t row_begin, int64_t row_end) {
  if (is_signed) {
    dequantize_rows(static_cast<const int8_t*>(codes), scales, zeros, K, group_size, out_type, out, row_begin,
                    row_end);
  } else {
    dequantize_rows(static_cast<const uint8_t*>(codes), scales, zeros, K, group_size, out_type, out, row_begin,
                    row_end);
  }
}

}  // namespace cpu
}  // namespace flux_engine
