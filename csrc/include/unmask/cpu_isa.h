// Which instruction-set build of the CPU kernels runs. The module holds one build per set
// it was compiled for (portable, avx2 = x86-64-v3, avx512 = x86-64-v4; or native alone
// with UNMASK_NATIVE_ARCH); at load the best one this CPU supports is chosen.
#pragma once

#include "unmask/status.h"

namespace unmask {

int cpu_isa_count();                      // builds compiled in, best first
const char* cpu_isa_name(int index);      // nullptr outside [0, cpu_isa_count())
bool cpu_isa_supported(const char* name); // compiled in and runnable on this CPU
// Makes `name` the build that sample_cpu, attention_cpu, fill_draws_cpu and
// philox_blocks_cpu call; invalid argument when it is not compiled in or not supported.
Status select_cpu_isa(const char* name);
const char* active_cpu_isa();
// CPUID's vendor string ("GenuineIntel", "AuthenticAMD", ...; empty off x86-64): which
// code paths torch's own CPU kernels take (MKL's fast ones are Intel's) differs by it.
const char* cpu_vendor();

}  // namespace unmask
