// CUDA halves of the ops in ops.h: run the kernels on the inputs' device and current stream. Arguments were
// validated and outputs allocated by the shared code in ops_cpu.cpp.
#include "ops.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "flux_engine/int4.h"
#include "flux_engine/permute.h"

namespace flux_engine {
namespace detail {

void permute_cuda(const at::Tensor& topk_ids, int64_t num_experts, const std::optional<at::Tensor>& expert_map,
                  at::Tensor& sorted_token_ids, at::Tensor& expert_offsets, at::Tensor& slot_rows) {
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const int64_t T = topk_ids.size(0);
  const int64_t k = topk_ids.size(1);
  const size_t workspace_bytes = cuda::permute_workspace_bytes(T, k, num_experts);
  // The caching allocator hands out blocks aligned far beyond the 256 bytes the kernels need, and reuses
  // them in stream order, so no synchronisation is needed before the launch.
  at::Tensor workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, topk_ids.options().dtype(at::kByte));
  C10_CUDA_CHECK(cuda::permute(topk_ids.data_ptr<int32_t>(), T, k,
                               expert_map ? expert_map->data_ptr<int32_t>() : nullptr, num_experts,
                               sorted_token_ids.data_ptr<int32_t>(), expert_offsets.data_ptr<int32_t>(),
                               slot_rows.data_ptr<int32_t>(), workspace.data_ptr(), workspace_bytes,
                               c10::cuda::getCurrentCUDAStream().stream()));
}

void pack_int4_cuda(const at::Tensor& codes, at::Tensor& packed) {
  const c10::cuda::CUDAGuard guard(codes.device());
  C10_CUDA_CHECK(cuda::pack_int4(codes.data_ptr<uint8_t>(), packed.data_ptr<uint8_t>(), packed.numel(),
                                 c10::cuda::getCurrentCUDAStream().stream()));
}

void unpack_int4_cuda(const at::Tensor& packed, at::Tensor& codes) {
  const c10::cuda::CUDAGuard guard(packed.device());
  C10_CUDA_CHECK(cuda::unpack_int4(packed.data_ptr<uint8_t>(), codes.data_ptr<uint8_t>(), packed.numel(),
                                   c10::cuda::getCurrentCUDAStream().stream()));
}

void dequantize_int4_cuda(const at::Tensor& packed, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                          int64_t group_size, OutType out_type, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(packed.device());
  const int64_t K = out.size(-1);
  C10_CUDA_CHECK(cuda::dequantize_int4(packed.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                                       zeros ? zeros->data_ptr<uint8_t>() : nullptr, out.numel() / K, K, group_size,
                                       out_type, out.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace detail
}  // namespace flux_engine
