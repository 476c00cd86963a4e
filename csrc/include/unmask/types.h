#pragma once

namespace unmask {

// Element types of kernel inputs; the numbering is shared with python/unmask/native.py.
enum class ScalarType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace unmask
