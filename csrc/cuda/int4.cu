#include "flux_engine/int4.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstring>

namespace flux_engine {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// One thread per item: grids of ceil(n / kThreads) blocks.
unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

__device__ int64_t item_index() { return blockIdx.x * int64_t{blockDim.x} + threadIdx.x; }

template <typename Out>
__device__ Out convert(float v);
template <>
__device__ float convert<float>(float v) {
  return v;
}
template <>
__device__ __half convert<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __nv_bfloat16 convert<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__global__ void pack_kernel(const uint8_t* codes, uint8_t* packed, int64_t num_bytes) {
  const int64_t j = item_index();
  if (j >= num_bytes) return;
  packed[j] = static_cast<uint8_t>(codes[2 * j] | (codes[2 * j + 1] << 4));
}

__global__ void unpack_kernel(const uint8_t* packed, uint8_t* codes, int64_t num_bytes) {
  const int64_t j = item_index();
  if (j >= num_bytes) return;
  const uint8_t byte = packed[j];
  codes[2 * j] = byte & 0xF;
  codes[2 * j + 1] = byte >> 4;
}

// Each thread expands kBytes consecutive packed bytes of one group into 2*kBytes outputs. With kBytes == 4
// it loads one 32-bit word and stores 16 or 32 bytes with 128-bit stores (the launcher checks alignment).
template <typename Out, int kBytes>
__global__ void dequantize_kernel(const uint8_t* packed, const float* scales, const uint8_t* zeros,
                                  int64_t num_chunks, int64_t group_bytes, Out* out) {
  const int64_t c = item_index();
  if (c >= num_chunks) return;
  const int64_t byte = c * kBytes;
  // Rows hold a whole number of groups, so the group index needs no row arithmetic.
  const int64_t q = byte / group_bytes;
  const float scale = scales[q];
  const int32_t zero = zeros ? static_cast<int32_t>(zeros[q]) : kInt4SymmetricZero;
  uint8_t bytes[kBytes];
  if constexpr (kBytes == 4) {
    const uint32_t word = *reinterpret_cast<const uint32_t*>(packed + byte);
    std::memcpy(bytes, &word, sizeof(word));
  } else {
    bytes[0] = packed[byte];
  }
  Out values[2 * kBytes];
#pragma unroll
  for (int i = 0; i < kBytes; ++i) {
    values[2 * i] = convert<Out>(static_cast<float>(static_cast<int32_t>(bytes[i] & 0xF) - zero) * scale);
    values[2 * i + 1] = convert<Out>(static_cast<float>(static_cast<int32_t>(bytes[i] >> 4) - zero) * scale);
  }
  Out* dst = out + 2 * byte;
  if constexpr (sizeof(values) % sizeof(uint4) == 0) {
    uint4 words[sizeof(values) / sizeof(uint4)];
    std::memcpy(words, values, sizeof(values));
#pragma unroll
    for (size_t w = 0; w < sizeof(values) / sizeof(uint4); ++w) reinterpret_cast<uint4*>(dst)[w] = words[w];
  } else {
#pragma unroll
    for (int i = 0; i < 2 * kBytes; ++i) dst[i] = values[i];
  }
}

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename Out>
cudaError_t launch_dequantize(const uint8_t* packed, const float* scales, const uint8_t* zeros, int64_t num_bytes,
                              int64_t group_bytes, void* out, cudaStream_t stream) {
  Out* dst = static_cast<Out*>(out);
  if (group_bytes % 4 == 0 && aligned(packed, 4) && aligned(out, sizeof(uint4))) {
    const int64_t chunks = num_bytes / 4;
    dequantize_kernel<Out, 4><<<blocks_for(chunks), kThreads, 0, stream>>>(packed, scales, zeros, chunks,
                                                                           group_bytes, dst);
  } else {
    dequantize_kernel<Out, 1><<<blocks_for(num_bytes), kThreads, 0, stream>>>(packed, scales, zeros, num_bytes,
                                                                              group_bytes, dst);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t pack_int4(const uint8_t* codes, uint8_t* packed, int64_t num_bytes, cudaStream_t stream) {
  if (num_bytes == 0) return cudaSuccess;
  pack_kernel<<<blocks_for(num_bytes), kThreads, 0, stream>>>(codes, packed, num_bytes);
  return cudaGetLastError();
}

cudaError_t unpack_int4(const uint8_t* packed, uint8_t* codes, int64_t num_bytes, cudaStream_t stream) {
  if (num_bytes == 0) return cudaSuccess;
  unpack_kernel<<<blocks_for(num_bytes), kThreads, 0, stream>>>(packed, codes, num_bytes);
  return cudaGetLastError();
}

cudaError_t dequantize_int4(const uint8_t* packed, const float* scales, const uint8_t* zeros, int64_t rows,
                            int64_t K, int64_t group_size, OutType out_type, void* out, cudaStream_t stream) {
  const int64_t num_bytes = rows * (K / 2);
  if (num_bytes == 0) return cudaSuccess;
  const int64_t group_bytes = group_size / 2;
  switch (out_type) {
    case OutType::kFloat32:
      return launch_dequantize<float>(packed, scales, zeros, num_bytes, group_bytes, out, stream);
    case OutType::kFloat16:
      return launch_dequantize<__half>(packed, scales, zeros, num_bytes, group_bytes, out, stream);
    case OutType::kBFloat16:
      return launch_dequantize<__nv_bfloat16>(packed, scales, zeros, num_bytes, group_bytes, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace flux_engine
