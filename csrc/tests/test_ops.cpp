// C++ tests of the tensor-level API (torch/ops.h) on CPU tensors; registered with CTest.
#include <ATen/ATen.h>

#include <cstdint>
#include <iostream>
#include <vector>

#include "torch/ops.h"

namespace {

int failures = 0;

#define EXPECT(cond)                                                    \
  do {                                                                  \
    if (!(cond)) {                                                      \
      std::cerr << __FILE__ << ":" << __LINE__ << ": " #cond << "\n"; \
      ++failures;                                                       \
    }                                                                   \
  } while (0)

template <typename T>
at::Tensor make(std::vector<T> values, at::IntArrayRef shape, at::ScalarType dtype) {
  return at::from_blob(values.data(), shape, dtype).clone();
}

at::Tensor ints(std::vector<int32_t> values, at::IntArrayRef shape) { return make(std::move(values), shape, at::kInt); }

template <typename Fn>
bool throws(Fn fn) {
  try {
    fn();
  } catch (const c10::Error&) {
    return true;
  }
  return false;
}

void test_permute_without_map() {
  // Token 1 picks expert 1 twice: one row. Rows: e0 {t0, t2}, e1 {t0, t1}, e2 {t2}, then filler T = 3.
  auto [tokens, offsets, slot_rows] = flux_engine::permute(ints({1, 0, 1, 1, 0, 2}, {3, 2}), 3, std::nullopt);
  EXPECT(tokens.equal(ints({0, 2, 0, 1, 2, 3}, {6})));
  EXPECT(offsets.equal(ints({0, 2, 4, 5}, {4})));
  EXPECT(slot_rows.equal(ints({2, 0, 3, 3, 1, 4}, {3, 2})));
}

void test_permute_with_many_to_one_map() {
  // Originals {1, 3} -> physical 0 and {0, 2} -> physical 1. Tokens 0, 1 and 3 hit one physical expert
  // with both slots and get one row each. Rows: e0 {t1, t2, t3}, e1 {t0, t2}, then filler T = 4.
  const at::Tensor expert_map = ints({1, 0, 1, 0}, {4});
  auto [tokens, offsets, slot_rows] = flux_engine::permute(ints({0, 2, 1, 3, 0, 1, 3, 3}, {4, 2}), 2, expert_map);
  EXPECT(tokens.equal(ints({1, 2, 3, 0, 2, 4, 4, 4}, {8})));
  EXPECT(offsets.equal(ints({0, 3, 5}, {3})));
  EXPECT(slot_rows.equal(ints({3, 3, 0, 0, 4, 1, 2, 2}, {4, 2})));
}

void test_permute_edge_cases() {
  auto [tokens, offsets, slot_rows] = flux_engine::permute(at::zeros({0, 4}, at::kInt), 3, std::nullopt);
  EXPECT(tokens.numel() == 0);
  EXPECT(offsets.equal(ints({0, 0, 0, 0}, {4})));
  EXPECT(slot_rows.sizes() == at::IntArrayRef({0, 4}));
  EXPECT(throws([] { flux_engine::permute(ints({0, 3}, {1, 2}), 3, std::nullopt); }));
  EXPECT(throws([] { flux_engine::permute(ints({0, 1}, {1, 2}), 2, ints({0, 2}, {2})); }));
  EXPECT(throws([] { flux_engine::permute(at::zeros({2, 2}, at::kLong), 2, std::nullopt); }));
}

void test_int4_round_trip() {
  const int64_t rows = 3, K = 16, group = 8;
  const at::Tensor codes = at::arange(rows * K, at::kInt).remainder(16).to(at::kByte).reshape({rows, K});
  const at::Tensor packed = flux_engine::pack_int4(codes);
  EXPECT(packed.sizes() == at::IntArrayRef({rows, K / 2}));
  EXPECT(packed[0][0].item<uint8_t>() == (0 | 1 << 4));
  EXPECT(packed[0][7].item<uint8_t>() == (14 | 15 << 4));
  EXPECT(flux_engine::unpack_int4(packed).equal(codes));
  EXPECT(throws([] { flux_engine::pack_int4(at::zeros({2, 3}, at::kByte)); }));

  const at::Tensor scales = at::rand({rows, K / group});
  const at::Tensor zeros = at::randint(0, 16, {rows, K / group}, at::kByte);
  const at::Tensor groups = codes.to(at::kFloat).reshape({rows, K / group, group});
  const at::Tensor sym = ((groups - 8) * scales.unsqueeze(-1)).reshape({rows, K});
  const at::Tensor asym = ((groups - zeros.to(at::kFloat).unsqueeze(-1)) * scales.unsqueeze(-1)).reshape({rows, K});
  for (const auto dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    EXPECT(flux_engine::dequantize_int4(packed, scales, std::nullopt, group, dtype).equal(sym.to(dtype)));
    EXPECT(flux_engine::dequantize_int4(packed, scales, zeros, group, dtype).equal(asym.to(dtype)));
  }
  EXPECT(throws([&] { flux_engine::dequantize_int4(packed, scales, std::nullopt, 6, at::kFloat); }));
  EXPECT(throws([&] { flux_engine::dequantize_int4(packed, scales, std::nullopt, group, at::kInt); }));
}

void test_int8_dequantize() {
  // K = 12 in groups of 4; codes cover both ends of the int8 and uint8 ranges.
  const int64_t rows = 2, K = 12, group = 4;
  const at::Tensor wide = at::arange(rows * K, at::kInt).mul(23).remainder(256).reshape({rows, K});
  const at::Tensor signed_codes = wide.sub(128).to(at::kChar);
  const at::Tensor unsigned_codes = wide.to(at::kByte);
  const at::Tensor scales = at::rand({rows, K / group});
  const at::Tensor zeros = at::randint(0, 256, {rows, K / group}, at::kByte);
  const auto by_group = [&](const at::Tensor& codes) { return codes.to(at::kFloat).reshape({rows, K / group, group}); };
  const at::Tensor sym = (by_group(signed_codes) * scales.unsqueeze(-1)).reshape({rows, K});
  const at::Tensor asym =
      ((by_group(unsigned_codes) - zeros.to(at::kFloat).unsqueeze(-1)) * scales.unsqueeze(-1)).reshape({rows, K});
  for (const auto dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    EXPECT(flux_engine::dequantize_int8(signed_codes, scales, std::nullopt, group, dtype).equal(sym.to(dtype)));
    EXPECT(flux_engine::dequantize_int8(unsigned_codes, scales, zeros, group, dtype).equal(asym.to(dtype)));
  }
  // Per-channel and single-column groups.
  const at::Tensor row_scales = at::rand({rows, 1});
  EXPECT(flux_engine::dequantize_int8(signed_codes, row_scales, std::nullopt, K, at::kFloat)
             .equal(signed_codes.to(at::kFloat) * row_scales));
  const at::Tensor column_scales = at::rand({rows, K});
  EXPECT(flux_engine::dequantize_int8(signed_codes, column_scales, std::nullopt, 1, at::kBFloat16)
             .equal((signed_codes.to(at::kFloat) * column_scales).to(at::kBFloat16)));
  EXPECT(flux_engine::dequantize_int8(at::zeros({0, K}, at::kChar), at::zeros({0, 3}), std::nullopt, group, at::kHalf)
             .sizes() == at::IntArrayRef({0, K}));

  EXPECT(throws([&] { flux_engine::dequantize_int8(signed_codes, scales, zeros, group, at::kFloat); }));
  EXPECT(throws([&] { flux_engine::dequantize_int8(wide, scales, std::nullopt, group, at::kFloat); }));
  EXPECT(throws([&] { flux_engine::dequantize_int8(signed_codes, scales, std::nullopt, 5, at::kFloat); }));
  EXPECT(throws([&] { flux_engine::dequantize_int8(signed_codes, row_scales, std::nullopt, group, at::kFloat); }));
  EXPECT(throws([&] { flux_engine::dequantize_int8(signed_codes, scales, std::nullopt, group, at::kDouble); }));
}

}  // namespace

int main() {
  test_permute_without_map();
  test_permute_with_many_to_one_map();
  test_permute_edge_cases();
  test_int4_round_trip();
  test_int8_dequantize();
  std::cout << "flux_engine C++ ops (has_cuda=" << flux_engine::has_cuda() << "): "
            << (failures ? "FAILED" : "passed") << "\n";
  return failures ? 1 : 0;
}
