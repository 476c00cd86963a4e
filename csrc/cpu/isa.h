// Every file in csrc/cpu but commit.cpp and isa_select.cpp is compiled once per
// instruction set (CMakeLists.txt), with UNMASK_CPU_ISA naming the build; its functions
// live in the namespace unmask::cpu::<isa> (see unmask/isa_namespace.h for why).
#pragma once

#if !defined(UNMASK_CPU_ISA)
#error "csrc/cpu kernels are compiled once per instruction set: the build defines UNMASK_CPU_ISA"
#endif
