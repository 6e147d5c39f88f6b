// Validation and device dispatch shared by both devices, and the CPU halves of the ops in ops.h.
#include "ops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "flux_engine/int4.h"
#include "flux_engine/int8.h"
#include "flux_engine/permute.h"

#ifdef FLUX_ENGINE_WITH_CUDA
#define FLUX_ENGINE_ON_CUDA(call) call
#else
#define FLUX_ENGINE_ON_CUDA(call)                                                       \
  TORCH_CHECK(false, "flux_engine was built without CUDA kernels but got CUDA tensors " \
              "(rebuild with a CUDA build of torch and nvcc)")
#endif

namespace flux_engine {
namespace {

// Work below these sizes is not worth waking another thread for. A permute chunk of 8192 tokens takes about
// 0.25 ms on one core; smaller plans run faster alone than behind a fork/join, which on a busy machine can wait
// a whole scheduler tick for a descheduled worker.
constexpr int64_t kTokensPerChunk = 8192;
constexpr int64_t kBytesPerTask = int64_t{1} << 16;

// Everything check_input asks of a tensor except its dtype.
void check_layout(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " must be a defined tensor");
  TORCH_CHECK(t.dim() >= 1, name, " must have at least one dimension, got a scalar");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.is_cpu() || t.is_cuda(), name, " must be a CPU or CUDA tensor, got ", t.device());
}

void check_input(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  check_layout(t, name);
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device());
}

// scales [..., K/G] float32 and zeros [..., K/G] uint8 (optional) on the device of data [..., *], whose leading
// dimensions they share; G = group_size must already be checked to divide K.
void check_scales_and_zeros(const at::Tensor& scales, const std::optional<at::Tensor>& zeros, int64_t K,
                            int64_t group_size, const at::Tensor& data, const char* data_name) {
  check_input(scales, "scales", at::kFloat);
  check_same_device(scales, "scales", data, data_name);
  std::vector<int64_t> scale_shape = data.sizes().vec();
  scale_shape.back() = K / group_size;
  TORCH_CHECK(scales.sizes() == at::IntArrayRef(scale_shape), "scales must have shape ", at::IntArrayRef(scale_shape),
              " (one per group of ", data_name, " ", data.sizes(), "), got ", scales.sizes());
  if (zeros) {
    check_input(*zeros, "zeros", at::kByte);
    check_same_device(*zeros, "zeros", data, data_name);
    TORCH_CHECK(zeros->sizes() == scales.sizes(), "zeros must have the shape of scales ", scales.sizes(), ", got ",
                zeros->sizes());
  }
}

// [..., K] of dtype for data [..., *]; rows R = the product of the leading dimensions.
at::Tensor empty_dequantized(const at::Tensor& data, int64_t K, at::ScalarType dtype) {
  std::vector<int64_t> shape = data.sizes().vec();
  shape.back() = K;
  return at::empty(shape, data.options().dtype(dtype));
}

// Runs kernel(row_begin, row_end) over the rows of out [R, K] (K > 0) on CPU threads.
template <typename Kernel>
void parallel_over_rows(const at::Tensor& out, int64_t K, const Kernel& kernel) {
  at::parallel_for(0, out.numel() / K, std::max<int64_t>(1, kBytesPerTask / K), kernel);
}

OutType out_type_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return OutType::kFloat32;
    case at::kHalf:
      return OutType::kFloat16;
    case at::kBFloat16:
      return OutType::kBFloat16;
    default:
      TORCH_CHECK(false, "dtype must be float32, float16 or bfloat16, got ", dtype);
  }
}

void permute_cpu(const at::Tensor& topk_ids, int64_t num_experts, const std::optional<at::Tensor>& expert_map,
                 at::Tensor& sorted_token_ids, at::Tensor& expert_offsets, at::Tensor& slot_rows) {
  const int64_t T = topk_ids.size(0);
  const int64_t k = topk_ids.size(1);
  const int32_t* ids = topk_ids.data_ptr<int32_t>();
  const int32_t* map = expert_map ? expert_map->data_ptr<int32_t>() : nullptr;
  const int64_t num_original = expert_map ? expert_map->size(0) : num_experts;
  int32_t* rows = slot_rows.data_ptr<int32_t>();
  int32_t* tokens = sorted_token_ids.data_ptr<int32_t>();

  const int64_t chunks =
      std::min<int64_t>(at::get_num_threads(), (T + kTokensPerChunk - 1) / kTokensPerChunk);
  const auto chunk_begin = [&](int64_t c) { return c * T / chunks; };
  std::vector<int32_t> counts(chunks * num_experts);
  std::vector<char> in_range(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      in_range[c] = cpu::permute_count(ids, k, map, num_original, num_experts, chunk_begin(c), chunk_begin(c + 1),
                                       rows, counts.data() + c * num_experts);
    }
  });
  TORCH_CHECK(std::all_of(in_range.begin(), in_range.end(), [](char ok) { return ok; }),
              "topk_ids must lie in [0, ", num_original, ")",
              expert_map ? " and expert_map in [0, num_experts)" : "", ", num_experts = ", num_experts);
  cpu::permute_scan(counts.data(), chunks, num_experts, expert_offsets.data_ptr<int32_t>(), tokens, T, k);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      cpu::permute_place(k, chunk_begin(c), chunk_begin(c + 1), counts.data() + c * num_experts, rows, tokens);
    }
  });
}

}  // namespace

bool has_cuda() {
#ifdef FLUX_ENGINE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute(const at::Tensor& topk_ids, int64_t num_experts,
                                                       const std::optional<at::Tensor>& expert_map) {
  check_input(topk_ids, "topk_ids", at::kInt);
  TORCH_CHECK(topk_ids.dim() == 2, "topk_ids must have shape [T, k], got ", topk_ids.sizes());
  TORCH_CHECK(num_experts >= 1 && num_experts < std::numeric_limits<int32_t>::max(),
              "num_experts must be a positive int32, got ", num_experts);
  if (expert_map) {
    check_input(*expert_map, "expert_map", at::kInt);
    TORCH_CHECK(expert_map->dim() == 1, "expert_map must have shape [E_orig], got ", expert_map->sizes());
    check_same_device(*expert_map, "expert_map", topk_ids, "topk_ids");
  }
  const int64_t T = topk_ids.size(0);
  const int64_t k = topk_ids.size(1);
  TORCH_CHECK(T * k <= std::numeric_limits<int32_t>::max(), "topk_ids has ", T * k,
              " (token, slot) pairs, more than int32 row indices can address");

  const auto options = topk_ids.options();
  at::Tensor sorted_token_ids = at::empty({T * k}, options);
  at::Tensor expert_offsets = at::empty({num_experts + 1}, options);
  at::Tensor slot_rows = at::empty({T, k}, options);
  if (topk_ids.is_cuda()) {
    FLUX_ENGINE_ON_CUDA(
        detail::permute_cuda(topk_ids, num_experts, expert_map, sorted_token_ids, expert_offsets, slot_rows));
  } else {
    permute_cpu(topk_ids, num_experts, expert_map, sorted_token_ids, expert_offsets, slot_rows);
  }
  return {sorted_token_ids, expert_offsets, slot_rows};
}

at::Tensor pack_int4(const at::Tensor& codes) {
  check_input(codes, "codes", at::kByte);
  TORCH_CHECK(codes.size(-1) % 2 == 0, "codes must have an even last dimension K, got shape ", codes.sizes());
  std::vector<int64_t> shape = codes.sizes().vec();
  shape.back() /= 2;
  at::Tensor packed = at::empty(shape, codes.options());
  if (codes.is_cuda()) {
    FLUX_ENGINE_ON_CUDA(detail::pack_int4_cuda(codes, packed));
  } else {
    const uint8_t* src = codes.data_ptr<uint8_t>();
    uint8_t* dst = packed.data_ptr<uint8_t>();
    at::parallel_for(0, packed.numel(), kBytesPerTask,
                     [&](int64_t begin, int64_t end) { cpu::pack_int4(src, dst, begin, end); });
  }
  return packed;
}

at::Tensor unpack_int4(const at::Tensor& packed) {
  check_input(packed, "packed", at::kByte);
  std::vector<int64_t> shape = packed.sizes().vec();
  shape.back() *= 2;
  at::Tensor codes = at::empty(shape, packed.options());
  if (packed.is_cuda()) {
    FLUX_ENGINE_ON_CUDA(detail::unpack_int4_cuda(packed, codes));
  } else {
    const uint8_t* src = packed.data_ptr<uint8_t>();
    uint8_t* dst = codes.data_ptr<uint8_t>();
    at::parallel_for(0, packed.numel(), kBytesPerTask,
                     [&](int64_t begin, int64_t end) { cpu::unpack_int4(src, dst, begin, end); });
  }
  return codes;
}

at::Tensor dequantize_int4(const at::Tensor& packed, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                           int64_t group_size, at::ScalarType dtype) {
  check_input(packed, "packed", at::kByte);
  const OutType out_type = out_type_of(dtype);
  const int64_t K = packed.size(-1) * 2;
  TORCH_CHECK(group_size >= 2 && group_size % 2 == 0 && K % group_size == 0,
              "group_size must be an even divisor of K = ", K, ", got ", group_size);
  check_scales_and_zeros(scales, zeros, K, group_size, packed, "packed");

  at::Tensor out = empty_dequantized(packed, K, dtype);
  if (out.numel() == 0) return out;
  if (packed.is_cuda()) {
    FLUX_ENGINE_ON_CUDA(detail::dequantize_int4_cuda(packed, scales, zeros, group_size, out_type, out));
  } else {
    const uint8_t* src = packed.data_ptr<uint8_t>();
    const float* scale = scales.data_ptr<float>();
    const uint8_t* zero = zeros ? zeros->data_ptr<uint8_t>() : nullptr;
    void* dst = out.data_ptr();
    parallel_over_rows(out, K, [&](int64_t begin, int64_t end) {
      cpu::dequantize_int4(src, scale, zero, K, group_size, out_type, dst, begin, end);
    });
  }
  return out;
}

at::Tensor dequantize_int8(const at::Tensor& data, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                           int64_t group_size, at::ScalarType dtype) {
  check_layout(data, "data");
  const bool is_signed = data.scalar_type() == at::kChar;
  TORCH_CHECK(is_signed || data.scalar_type() == at::kByte,
              "data must be int8 (symmetric codes) or uint8 (asymmetric codes), got ", data.scalar_type());
  TORCH_CHECK(data.is_cpu(), "dequantize_int8 has no CUDA kernel: data must be a CPU tensor, got ", data.device());
  const OutType out_type = out_type_of(dtype);
  const int64_t K = data.size(-1);
  TORCH_CHECK(group_size >= 1 && K % group_size == 0, "group_size must be a positive divisor of K = ", K, ", got ",
              group_size);
  TORCH_CHECK(!(zeros && is_signed),
              "zeros must be None for int8 data (symmetric codes, zero point 0): asymmetric codes are uint8");
  check_scales_and_zeros(scales, zeros, K, group_size, data, "data");

  at::Tensor out = empty_dequantized(data, K, dtype);
  if (out.numel() == 0) return out;
  const void* src = data.data_ptr();
  const float* scale = scales.data_ptr<float>();
  const uint8_t* zero = zeros ? zeros->data_ptr<uint8_t>() : nullptr;
  void* dst = out.data_ptr();
  parallel_over_rows(out, K, [&](int64_t begin, int64_t end) {
    cpu::dequantize_int8(src, is_signed, scale, zero, K, group_size, out_type, dst, begin, end);
  });
  return out;
}

}  // namespace flux_engine
