// Some sources are compiled more than once into the one module: the CPU kernels once per
// instruction set (CMakeLists.txt: portable, avx2, avx512, or native alone; each build
// defines UNMASK_CPU_ISA as its name), and the CUDA sources once more as host C++ for the
// SIMT interpreter (csrc/simt; UNMASK_SIMT). An inline function compiled in two of the
// builds is one symbol with two bodies, and the linker keeps one body for every caller:
// the AVX-512 body of a header helper could be called by the portable kernels on a CPU
// without AVX-512 (an illegal instruction), and the interpreter's instrumented body by
// real launches. So the inline functions of a header that such a build includes, and the
// CUDA launchers, live in a namespace named after the build. Types stay outside it: a
// params struct has one layout for every build. (tests/test_portable_binary.py checks
// the linked module for vector code outside the CPU builds' namespaces.)
#pragma once

#if defined(UNMASK_CPU_ISA)
#define UNMASK_BUILD_NAMESPACE_BEGIN inline namespace UNMASK_CPU_ISA {
#define UNMASK_BUILD_NAMESPACE_END }
#elif defined(UNMASK_SIMT)
#define UNMASK_BUILD_NAMESPACE_BEGIN inline namespace simt {
#define UNMASK_BUILD_NAMESPACE_END }
#else
#define UNMASK_BUILD_NAMESPACE_BEGIN
#define UNMASK_BUILD_NAMESPACE_END
#endif
