// Group-wise int4 weights: packing and dequantization.
//
// Torch-free API on raw pointers. Layout (same contract as flux_engine/ops/quantize.py):
//   codes   [R, K]      uint8, one code 0..15 per column, K even
//   packed  [R, K/2]    uint8, column 2j in the low nibble of byte j, column 2j+1 in the high nibble
//   scales  [R, K/G]    float32, one scale per group of G consecutive columns (G even, G divides K)
//   zeros   [R, K/G]    uint8 zero-point codes, or nullptr for symmetric weights (zero point 8)
//   out     [R, K]      value = (code - zero) * scale, computed in float32 then rounded to the output type
// Leading dimensions of a tensor are flattened into R rows. All buffers are contiguous.
#pragma once

#include <cstdint>

#include "flux_engine/out_type.h"

#if defined(__CUDACC__) || defined(FLUX_ENGINE_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace flux_engine {

constexpr int32_t kInt4SymmetricZero = 8;

namespace cpu {

// Packed bytes [begin, end): packed[j] = codes[2j] | codes[2j+1] << 4. Rows need no special handling
// because K is even.
void pack_int4(const uint8_t* codes, uint8_t* packed, int64_t begin, int64_t end);

// Packed bytes [begin, end): codes[2j] = packed[j] & 15, codes[2j+1] = packed[j] >> 4.
void unpack_int4(const uint8_t* packed, uint8_t* codes, int64_t begin, int64_t end);

// Rows [row_begin, row_end) of out, whose element type is `out_type`.
void dequantize_int4(const uint8_t* packed, const float* scales, const uint8_t* zeros, int64_t K,
                     int64_t group_size, OutType out_type, void* out, int64_t row_begin, int64_t row_end);

}  // namespace cpu

#if defined(__CUDACC__) || defined(FLUX_ENGINE_WITH_CUDA)
namespace cuda {

// Enqueue on `stream`; num_bytes is the number of packed bytes (R * K/2). Return the launch status.
cudaError_t pack_int4(const uint8_t* codes, uint8_t* packed, int64_t num_bytes, cudaStream_t stream);
cudaError_t unpack_int4(const uint8_t* packed, uint8_t* codes, int64_t num_bytes, cudaStream_t stream);
cudaError_t dequantize_int4(const uint8_t* packed, const float* scales, const uint8_t* zeros, int64_t rows,
                            int64_t K, int64_t group_size, OutType out_type, void* out, cudaStream_t stream);

}  // namespace cuda
#endif

}  // namespace flux_engine
