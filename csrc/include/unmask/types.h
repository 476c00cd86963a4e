#pragma once

namespace unmask {

// Element types of kernel inputs; bound to Python as unmask._C.ScalarType.
enum class ScalarType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace unmask
