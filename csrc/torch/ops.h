// Tensor-level API of flux_engine's native kernels (the functions flux_engine._C exports).
//
// Every function validates its arguments with TORCH_CHECK (naming the argument), allocates its outputs on the
// inputs' device and runs the CPU or the CUDA kernels according to that device. CUDA tensors raise an error
// when the library was built without CUDA kernels (see has_cuda()).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <tuple>

#ifdef FLUX_ENGINE_WITH_CUDA
#include "flux_engine/int4.h"
#endif

namespace flux_engine {

// True iff the CUDA kernels were compiled in.
bool has_cuda();

// Routing plan of topk_ids over num_experts physical experts (semantics in flux_engine/permute.h).
//   topk_ids:   [T, k] int32, contiguous, ids in [0, E_orig)
//   expert_map: optional [E_orig] int32, contiguous, values in [0, num_experts); same device
// Returns (sorted_token_ids [T*k], expert_offsets [E+1], slot_rows [T, k]), all int32. Ids are range-checked on
// CPU; on CUDA they are trusted (validate them asynchronously beforehand).
std::tuple<at::Tensor, at::Tensor, at::Tensor> permute(const at::Tensor& topk_ids, int64_t num_experts,
                                                       const std::optional<at::Tensor>& expert_map);

// codes [..., K] uint8 in 0..15, K even -> [..., K/2] uint8, column 2j in the low nibble of byte j.
at::Tensor pack_int4(const at::Tensor& codes);

// packed [..., K/2] uint8 -> codes [..., K] uint8.
at::Tensor unpack_int4(const at::Tensor& packed);

// packed [..., K/2] uint8, scales [..., K/G] float32, zeros optional [..., K/G] uint8 (None: zero point 8), G even
// and dividing K -> [..., K] of dtype (float32, float16 or bfloat16): (code - zero) * scale in float32, rounded
// to dtype.
at::Tensor dequantize_int4(const at::Tensor& packed, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                           int64_t group_size, at::ScalarType dtype);

// data [..., K] int8 (symmetric codes -127..127) or uint8 (codes 0..255), scales [..., K/G] float32, zeros
// optional [..., K/G] uint8 with uint8 data only (None: zero point 0), G >= 1 dividing K -> [..., K] of dtype
// (float32, float16 or bfloat16): (code - zero) * scale in float32, rounded to dtype. CPU tensors only: there is
// no CUDA int8 kernel, so CUDA tensors raise.
at::Tensor dequantize_int8(const at::Tensor& data, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                           int64_t group_size, at::ScalarType dtype);

#ifdef FLUX_ENGINE_WITH_CUDA
namespace detail {

// CUDA halves of the functions above (ops_cuda.cpp): arguments are validated and outputs allocated on the
// inputs' device by the caller.
void permute_cuda(const at::Tensor& topk_ids, int64_t num_experts, const std::optional<at::Tensor>& expert_map,
                  at::Tensor& sorted_token_ids, at::Tensor& expert_offsets, at::Tensor& slot_rows);
void pack_int4_cuda(const at::Tensor& codes, at::Tensor& packed);
void unpack_int4_cuda(const at::Tensor& packed, at::Tensor& codes);
void dequantize_int4_cuda(const at::Tensor& packed, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                          int64_t group_size, OutType out_type, at::Tensor& out);

}  // namespace detail
#endif

}  // namespace flux_engine
