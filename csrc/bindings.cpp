// Python bindings of flux_engine._C; the functions themselves are documented in torch/ops.h.
#include <torch/extension.h>

#include "torch/ops.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "flux_engine native kernels (CPU, and CUDA when has_cuda())";
  // Kernels release the GIL: they never touch Python objects.
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("has_cuda", &flux_engine::has_cuda, "True iff the CUDA kernels were compiled in.");
  m.def("permute", &flux_engine::permute, no_gil, py::arg("topk_ids"), py::arg("num_experts"),
        py::arg("expert_map") = py::none(),
        "Routing plan of topk_ids [T, k] int32 over num_experts physical experts, optionally through expert_map "
        "[E_orig] int32: (sorted_token_ids [T*k], expert_offsets [E+1], slot_rows [T, k]), all int32.");
  m.def("pack_int4", &flux_engine::pack_int4, no_gil, py::arg("codes"),
        "codes [..., K] uint8 in 0..15 -> [..., K/2] uint8, column 2j in the low nibble of byte j.");
  m.def("unpack_int4", &flux_engine::unpack_int4, no_gil, py::arg("packed"),
        "packed [..., K/2] uint8 -> codes [..., K] uint8.");
  m.def("dequantize_int4", &flux_engine::dequantize_int4, no_gil, py::arg("packed"), py::arg("scales"),
        py::arg("zeros"), py::arg("group_size"), py::arg("dtype"),
        "packed [..., K/2] uint8, scales [..., K/G] float32, zeros [..., K/G] uint8 or None (zero point 8) -> "
        "[..., K] of dtype (float32, float16, bfloat16): (code - zero) * scale.");
  m.def("dequantize_int8", &flux_engine::dequantize_int8, no_gil, py::arg("data"), py::arg("scales"),
        py::arg("zeros"), py::arg("group_size"), py::arg("dtype"),
        "data [..., K] int8 (zero point 0) or uint8, scales [..., K/G] float32, zeros [..., K/G] uint8 (uint8 data "
        "only) or None (zero point 0) -> [..., K] of dtype (float32, float16, bfloat16): (code - zero) * scale. "
        "CPU tensors only.");
}
