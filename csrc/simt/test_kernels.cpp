// The interpreter's own test kernels, written as CUDA and compiled like csrc/cuda for the
// interpreter only (tests/test_simt.py): the per-lane layouts of ldmatrix and mma, a
// small GEMM through them, and kernels broken on purpose that the checks must catch.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstring>
#include <string>

#include "cuda/cuda_check.cuh"
#include "simt/launchers.h"

namespace {

using unmask::launch_kernel;

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// Four 8 x 8 matrices of 16-bit codes (data, 512 bytes) into shared memory; each lane
// gives the address of row lane % 8 of matrix lane / 8, and writes the four registers
// ldmatrix gives it (then those of ldmatrix.trans) to out: [2][32 lanes][4] words.
__global__ void ldmatrix_layout_kernel(const uint4* data, uint32_t* out) {
  UNMASK_DYNAMIC_SHARED(uint4, tile);
  for (int i = threadIdx.x; i < 32; i += 32) tile[i] = data[i];
  __syncthreads();
  const int lane = threadIdx.x;
  const uint32_t row = shared_address(tile) + static_cast<uint32_t>((lane / 8) * 128 + (lane % 8) * 16);
  uint32_t r[4];
  ::simt::ldmatrix_x4(r, row, false);
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = r[i];
  ::simt::ldmatrix_x4(r, row, true);
  for (int i = 0; i < 4; ++i) out[128 + lane * 4 + i] = r[i];
}

// D [16 x 16] = A [16 x 16] B with A row-major (bf16) and B given two ways: as Bt [n][k]
// (the K operand of Q K^T: plain ldmatrix) and as B [k][n] (the V operand of P V:
// ldmatrix.trans), the addressing of csrc/cuda/attention.cu. data: A, Bt, B (3 x 512
// bytes); out: D twice, float [2][16][16].
__global__ void gemm_kernel(const uint4* data, float* out) {
  UNMASK_DYNAMIC_SHARED(uint4, tile);
  for (int i = threadIdx.x; i < 96; i += 32) tile[i] = data[i];
  __syncthreads();
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  const uint32_t a_base = shared_address(tile), bt_base = a_base + 512, b_base = a_base + 1024;
  uint32_t a[4];
  // Lanes 0-15 address rows 0-15 at chunk 0 (k 0-7), lanes 16-31 the same rows at chunk 1.
  ::simt::ldmatrix_x4(a, a_base + static_cast<uint32_t>((lane % 16) * 32 + (lane / 16) * 16), false);
  for (int variant = 0; variant < 2; ++variant) {
    uint32_t b[4];
    if (variant == 0) {  // Bt rows are n: lanes 0-7 / 8-15 / 16-23 / 24-31 give n 0-7 k 0-7 / n 0-7 k 8-15 / ...
      const int n = lane % 8 + (lane / 16) * 8, chunk = (lane / 8) % 2;
      ::simt::ldmatrix_x4(b, bt_base + static_cast<uint32_t>(n * 32 + chunk * 16), false);
    } else {  // B rows are k: lanes 0-15 give k 0-15 at n 0-7, lanes 16-31 at n 8-15
      ::simt::ldmatrix_x4(b, b_base + static_cast<uint32_t>((lane % 16) * 32 + (lane / 16) * 16), true);
    }
    for (int nb = 0; nb < 2; ++nb) {
      float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      ::simt::mma_m16n8k16(c, a, b[2 * nb], b[2 * nb + 1], ::simt::MmaType::kBFloat16);
      for (int i = 0; i < 4; ++i) {
        const int row = g + (i >= 2 ? 8 : 0), col = nb * 8 + 2 * t + (i & 1);
        out[variant * 256 + row * 16 + col] = c[i];
      }
    }
  }
}

// One mma.m16n8k16 (bf16) on per-lane fragments given as data: lane l's a[0..3], b0, b1
// as words and c[0..3] as floats, 10 words per lane; out: each lane's d[0..3].
__global__ void mma_fragments_kernel(const uint32_t* data, float* out) {
  const int lane = threadIdx.x;
  const uint32_t* mine = data + lane * 10;
  const uint32_t a[4] = {mine[0], mine[1], mine[2], mine[3]};
  float c[4];
  std::memcpy(c, mine + 6, sizeof(c));
  ::simt::mma_m16n8k16(c, a, mine[4], mine[5], ::simt::MmaType::kBFloat16);
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = c[i];
}

// Warp 0 writes shared memory and warp 1 reads it: with the barrier, correct; without, a race.
template <bool kBarrier>
__global__ void handoff_kernel(const float* data, float* out) {
  UNMASK_DYNAMIC_SHARED(float, buffer);
  if (threadIdx.x < 32) buffer[threadIdx.x] = data[threadIdx.x] * 2.0f;
  if (kBarrier) __syncthreads();
  if (threadIdx.x >= 32) out[threadIdx.x - 32] = buffer[threadIdx.x - 32];
}

// Lane 0 writes, lane 1 reads, in one warp: ordered only by a __syncwarp between them.
template <bool kSyncWarp>
__global__ void lane_handoff_kernel(const float* data, float* out) {
  UNMASK_DYNAMIC_SHARED(float, buffer);
  if (threadIdx.x == 0) buffer[0] = data[0];
  if (kSyncWarp) __syncwarp();
  if (threadIdx.x == 1) out[0] = buffer[0];
}

// Lane 0 writes, lane 1 reads, in one warp, with only a shuffle between: a shuffle
// exchanges registers but orders no memory, so this is a race.
__global__ void shuffle_ordered_handoff_kernel(const float* data, float* out) {
  UNMASK_DYNAMIC_SHARED(float, buffer);
  if (threadIdx.x == 0) buffer[0] = data[0];
  const float token = __shfl_xor_sync(0xFFFFFFFFu, data[threadIdx.x], 1);
  if (threadIdx.x == 1) out[0] = buffer[0] + 0.0f * token;
}

// A static shared counter: thread 0 zeroes it, every thread adds one atomically, thread 0
// writes the total. Without the barrier after the zeroing, the atomics race with it.
template <bool kBarrier>
__global__ void static_counter_kernel(const float*, float* out) {
  UNMASK_SHARED(int, counter);
  if (threadIdx.x == 0) counter = 0;
  if (kBarrier) __syncthreads();
  atomicAdd(&counter, 1);
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<float>(counter);
}

// Writes one element past a static shared array of 32 floats.
__global__ void static_overflow_kernel(const float* data, float* out) {
  UNMASK_SHARED_ARRAY(float, values, 32);
  values[threadIdx.x] = data[threadIdx.x];  // 33 threads
  __syncthreads();
  out[threadIdx.x] = values[threadIdx.x];
}

// Copies n floats with an off-by-one bound (<= n): the last read and write run past the buffers.
__global__ void off_by_one_kernel(const float* data, float* out, int n) {
  for (int i = threadIdx.x; i <= n; i += blockDim.x) out[i] = data[i];
}

// Writes one float past the dynamic shared memory the launch declared.
__global__ void shared_overflow_kernel(const float* data, float* out) {
  UNMASK_DYNAMIC_SHARED(float, buffer);
  buffer[threadIdx.x] = data[threadIdx.x];  // 33 threads, 32 floats declared
  __syncthreads();
  out[threadIdx.x] = buffer[threadIdx.x];
}

// cp.async of 16 bytes into shared memory, then a read: after the wait it sees the data;
// before the wait the read is an error (on a GPU it may see either bytes).
template <bool kWait>
__global__ void cp_async_kernel(const uint4* data, uint4* out) {
  UNMASK_DYNAMIC_SHARED(uint4, tile);
  tile[threadIdx.x] = uint4{0u, 0u, 0u, 0u};
  __syncthreads();
  ::simt::cp_async_16(shared_address(tile + threadIdx.x), data + threadIdx.x, true);
  ::simt::cp_async_commit();
  if (kWait) ::simt::cp_async_wait_all();
  out[threadIdx.x] = tile[threadIdx.x];
  if (!kWait) ::simt::cp_async_wait_all();  // (every copy must land before the thread ends)
}

// Half the block returns before a barrier the other half waits at.
__global__ void divergent_barrier_kernel(const float* data, float* out) {
  if (threadIdx.x < 16) return;
  __syncthreads();
  out[threadIdx.x] = data[threadIdx.x];
}

// Half the warp skips a shuffle the other half waits in.
__global__ void divergent_shuffle_kernel(const float* data, float* out) {
  float value = data[threadIdx.x];
  if (threadIdx.x < 16) value = __shfl_xor_sync(0xFFFFFFFFu, value, 1);
  out[threadIdx.x] = value;
}

}  // namespace

namespace simt {

unmask::Status test_kernel(const std::string& name, void* data, int64_t, void* out, int64_t) {
  const auto* f_in = static_cast<const float*>(data);
  auto* f_out = static_cast<float*>(out);
  const auto* v_in = static_cast<const uint4*>(data);
  if (name == "ldmatrix_layout") {
    launch_kernel("ldmatrix_layout_kernel", ldmatrix_layout_kernel, dim3(1), dim3(32), 512, nullptr, v_in,
                  static_cast<uint32_t*>(out));
  } else if (name == "mma_fragments") {
    launch_kernel("mma_fragments_kernel", mma_fragments_kernel, dim3(1), dim3(32), 0, nullptr,
                  static_cast<const uint32_t*>(data), f_out);
  } else if (name == "gemm") {
    launch_kernel("gemm_kernel", gemm_kernel, dim3(1), dim3(32), 1536, nullptr, v_in, f_out);
  } else if (name == "handoff") {
    launch_kernel("handoff_kernel", handoff_kernel<true>, dim3(1), dim3(64), 128, nullptr, f_in, f_out);
  } else if (name == "handoff_missing_barrier") {
    launch_kernel("handoff_kernel", handoff_kernel<false>, dim3(1), dim3(64), 128, nullptr, f_in, f_out);
  } else if (name == "lane_handoff") {
    launch_kernel("lane_handoff_kernel", lane_handoff_kernel<true>, dim3(1), dim3(32), 4, nullptr, f_in, f_out);
  } else if (name == "lane_handoff_missing_syncwarp") {
    launch_kernel("lane_handoff_kernel", lane_handoff_kernel<false>, dim3(1), dim3(32), 4, nullptr, f_in, f_out);
  } else if (name == "shuffle_ordered_handoff") {
    launch_kernel("shuffle_ordered_handoff_kernel", shuffle_ordered_handoff_kernel, dim3(1), dim3(32), 4, nullptr,
                  f_in, f_out);
  } else if (name == "static_counter") {
    launch_kernel("static_counter_kernel", static_counter_kernel<true>, dim3(3), dim3(64), 0, nullptr, f_in, f_out);
  } else if (name == "static_counter_missing_barrier") {
    launch_kernel("static_counter_kernel", static_counter_kernel<false>, dim3(3), dim3(64), 0, nullptr, f_in, f_out);
  } else if (name == "static_overflow") {
    launch_kernel("static_overflow_kernel", static_overflow_kernel, dim3(1), dim3(33), 0, nullptr, f_in, f_out);
  } else if (name == "off_by_one") {
    launch_kernel("off_by_one_kernel", off_by_one_kernel, dim3(1), dim3(32), 0, nullptr, f_in, f_out, 100);
  } else if (name == "shared_overflow") {
    launch_kernel("shared_overflow_kernel", shared_overflow_kernel, dim3(1), dim3(33), 128, nullptr, f_in, f_out);
  } else if (name == "cp_async") {
    launch_kernel("cp_async_kernel", cp_async_kernel<true>, dim3(1), dim3(32), 512, nullptr, v_in,
                  static_cast<uint4*>(out));
  } else if (name == "cp_async_read_before_wait") {
    launch_kernel("cp_async_kernel", cp_async_kernel<false>, dim3(1), dim3(32), 512, nullptr, v_in,
                  static_cast<uint4*>(out));
  } else if (name == "divergent_barrier") {
    launch_kernel("divergent_barrier_kernel", divergent_barrier_kernel, dim3(1), dim3(32), 0, nullptr, f_in, f_out);
  } else if (name == "divergent_shuffle") {
    launch_kernel("divergent_shuffle_kernel", divergent_shuffle_kernel, dim3(1), dim3(32), 0, nullptr, f_in, f_out);
  } else {
    return unmask::invalid_argument("name", 0, "must name a test kernel of csrc/simt/test_kernels.cpp");
  }
  return ::unmask::check_launch();
}

}  // namespace simt
