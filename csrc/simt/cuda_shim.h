// What a CUDA source sees when it is compiled as host C++ for the SIMT interpreter
// (UNMASK_SIMT; csrc/simt/include holds cuda_runtime.h, cuda_bf16.h and cuda_fp16.h,
// which include this file). It covers what csrc/cuda uses: the qualifiers, the built-in
// indices, shared memory, the warp intrinsics, atomics, the vector and 16-bit float
// types, and the runtime calls of the launchers; runtime.h does the work.
#pragma once

#include <math.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "simt/runtime.h"

// ------------------------------------------------------------------ qualifiers

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Static shared variables are declared with UNMASK_SHARED / UNMASK_SHARED_ARRAY
// (cuda_check.cuh), which the runtime places, poisons per block and checks; a bare
// __shared__ would be a static the checks cannot see, so it does not compile here.
#define __shared__ _Pragma("GCC error \"declare static shared memory with UNMASK_SHARED (cuda_check.cuh)\"")

// The built-in indices: the runtime sets them before it resumes a thread.
inline const simt::Index3& threadIdx = simt::builtins.thread_idx;
inline const simt::Index3& blockIdx = simt::builtins.block_idx;
inline const simt::Index3& blockDim = simt::builtins.block_dim;
inline const simt::Index3& gridDim = simt::builtins.grid_dim;

using std::isnan;

// ------------------------------------------------------------------ vector types

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

// ------------------------------------------------------------------ 16-bit floats

struct alignas(2) __nv_bfloat16 { uint16_t bits; };
struct alignas(2) __half { uint16_t bits; };
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
struct alignas(4) __half2 { __half x, y; };

namespace simt {
inline uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}
inline float bits_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}
// Round to nearest even; NaN stays a quiet NaN.
inline uint16_t float_to_bf16_bits(float value) {
  const uint32_t bits = float_bits(value);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return bits_float(sign | 0x7F800000u | (mantissa << 13));  // inf, NaN
  return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}
// Round to nearest even, overflow to inf, subnormal halves.
inline uint16_t float_to_half_bits(float value) {
  const uint32_t bits = float_bits(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return sign | 0x7E00u;
  if (magnitude >= 0x477FF000u) return sign | 0x7C00u;
  if (magnitude < 0x38800000u) {
    return sign | static_cast<uint16_t>(std::nearbyint(bits_float(magnitude) * 16777216.0f));
  }
  const uint32_t rebiased = magnitude - 0x38000000u;
  return sign | static_cast<uint16_t>((rebiased + 0xFFFu + ((rebiased >> 13) & 1u)) >> 13);
}
}  // namespace simt

inline float __bfloat162float(__nv_bfloat16 value) { return simt::bits_float(static_cast<uint32_t>(value.bits) << 16); }
inline float __half2float(__half value) { return simt::half_bits_to_float(value.bits); }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return __nv_bfloat162{{simt::float_to_bf16_bits(lo)}, {simt::float_to_bf16_bits(hi)}};
}
inline __half2 __floats2half2_rn(float lo, float hi) {
  return __half2{{simt::float_to_half_bits(lo)}, {simt::float_to_half_bits(hi)}};
}

// ------------------------------------------------------------------ math and intrinsics

inline float __expf(float x) { return std::exp(x); }
inline unsigned __float_as_uint(float x) { return simt::float_bits(x); }
inline float __uint_as_float(unsigned x) { return simt::bits_float(x); }
inline float __log2f(float x) { return std::log2(x); }

inline void __syncthreads() { simt::sync_threads(); }
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) { simt::sync_warp(mask); }
inline unsigned __ballot_sync(unsigned mask, int predicate) { return simt::ballot(mask, predicate != 0); }

namespace simt {
template <typename T>
T shuffle_value(unsigned mask, T value, Shuffle mode, int lane_arg, int width) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "a shuffle moves at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = shuffle(mask, bits, mode, lane_arg, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
}  // namespace simt

template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = 32) {
  return simt::shuffle_value(mask, value, simt::Shuffle::kIndex, src_lane, width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return simt::shuffle_value(mask, value, simt::Shuffle::kUp, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return simt::shuffle_value(mask, value, simt::Shuffle::kDown, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return simt::shuffle_value(mask, value, simt::Shuffle::kXor, lane_mask, width);
}

inline int atomicAdd(int* address, int value) { return simt::atomic_add(address, value); }
inline unsigned atomicAdd(unsigned* address, unsigned value) { return simt::atomic_add(address, value); }
inline float atomicAdd(float* address, float value) { return simt::atomic_add(address, value); }

inline size_t __cvta_generic_to_shared(const void* pointer) { return simt::shared_address(pointer); }

// ------------------------------------------------------------------ runtime API

using cudaStream_t = struct simt_stream*;
enum cudaError_t : int { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
enum cudaDeviceAttr : int { cudaDevAttrMultiProcessorCount = 16 };
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  void* attrs;
  unsigned numAttrs;
};

namespace simt {
cudaError_t take_launch_error();  // runtime.cpp: the pending launch error, cleared
const char* error_string(cudaError_t error);
}  // namespace simt

inline cudaError_t cudaGetLastError() { return simt::take_launch_error(); }
inline const char* cudaGetErrorString(cudaError_t error) { return simt::error_string(error); }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int) {
  *value = attribute == cudaDevAttrMultiProcessorCount ? simt::sm_count() : 0;
  return cudaSuccess;
}
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0) return cudaErrorInvalidValue;
  simt::allow_dynamic_shared(reinterpret_cast<const void*>(kernel), static_cast<size_t>(value));
  return cudaSuccess;
}

namespace simt {
void set_launch_error();  // runtime.cpp: a launch failed (its message is the session's error)

// cudaLaunchKernelEx for the interpreter: the arguments are copied into one block that
// every thread reads, and each thread calls the kernel with them.
template <typename... Params, typename... Args>
void launch(const char* name, const cudaLaunchConfig_t& config, void (*kernel)(Params...), Args&&... args) {
  struct Launch {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> arguments;
  };
  const Launch launch{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
  const Entry entry = [](void* context) {
    const Launch* self = static_cast<const Launch*>(context);
    std::apply(self->kernel, self->arguments);
  };
  const Index3 grid{config.gridDim.x, config.gridDim.y, config.gridDim.z};
  const Index3 block{config.blockDim.x, config.blockDim.y, config.blockDim.z};
  if (!run_grid(name, reinterpret_cast<const void*>(kernel), grid, block, config.dynamicSmemBytes, entry, &launch, sizeof(launch))) set_launch_error();
}
}  // namespace simt
