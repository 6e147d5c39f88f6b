// Output element type of the dequantize kernels (int4.h, int8.h).
#pragma once

namespace flux_engine {

// 16-bit types round to nearest even.
enum class OutType { kFloat32, kFloat16, kBFloat16 };

}  // namespace flux_engine
