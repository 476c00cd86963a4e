// The CPU kernels are compiled once per instruction set (CMakeLists.txt: portable, avx2,
// avx512, or native alone) and linked into one module; each of those builds defines
// UNMASK_CPU_ISA as its name. An inline function compiled in two of the builds is one
// symbol with two bodies, and the linker keeps one body for every caller: the AVX-512
// body of a header helper could be called by the portable kernels on a CPU without
// AVX-512 (an illegal instruction). So the inline functions of a header that a kernel
// build includes live in a namespace named after its instruction set. Types stay outside
// it: a params struct has one layout for every build. (tests/test_portable_binary.py
// checks the linked module for vector code outside those namespaces.)
#pragma once

#if defined(UNMASK_CPU_ISA)
#define UNMASK_ISA_NAMESPACE_BEGIN inline namespace UNMASK_CPU_ISA {
#define UNMASK_ISA_NAMESPACE_END }
#else
#define UNMASK_ISA_NAMESPACE_BEGIN
#define UNMASK_ISA_NAMESPACE_END
#endif
