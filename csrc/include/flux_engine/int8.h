// Group-wise int8 weights: dequantization.
//
// Torch-free API on raw pointers. Layout (same contract as flux_engine/ops/quantize.py):
//   codes   [R, K]      int8 codes -127..127 (symmetric) or uint8 codes 0..255 (asymmetric), one per column
//   scales  [R, K/G]    float32, one scale per group of G consecutive columns (G >= 1 divides K)
//   zeros   [R, K/G]    uint8 zero-point codes, or nullptr for zero point 0 (the format pairs zeros with uint8
//                       codes; the kernel applies whichever it is given)
//   out     [R, K]      value = (code - zero) * scale, computed in float32 then rounded to the output type
// Leading dimensions of a tensor are flattened into R rows. All buffers are contiguous.
#pragma once

#include <cstdint>

#include "flux_engine/out_type.h"

namespace flux_engine {
namespace cpu {

// Rows [row_begin, row_end) of out, whose element type is `out_type`. `codes` points to int8_t when is_signed,
// else to uint8_t.
void dequantize_int8(const void* codes, bool is_signed, const float* scales, const uint8_t* zeros, int64_t K,
                     int64_t group_size, OutType out_type, void* out, int64_t row_begin, int64_t row_end);

}  // namespace cpu
}  // namespace flux_engine
