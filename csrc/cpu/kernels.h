// The CPU kernels of one instruction-set build as a table of entry points: each build
// defines unmask::cpu::<isa>::kernel_table (kernel_table.cpp), and isa_select.cpp, compiled
// once for the baseline, calls through the table of the set chosen at import.
#pragma once

#include "unmask/attention.h"
#include "unmask/moe.h"
#include "unmask/rms_norm.h"
#include "unmask/rng.h"
#include "unmask/rotary.h"
#include "unmask/sample.h"
#include "unmask/status.h"

namespace unmask::cpu {

struct KernelTable {
  Status (*sample)(const SampleParams&);
  Status (*attention)(const AttentionParams&);
  Status (*fill_draws)(const DrawParams&);
  Status (*philox_blocks)(const PhiloxBlockParams&);
  Status (*rms_norm)(const RmsNormParams&);
  Status (*rotary)(const RotaryParams&);
  Status (*moe_swiglu)(const MoeParams&);
};

#if defined(UNMASK_CPU_ISA)
inline namespace UNMASK_CPU_ISA {
Status sample(const SampleParams& params);        // sample.cpp
Status attention(const AttentionParams& params);  // attention.cpp
Status fill_draws(const DrawParams& params);      // rng.cpp
Status philox_blocks(const PhiloxBlockParams& params);
Status rms_norm(const RmsNormParams& params);     // rms_norm.cpp
Status rotary(const RotaryParams& params);        // rotary.cpp
Status moe_swiglu(const MoeParams& params);      // moe.cpp
extern const KernelTable kernel_table;            // kernel_table.cpp
}  // namespace UNMASK_CPU_ISA
#endif

}  // namespace unmask::cpu
