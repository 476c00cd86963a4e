// Philox-4x32-10 counter-based RNG (Salmon et al., "Parallel random numbers: as
// easy as 1, 2, 3", SC 2011), shared by the C++ and CUDA kernels.
//
// unmask's stream layout (docs/design.md, RNG): key = (seed low 32 bits, seed high 32
// bits), counter = (col / 4, row, offset, stream); the draw for (row, col) is word
// col % 4 of the block. A counter-based generator lets every thread compute its own
// noise from its coordinates, with no state to carry between kernels, and gives the
// same bits on every backend.
#pragma once

#include <cstdint>

#include "unmask/isa_namespace.h"

#if defined(__CUDACC__)
#define UNMASK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define UNMASK_HOST_DEVICE inline
#endif

namespace unmask {

enum class RngStream : uint32_t { kGumbel = 0, kRandomConfidence = 1 };

struct Philox4x32 {
  uint32_t v[4];
};

UNMASK_BUILD_NAMESPACE_BEGIN

namespace philox_detail {
constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kWeyl1 = 0xBB67AE85u;  // sqrt(3) - 1

UNMASK_HOST_DEVICE void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}
}  // namespace philox_detail

// Ten rounds of the Philox S-box with the key bumped by the Weyl constants between
// rounds: the Random123 "philox4x32_10" generator, bit for bit.
UNMASK_HOST_DEVICE Philox4x32 philox4x32_10(Philox4x32 counter, uint32_t key0, uint32_t key1) {
  using namespace philox_detail;
  uint32_t c0 = counter.v[0], c1 = counter.v[1], c2 = counter.v[2], c3 = counter.v[3];
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kMul0, c0, hi0, lo0);
    mulhilo(kMul1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ key0;
    const uint32_t n2 = hi0 ^ c3 ^ key1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  return Philox4x32{{c0, c1, c2, c3}};
}

// The four draws covering columns 4 * (col / 4) .. 4 * (col / 4) + 3 of one row:
// kernels that walk a row four columns at a time call this once per quad.
UNMASK_HOST_DEVICE Philox4x32 unmask_draw_quad(uint64_t seed, uint32_t col_quad, uint32_t row,
                                               uint32_t offset, RngStream stream) {
  return philox4x32_10(Philox4x32{{col_quad, row, offset, static_cast<uint32_t>(stream)}},
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

UNMASK_HOST_DEVICE uint32_t unmask_draw(uint64_t seed, uint32_t col, uint32_t row, uint32_t offset,
                                        RngStream stream) {
  return unmask_draw_quad(seed, col / 4, row, offset, stream).v[col % 4];
}

// u = ((w >> 8) + 0.5) / 2^24, in (0, 1) and exact in double. (In float the
// numerator needs 25 bits and u could round to 1.0, giving infinite Gumbel noise.)
UNMASK_HOST_DEVICE double uniform_from_draw(uint32_t w) {
  return (static_cast<double>(w >> 8) + 0.5) * (1.0 / 16777216.0);
}

UNMASK_BUILD_NAMESPACE_END

}  // namespace unmask
