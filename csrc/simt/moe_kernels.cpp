// csrc/cuda/moe.cu compiled as host C++ for the SIMT interpreter (CMakeLists.txt adds
// UNMASK_SIMT, csrc/simt/include for the CUDA headers, and the access instrumentation).
#include "cuda/moe.cu"
