// This instruction-set build's entry points, for the dispatcher (isa_select.cpp).
#include "kernels.h"

namespace unmask::cpu {
inline namespace UNMASK_CPU_ISA {

const KernelTable kernel_table = {&sample, &attention, &fill_draws, &philox_blocks, &rms_norm, &rotary,
                                   &moe_swiglu};

}  // namespace UNMASK_CPU_ISA
}  // namespace unmask::cpu
