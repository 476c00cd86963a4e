// The SIMT interpreter: the CUDA kernels of csrc/cuda, compiled as host C++ (csrc/simt/*.cpp
// include the .cu files with UNMASK_SIMT), run on the CPU with CUDA's semantics, slowly,
// and with checks a GPU does not make.
//
// Execution. A grid runs block after block on the calling thread. The threads of a block
// are fibers, switched cooperatively: a thread runs until it reaches __syncthreads (a
// block barrier), a warp collective (shuffle, ballot, ldmatrix, mma, __syncwarp: all 32
// lanes meet before any continues) or its end. Order is deterministic.
//
// Checks, on every launch (the first failure ends the launch with an error that names the
// kernel, block, thread and address; runtime.cpp):
//   - global memory: every access lies inside the bytes of one of the tensors handed to
//     the session (read-only constants, the launch's arguments and the built-in indices
//     may be read);
//   - shared memory: accesses lie inside the declared size (dynamic) or inside one
//     variable (static, UNMASK_SHARED), and two threads touching the same bytes between
//     two barriers, one of them writing, is a race (lanes of one warp are exempt once a
//     __syncwarp lies between the accesses; shuffles, votes, ldmatrix and mma order no
//     memory);
//   - cp.async: the data lands at the thread's wait; any access to its bytes before is an
//     error;
//   - a barrier or warp collective that some threads never reach (stricter than PTX: a
//     __syncthreads after some threads exited is reported, as the CUDA guide forbids it).
// Accesses are seen through GCC's AddressSanitizer instrumentation in outline form (the
// loads and stores of the kernel sources call __asan_load4 and friends; GCC leaves out
// those it proves in bounds of a local), whose callbacks this runtime defines: no ASan
// runtime is linked. Atomics are checked against plain accesses but not recorded.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace simt {

// Host memory standing for one device buffer of a launch.
struct Buffer {
  uintptr_t begin;
  size_t bytes;
  std::string name;
};

// The interpreted launches of one binding call: the buffers they may touch and the first
// error. One session at a time (sessions of different Python threads wait for each other).
class Session {
 public:
  explicit Session(std::vector<Buffer> buffers);
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
  bool failed() const;
  std::string error() const;
};

// The SM count the interpreted launchers see (sizes splits and grids); default 132, an H100.
void set_sm_count(int count);
int sm_count();

// What the interpreter has run since the last reset: for sizing tests.
struct Stats {
  uint64_t launches = 0;
  uint64_t blocks = 0;
  uint64_t threads = 0;
  uint64_t switches = 0;  // fiber switches
  double seconds = 0.0;   // wall time inside launches
};
Stats stats();
void reset_stats();

// ------------------------------------------------------------------ used by cuda_shim.h

struct Index3 {
  unsigned x, y, z;
};

using Entry = void (*)(void* context);  // runs the kernel with its arguments, for one thread

// Runs the grid; false (with the session's error set) if a check failed. `kernel` names
// the kernel for its dynamic shared memory limit; `arguments` is the launch's argument
// block, which every thread may read.
bool run_grid(const char* name, const void* kernel, Index3 grid, Index3 block, size_t dynamic_shared_bytes,
              Entry entry, const void* arguments, size_t argument_bytes);

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes): over
// 48 KiB of dynamic shared memory a launch needs this opt-in, as on a GPU.
void allow_dynamic_shared(const void* kernel, size_t bytes);

// threadIdx, blockIdx, blockDim and gridDim of the running thread (cuda_shim.h).
struct Builtins {
  Index3 thread_idx, block_idx, block_dim, grid_dim;
};
extern Builtins builtins;

void* dynamic_shared();
// A static __shared__ variable of the running kernel (UNMASK_SHARED): `key` tells the
// declarations apart; the storage is fresh (poisoned) for every block, bounds-checked per
// variable and race-checked like dynamic shared memory.
void* static_shared(int key, size_t bytes, size_t alignment);
uint32_t shared_address(const void* generic);  // __cvta_generic_to_shared

void sync_threads();
void sync_warp(unsigned mask);
enum class Shuffle : int { kIndex = 0, kUp = 1, kDown = 2, kXor = 3 };
uint64_t shuffle(unsigned mask, uint64_t bits, Shuffle mode, int lane_arg, int width);
unsigned ballot(unsigned mask, bool predicate);
int atomic_add(int* address, int value);
unsigned atomic_add(unsigned* address, unsigned value);
float atomic_add(float* address, float value);

void cp_async_16(uint32_t shared_destination, const void* global_source, bool valid);
void cp_async_commit();
void cp_async_wait_all();
void ldmatrix_x4(uint32_t (&registers)[4], uint32_t shared_row_address, bool transpose);
enum class MmaType : int { kBFloat16 = 0, kFloat16 = 1 };
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, MmaType type);
float ex2_approx_ftz(float x);

// For the binding: the message of the last failed launch on this thread.
std::string last_error();

}  // namespace simt
