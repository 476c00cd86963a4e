// The SIMT interpreter's runtime (runtime.h): fibers, the block scheduler, warp
// collectives with the PTX fragment layouts, cp.async, and the memory checks. Compiled
// without instrumentation; only the kernel sources call into the __asan_* hooks below.
#include "simt/runtime.h"

#include <link.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "simt/cuda_shim.h"

namespace simt {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;
// Per fiber: the kernels' register arrays and the instrumentation's calls fit in a few KiB;
// the rest is headroom, committed only where touched.
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;
// Bytes around dynamic shared memory that still count as shared: an access just past the
// declared size is reported as such, not as an unknown address.
constexpr size_t kSharedRedzone = 1024;
// How far before or past a buffer an access is reported against it (an off-by-one), not
// as an unknown address.
constexpr uintptr_t kBufferNeighbourhood = 4096;
constexpr uint8_t kPoison = 0xFF;  // fresh dynamic shared memory: NaN as a float, -1 as an int

// ------------------------------------------------------------------ fibers

// A suspended fiber is its saved stack pointer: the switch pushes the callee-saved
// registers (System V x86-64: rbx, rbp, r12-r15) and the SSE/x87 control words, stores
// rsp, loads the other fiber's, and pops its registers. ~10 ns, no system call (glibc's
// swapcontext also saves the signal mask with a syscall, ~180 ns).
extern "C" void unmask_simt_switch(void** save_sp, void* load_sp);
extern "C" void unmask_simt_fiber_start();
asm(R"(
    .text
    .p2align 4
    .globl unmask_simt_switch
    .hidden unmask_simt_switch
    .type unmask_simt_switch, @function
unmask_simt_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size unmask_simt_switch, .-unmask_simt_switch

    .p2align 4
    .globl unmask_simt_fiber_start
    .hidden unmask_simt_fiber_start
    .type unmask_simt_fiber_start, @function
unmask_simt_fiber_start:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size unmask_simt_fiber_start, .-unmask_simt_fiber_start
)");

struct Stack {
  void* mapping = nullptr;
  uintptr_t lo = 0, hi = 0;  // usable, above the guard page
};

class StackPool {
 public:
  ~StackPool() {
    for (Stack& stack : free_) munmap(stack.mapping, kStackBytes + kGuardBytes);
  }
  Stack take() {
    if (!free_.empty()) {
      Stack stack = free_.back();
      free_.pop_back();
      return stack;
    }
    void* mapping = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mapping == MAP_FAILED) throw std::runtime_error("simt: cannot map a fiber stack");
    mprotect(mapping, kGuardBytes, PROT_NONE);  // an overflow faults instead of corrupting
    const uintptr_t lo = reinterpret_cast<uintptr_t>(mapping) + kGuardBytes;
    return Stack{mapping, lo, lo + kStackBytes};
  }
  void give(const Stack& stack) { free_.push_back(stack); }

 private:
  std::vector<Stack> free_;
};

// ------------------------------------------------------------------ block state

enum class Wait : uint8_t { kRunning, kBarrier, kWarp, kExited };
enum class Op : uint8_t { kNone, kSyncWarp, kShuffle, kBallot, kLdmatrix, kMma };

const char* op_name(Op op) {
  switch (op) {
    case Op::kNone: return "nothing";
    case Op::kSyncWarp: return "__syncwarp";
    case Op::kShuffle: return "a shuffle";
    case Op::kBallot: return "__ballot_sync";
    case Op::kLdmatrix: return "ldmatrix";
    case Op::kMma: return "mma";
  }
  return "?";
}

struct PendingCopy {
  uint32_t destination;
  uint8_t bytes[16];
};

struct Thread {
  void* sp = nullptr;
  Stack stack;
  Index3 index{};
  int id = 0, lane = 0, warp = 0;
  Wait wait = Wait::kRunning;
  std::vector<PendingCopy> copies;  // cp.async issued and not landed, oldest first
};

struct LaneSlot {
  uint64_t in[10];
  uint64_t out[4];
};

struct Warp {
  int live = 0;      // lanes not exited
  int arrived = 0;   // lanes in the collective now forming
  Op op = Op::kNone;
  uint32_t epoch = 0;        // completed collectives: lanes' accesses across one are ordered
  uint64_t generation = 0;   // slots[generation & 1] is the collective now forming
  LaneSlot slots[2][kWarpSize];
};

// Who touched one shared byte since the last barrier (epoch), for the race check.
struct Shadow {
  uint32_t epoch = UINT32_MAX;
  int16_t writer = -1;
  int16_t reader = -1;  // -1: none, -2: several threads
  uint32_t writer_warp_epoch = 0;
  uint32_t reader_warp_epoch = 0;
  uint32_t reader_warps = 0;
};

struct Launch {
  const char* kernel = "";
  Index3 grid{}, block{};
  Entry entry = nullptr;
  void* arguments = nullptr;
  uintptr_t arguments_lo = 0, arguments_hi = 0;
  size_t dynamic_bytes = 0;
};

struct Segment {
  uintptr_t lo, hi;
};

struct State {
  // session
  std::vector<Buffer> buffers;
  bool failed = false;
  std::string error;
  // launch and block
  Launch launch;
  Index3 block_index{};
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  int live = 0, at_barrier = 0;
  uint32_t barrier_epoch = 0;
  std::vector<uint8_t> dynamic_storage;
  uint8_t* dynamic_base = nullptr;
  std::vector<Shadow> dynamic_shadow, static_shadow;
  Thread* current = nullptr;  // the fiber running, or nullptr while the scheduler runs
  void* scheduler_sp = nullptr;
  StackPool stacks;
  // This module's read-only segments (constants a kernel may read) and its writable data,
  // where the kernels' static __shared__ variables live (cuda_shim.h): a kernel's accesses
  // there are race-checked as shared memory.
  std::vector<Segment> read_only;
  Segment writable{0, 0};
};

std::mutex session_mutex;
State* state = nullptr;  // set while a session is open
int simulated_sm_count = 132;
Stats counters;
cudaError_t pending_launch_error = cudaSuccess;
std::string last_message;

uintptr_t static_shared_lo() { return state->writable.lo; }
uintptr_t static_shared_hi() { return state->writable.hi; }

std::string format_index(Index3 index) {
  char text[64];
  std::snprintf(text, sizeof(text), "(%u, %u, %u)", index.x, index.y, index.z);
  return text;
}

std::string hex(uintptr_t value) {
  char text[32];
  std::snprintf(text, sizeof(text), "0x%zx", static_cast<size_t>(value));
  return text;
}

std::string where(const State& s) {
  std::string text = "kernel " + std::string(s.launch.kernel) + ", block " + format_index(s.block_index);
  if (s.current != nullptr) text += ", thread " + format_index(s.current->index);
  return text;
}

// Records the first error; inside a fiber, abandons it for good (its stack is dropped:
// the faulting access never runs).
[[noreturn]] void fail_in_fiber(State& s, const std::string& message);

void record_failure(State& s, const std::string& message) {
  if (!s.failed) {
    s.failed = true;
    s.error = message;
  }
}

void yield_to_scheduler(State& s) {
  Thread& t = *s.current;
  unmask_simt_switch(&t.sp, s.scheduler_sp);
}

[[noreturn]] void fail_in_fiber(State& s, const std::string& message) {
  record_failure(s, where(s) + ": " + message);
  for (;;) yield_to_scheduler(s);  // the scheduler never resumes a fiber after a failure
}

Thread& current_thread() {
  if (state == nullptr || state->current == nullptr) throw std::logic_error("simt: a device function ran outside a kernel");
  return *state->current;
}

// ------------------------------------------------------------------ memory checks

std::string thread_name(const State& s, int id) { return "thread " + format_index(s.threads[id].index); }

// t: the thread the access belongs to (an ldmatrix reads rows on behalf of the lanes that
// gave their addresses).
void race_check(State& s, const Thread& t, std::vector<Shadow>& shadow, size_t offset, size_t size, bool write,
                const char* region) {
  const Warp& warp = s.warps[t.warp];
  for (size_t i = 0; i < size; ++i) {
    Shadow& b = shadow[offset + i];
    if (b.epoch != s.barrier_epoch) b = Shadow{s.barrier_epoch, -1, -1, 0, 0, 0};
    // Another lane of this warp is ordered before us once a collective completed since.
    const auto ordered = [&](int other, uint32_t other_epoch) {
      return s.threads[other].warp == t.warp && other_epoch < warp.epoch;
    };
    if (b.writer >= 0 && b.writer != t.id && !ordered(b.writer, b.writer_warp_epoch)) {
      fail_in_fiber(s, std::string("race on ") + region + " byte " + std::to_string(offset + i) + ": " +
                           thread_name(s, b.writer) + " wrote it and " + thread_name(s, t.id) + " " +
                           (write ? "writes" : "reads") + " it with no __syncthreads between");
    }
    if (write) {
      const uint32_t my_warp_bit = 1u << t.warp;
      const bool other_warp_read = (b.reader_warps & ~my_warp_bit) != 0;
      const bool other_lane_read = (b.reader_warps & my_warp_bit) != 0 && b.reader != t.id &&
                                   b.reader_warp_epoch >= warp.epoch;
      if (other_warp_read || other_lane_read) {
        const std::string reader = b.reader >= 0 ? thread_name(s, b.reader) : std::string("several threads");
        fail_in_fiber(s, std::string("race on ") + region + " byte " + std::to_string(offset + i) + ": " + reader +
                             " read it and " + thread_name(s, t.id) + " writes it with no __syncthreads between");
      }
      b.writer = static_cast<int16_t>(t.id);
      b.writer_warp_epoch = warp.epoch;
    } else {
      b.reader = b.reader == -1 || b.reader == t.id ? static_cast<int16_t>(t.id) : int16_t{-2};
      b.reader_warps |= 1u << t.warp;
      b.reader_warp_epoch = warp.epoch;
    }
  }
}

bool inside(uintptr_t address, size_t size, uintptr_t lo, uintptr_t hi) { return address >= lo && address + size <= hi; }
bool overlaps(uintptr_t address, size_t size, uintptr_t lo, uintptr_t hi) { return address < hi && address + size > lo; }

// Shared memory: true (and checked) if the access is there.
bool check_shared(State& s, uintptr_t address, size_t size, bool write) {
  const uintptr_t dynamic_lo = reinterpret_cast<uintptr_t>(s.dynamic_base);
  const uintptr_t dynamic_hi = dynamic_lo + s.launch.dynamic_bytes;
  if (overlaps(address, size, dynamic_lo - kSharedRedzone, dynamic_hi + kSharedRedzone)) {
    if (!inside(address, size, dynamic_lo, dynamic_hi)) {
      fail_in_fiber(s, std::string(write ? "write" : "read") + " of " + std::to_string(size) +
                           " bytes at dynamic shared offset " +
                           std::to_string(static_cast<int64_t>(address - dynamic_lo)) + ", outside the " +
                           std::to_string(s.launch.dynamic_bytes) + " bytes the launch declared");
    }
    race_check(s, *s.current, s.dynamic_shadow, address - dynamic_lo, size, write, "dynamic shared memory");
    return true;
  }
  if (inside(address, size, static_shared_lo(), static_shared_hi())) {
    race_check(s, *s.current, s.static_shadow, address - static_shared_lo(), size, write,
               "static shared memory (the module's data)");
    return true;
  }
  return false;
}

void check_global(State& s, uintptr_t address, size_t size, bool write) {
  for (const Buffer& buffer : s.buffers) {
    const uintptr_t hi = buffer.begin + buffer.bytes;
    if (inside(address, size, buffer.begin, hi)) return;
    if (overlaps(address, size, buffer.begin, hi)) {
      fail_in_fiber(s, std::string(write ? "write" : "read") + " of " + std::to_string(size) + " bytes at byte " +
                           std::to_string(static_cast<int64_t>(address - buffer.begin)) + " of buffer '" +
                           buffer.name + "' (" + std::to_string(buffer.bytes) + " bytes) runs past its end");
    }
  }
  if (!write) {
    if (inside(address, size, s.launch.arguments_lo, s.launch.arguments_hi)) return;
    for (const Segment& segment : s.read_only) {
      if (inside(address, size, segment.lo, segment.hi)) return;
    }
  }
  // Just past the end (or before the start) of a buffer: an off-by-one, named as such.
  for (const Buffer& buffer : s.buffers) {
    const uintptr_t hi = buffer.begin + buffer.bytes;
    if (overlaps(address, size, buffer.begin - kBufferNeighbourhood, hi + kBufferNeighbourhood)) {
      fail_in_fiber(s, std::string(write ? "write" : "read") + " of " + std::to_string(size) + " bytes at byte " +
                           std::to_string(static_cast<int64_t>(address - buffer.begin)) + " of buffer '" +
                           buffer.name + "' (" + std::to_string(buffer.bytes) + " bytes): outside it");
    }
  }
  std::string names;
  for (const Buffer& buffer : s.buffers) names += (names.empty() ? "" : ", ") + buffer.name;
  fail_in_fiber(s, std::string(write ? "write" : "read") + " of " + std::to_string(size) + " bytes at " + hex(address) +
                       ", outside every buffer of the launch (" + names + ")");
}

void check_access(uintptr_t address, size_t size, bool write) {
  State* s = state;
  if (s == nullptr || s->current == nullptr) return;  // host code, or no session
  const Thread& t = *s->current;
  if (inside(address, size, t.stack.lo, t.stack.hi)) return;  // the thread's registers and locals
  if (check_shared(*s, address, size, write)) return;
  check_global(*s, address, size, write);
}

struct ModuleSearch {
  uintptr_t inside;  // an address in this module
  State* state;
};

int find_module_segments(dl_phdr_info* info, size_t, void* data) {
  auto* search = static_cast<ModuleSearch*>(data);
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& header = info->dlpi_phdr[i];
    if (header.p_type != PT_LOAD) continue;
    const uintptr_t lo = info->dlpi_addr + header.p_vaddr, hi = lo + header.p_memsz;
    if (search->inside < lo || search->inside >= hi) continue;
    for (int j = 0; j < info->dlpi_phnum; ++j) {  // this module
      const ElfW(Phdr)& segment = info->dlpi_phdr[j];
      if (segment.p_type != PT_LOAD) continue;
      const uintptr_t segment_lo = info->dlpi_addr + segment.p_vaddr, segment_hi = segment_lo + segment.p_memsz;
      if ((segment.p_flags & PF_W) != 0) {
        Segment& writable = search->state->writable;
        writable = writable.hi == 0 ? Segment{segment_lo, segment_hi}
                                    : Segment{std::min(writable.lo, segment_lo), std::max(writable.hi, segment_hi)};
      } else {
        search->state->read_only.push_back(Segment{segment_lo, segment_hi});
      }
    }
    return 1;
  }
  return 0;
}

void find_module_segments(State& s) {
  ModuleSearch search{reinterpret_cast<uintptr_t>(&builtins), &s};
  dl_iterate_phdr(find_module_segments, &search);
}

// ------------------------------------------------------------------ scheduler

[[noreturn]] void thread_exit(State& s);

void fiber_main(Thread* t) {
  State& s = *state;
  s.launch.entry(s.launch.arguments);
  (void)t;
  thread_exit(s);
}

void prepare_fiber(Thread& t) {
  // The initial frame the switch pops: control words, r15, r14, r13 (entry), r12 (its
  // argument), rbx, rbp, then the return address, the trampoline. The stack top is
  // 16-byte aligned, so the trampoline's call enters fiber_main with the ABI's alignment.
  uint64_t* top = reinterpret_cast<uint64_t*>(t.stack.hi & ~uintptr_t{15});
  uint64_t* frame = top - 8;
  uint32_t control[2] = {0, 0};
  asm volatile("stmxcsr %0" : "=m"(control[0]));
  asm volatile("fnstcw %0" : "=m"(control[1]));
  std::memcpy(&frame[0], control, sizeof(control));
  frame[1] = 0;                                             // r15
  frame[2] = 0;                                             // r14
  frame[3] = reinterpret_cast<uint64_t>(&fiber_main);      // r13
  frame[4] = reinterpret_cast<uint64_t>(&t);               // r12
  frame[5] = 0;                                             // rbx
  frame[6] = 0;                                             // rbp
  frame[7] = reinterpret_cast<uint64_t>(&unmask_simt_fiber_start);
  t.sp = frame;
}

void release_warp_lanes(State& s, int warp) {
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const int id = warp * kWarpSize + lane;
    if (id < static_cast<int>(s.threads.size()) && s.threads[id].wait == Wait::kWarp) s.threads[id].wait = Wait::kRunning;
  }
}

void release_barrier(State& s) {
  for (Thread& t : s.threads) {
    if (t.wait == Wait::kBarrier) t.wait = Wait::kRunning;
  }
  s.at_barrier = 0;
  ++s.barrier_epoch;
}

[[noreturn]] void thread_exit(State& s) {
  Thread& t = *s.current;
  if (!t.copies.empty()) fail_in_fiber(s, "the thread ended with cp.async copies it never waited for");
  t.wait = Wait::kExited;
  --s.live;
  Warp& warp = s.warps[t.warp];
  --warp.live;
  if (warp.arrived > 0) {
    fail_in_fiber(s, std::string("the thread ended while its warp waits in ") + op_name(warp.op) +
                         " (a warp collective every lane must reach)");
  }
  if (s.at_barrier > 0) {
    fail_in_fiber(s, "the thread ended while " + std::to_string(s.at_barrier) +
                         " threads of its block wait at __syncthreads, which it never reaches");
  }
  s.current = nullptr;
  for (;;) unmask_simt_switch(&t.sp, s.scheduler_sp);
}

void resume(State& s, Thread& t) {
  s.current = &t;
  builtins.thread_idx = t.index;
  unmask_simt_switch(&s.scheduler_sp, t.sp);
  s.current = nullptr;
  counters.switches += 2;
}

std::string describe_waits(const State& s) {
  int barrier = 0, in_warp = 0;
  std::string example;
  for (const Thread& t : s.threads) {
    if (t.wait == Wait::kBarrier) ++barrier;
    if (t.wait == Wait::kWarp) {
      if (in_warp++ == 0) example = " (e.g. " + format_index(t.index) + " in " + op_name(s.warps[t.warp].op) + ")";
    }
  }
  return std::to_string(barrier) + " threads wait at __syncthreads and " + std::to_string(in_warp) +
         " in warp collectives" + example + ": they can never all meet";
}

bool run_block(State& s, Index3 block_index) {
  s.block_index = block_index;
  builtins.block_idx = block_index;
  const Index3 dim = s.launch.block;
  const int count = static_cast<int>(dim.x * dim.y * dim.z);
  s.threads.assign(count, Thread{});
  s.warps.assign((count + kWarpSize - 1) / kWarpSize, Warp{});
  s.live = count;
  s.at_barrier = 0;
  ++s.barrier_epoch;
  std::fill(s.dynamic_storage.begin(), s.dynamic_storage.end(), kPoison);
  for (int id = 0; id < count; ++id) {
    Thread& t = s.threads[id];
    t.id = id;
    t.lane = id % kWarpSize;
    t.warp = id / kWarpSize;
    t.index = Index3{id % dim.x, (id / dim.x) % dim.y, id / (dim.x * dim.y)};
    t.stack = s.stacks.take();
    prepare_fiber(t);
    ++s.warps[t.warp].live;
  }
  counters.threads += count;
  ++counters.blocks;
  bool ok = true;
  while (ok) {
    bool ran = false, all_exited = true;
    for (Thread& t : s.threads) {
      if (t.wait == Wait::kExited) continue;
      all_exited = false;
      if (t.wait != Wait::kRunning) continue;
      resume(s, t);
      ran = true;
      if (s.failed) {
        ok = false;
        break;
      }
    }
    if (!ok || all_exited) break;
    if (!ran) {
      record_failure(s, where(s) + ": " + describe_waits(s));
      ok = false;
    }
  }
  for (Thread& t : s.threads) s.stacks.give(t.stack);
  s.threads.clear();
  return ok && !s.failed;
}

// ------------------------------------------------------------------ warp collectives

// Every lane deposits its inputs in the warp's slot; the last to arrive runs `complete`
// for the whole warp, and each lane then reads its outputs. Two slot sets alternate:
// a lane can only reach the next collective but one after every lane has read this one.
template <typename Complete>
LaneSlot& collective(State& s, Op op, unsigned mask, const uint64_t* in, int in_words, Complete complete) {
  Thread& t = *s.current;
  Warp& warp = s.warps[t.warp];
  if (mask != kFullMask) fail_in_fiber(s, std::string(op_name(op)) + " with a lane mask other than 0xFFFFFFFF");
  if (warp.live != kWarpSize) fail_in_fiber(s, std::string(op_name(op)) + " in a warp with exited or missing lanes");
  if (warp.arrived == 0) {
    warp.op = op;
  } else if (warp.op != op) {
    fail_in_fiber(s, std::string("lanes of one warp meet in different collectives: ") + op_name(warp.op) + " and " +
                         op_name(op));
  }
  const int set = static_cast<int>(warp.generation & 1);
  LaneSlot& slot = warp.slots[set][t.lane];
  std::copy(in, in + in_words, slot.in);
  if (++warp.arrived == kWarpSize) {
    complete(warp.slots[set]);
    warp.arrived = 0;
    warp.op = Op::kNone;
    ++warp.generation;
    ++warp.epoch;
    release_warp_lanes(s, t.warp);
  } else {
    t.wait = Wait::kWarp;
    yield_to_scheduler(s);
  }
  return slot;
}

State& active() {
  current_thread();
  return *state;
}

uint16_t half_of(uint32_t word, int which) { return static_cast<uint16_t>(which == 0 ? word & 0xFFFFu : word >> 16); }

float element_to_float(uint16_t bits, MmaType type) {
  return type == MmaType::kBFloat16 ? bits_float(static_cast<uint32_t>(bits) << 16) : half_bits_to_float(bits);
}

// Shared memory of the launch at a shared-window address (the offset into dynamic shared).
uint8_t* shared_bytes(State& s, uint32_t address, size_t size, const char* what) {
  if (address % 16 != 0 || static_cast<size_t>(address) + size > s.launch.dynamic_bytes) {
    fail_in_fiber(s, std::string(what) + " at shared address " + std::to_string(address) + ": must be 16-byte aligned "
                     "and inside the " + std::to_string(s.launch.dynamic_bytes) + " bytes of dynamic shared memory");
  }
  return s.dynamic_base + address;
}

// A read of shared memory done by an instruction on behalf of a lane (race-checked as its).
void shared_read_as(State& s, int thread_id, uint32_t address, size_t size) {
  race_check(s, s.threads[thread_id], s.dynamic_shadow, address, size, false, "dynamic shared memory");
}

}  // namespace

// ------------------------------------------------------------------ public entry points

Session::Session(std::vector<Buffer> buffers) {
  session_mutex.lock();
  state = new State();
  state->buffers = std::move(buffers);
  find_module_segments(*state);
  state->static_shadow.resize(state->writable.hi - state->writable.lo);
}

Session::~Session() {
  delete state;
  state = nullptr;
  session_mutex.unlock();
}

bool Session::failed() const { return state->failed; }
std::string Session::error() const { return state->error; }

void set_sm_count(int count) { simulated_sm_count = count > 0 ? count : 1; }
int sm_count() { return simulated_sm_count; }

Stats stats() { return counters; }
void reset_stats() { counters = Stats{}; }

bool run_grid(const char* name, Index3 grid, Index3 block, size_t dynamic_shared_bytes, Entry entry,
              const void* arguments, size_t argument_bytes) {
  if (state == nullptr) throw std::logic_error("simt: a kernel launch outside a session");
  State& s = *state;
  if (s.failed) return false;
  const auto started = std::chrono::steady_clock::now();
  s.launch = Launch{name, grid, block, entry, const_cast<void*>(arguments), reinterpret_cast<uintptr_t>(arguments),
                    reinterpret_cast<uintptr_t>(arguments) + argument_bytes, dynamic_shared_bytes};
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535 || grid.x > 2147483647u || dynamic_shared_bytes > 227 * 1024) {
    record_failure(s, "kernel " + std::string(name) + ": invalid launch: grid " + format_index(grid) + ", block " +
                          format_index(block) + ", " + std::to_string(dynamic_shared_bytes) + " bytes of shared memory");
    return false;
  }
  // Dynamic shared memory between two redzones, 16-byte aligned as a GPU's is.
  s.dynamic_storage.assign(dynamic_shared_bytes + 2 * kSharedRedzone + 16, kPoison);
  const uintptr_t raw = reinterpret_cast<uintptr_t>(s.dynamic_storage.data()) + kSharedRedzone;
  s.dynamic_base = reinterpret_cast<uint8_t*>((raw + 15) & ~uintptr_t{15});
  s.dynamic_shadow.assign(dynamic_shared_bytes, Shadow{});
  builtins.block_dim = block;
  builtins.grid_dim = grid;
  ++counters.launches;
  bool ok = true;
  for (unsigned z = 0; z < grid.z && ok; ++z) {
    for (unsigned y = 0; y < grid.y && ok; ++y) {
      for (unsigned x = 0; x < grid.x && ok; ++x) ok = run_block(s, Index3{x, y, z});
    }
  }
  counters.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  return ok;
}

Builtins builtins{};

void* dynamic_shared() { return active().dynamic_base; }

uint32_t shared_address(const void* generic) {
  State& s = active();
  const uintptr_t address = reinterpret_cast<uintptr_t>(generic);
  const uintptr_t lo = reinterpret_cast<uintptr_t>(s.dynamic_base);
  if (address < lo || address > lo + s.launch.dynamic_bytes) {
    fail_in_fiber(s, "__cvta_generic_to_shared of an address outside dynamic shared memory (" + hex(address) + ")");
  }
  return static_cast<uint32_t>(address - lo);
}

void sync_threads() {
  State& s = active();
  Thread& t = *s.current;
  if (s.warps[t.warp].arrived > 0) {
    fail_in_fiber(s, std::string("__syncthreads while other lanes of the warp wait in ") + op_name(s.warps[t.warp].op));
  }
  if (s.live < static_cast<int>(s.threads.size())) {
    fail_in_fiber(s, "__syncthreads in a block where " + std::to_string(s.threads.size() - s.live) +
                         " threads have ended: every thread of the block must reach each barrier");
  }
  t.wait = Wait::kBarrier;
  if (++s.at_barrier == s.live) {
    release_barrier(s);
  } else {
    yield_to_scheduler(s);
  }
}

void sync_warp(unsigned mask) {
  State& s = active();
  collective(s, Op::kSyncWarp, mask, nullptr, 0, [](LaneSlot*) {});
}

uint64_t shuffle(unsigned mask, uint64_t bits, Shuffle mode, int lane_arg, int width) {
  State& s = active();
  if (width <= 0 || width > kWarpSize || (width & (width - 1)) != 0) fail_in_fiber(s, "shuffle width must be 1..32, a power of 2");
  const uint64_t in[3] = {bits, static_cast<uint64_t>(static_cast<int64_t>(lane_arg)), static_cast<uint64_t>(mode)};
  LaneSlot& slot = collective(s, Op::kShuffle, mask, in, 3, [width](LaneSlot* lanes) {
    for (int lane = 0; lane < kWarpSize; ++lane) {
      const int arg = static_cast<int>(static_cast<int64_t>(lanes[lane].in[1]));
      const int base = lane & ~(width - 1);  // the lane's segment of `width` lanes
      int source = lane;
      switch (static_cast<Shuffle>(lanes[lane].in[2])) {
        case Shuffle::kIndex: source = base + (arg & (width - 1)); break;
        case Shuffle::kUp: source = lane - arg >= base ? lane - arg : lane; break;
        case Shuffle::kDown: source = lane + arg < base + width ? lane + arg : lane; break;
        case Shuffle::kXor: source = (lane ^ arg) < base + width && (lane ^ arg) >= base ? lane ^ arg : lane; break;
      }
      lanes[lane].out[0] = lanes[source].in[0];
    }
  });
  return slot.out[0];
}

unsigned ballot(unsigned mask, bool predicate) {
  State& s = active();
  const uint64_t in[1] = {predicate ? 1u : 0u};
  LaneSlot& slot = collective(s, Op::kBallot, mask, in, 1, [](LaneSlot* lanes) {
    uint64_t bits = 0;
    for (int lane = 0; lane < kWarpSize; ++lane) bits |= lanes[lane].in[0] << lane;
    for (int lane = 0; lane < kWarpSize; ++lane) lanes[lane].out[0] = bits;
  });
  return static_cast<unsigned>(slot.out[0]);
}

namespace {
// An atomic read-modify-write: bounds-checked, and race-checked against plain accesses
// of other threads (atomics among themselves never race), then not recorded.
template <typename T>
T atomic_update(T* address, T value) {
  State& s = active();
  const uintptr_t a = reinterpret_cast<uintptr_t>(address);
  const Thread& t = *s.current;
  if (!inside(a, sizeof(T), t.stack.lo, t.stack.hi)) {
    std::vector<Shadow>* shadow = nullptr;
    size_t offset = 0;
    const uintptr_t dynamic_lo = reinterpret_cast<uintptr_t>(s.dynamic_base);
    if (inside(a, sizeof(T), dynamic_lo, dynamic_lo + s.launch.dynamic_bytes)) {
      shadow = &s.dynamic_shadow;
      offset = a - dynamic_lo;
    } else if (inside(a, sizeof(T), static_shared_lo(), static_shared_hi())) {
      shadow = &s.static_shadow;
      offset = a - static_shared_lo();
    } else {
      check_global(s, a, sizeof(T), true);
    }
    if (shadow != nullptr) {
      for (size_t i = 0; i < sizeof(T); ++i) {
        Shadow& b = (*shadow)[offset + i];
        if (b.epoch != s.barrier_epoch) continue;
        const bool plain_write = b.writer >= 0 && b.writer != t.id;
        const bool plain_read = (b.reader_warps & ~(1u << t.warp)) != 0 || (b.reader >= 0 && b.reader != t.id);
        if (plain_write || plain_read) {
          fail_in_fiber(s, "race: an atomic on shared byte " + std::to_string(offset + i) +
                               " meets a plain access of another thread with no __syncthreads between");
        }
      }
    }
  }
  const T old = *address;
  *address = old + value;
  return old;
}
}  // namespace

int atomic_add(int* address, int value) { return atomic_update(address, value); }
unsigned atomic_add(unsigned* address, unsigned value) { return atomic_update(address, value); }
float atomic_add(float* address, float value) { return atomic_update(address, value); }

// cp.async.cg.shared.global [dst], [src], 16, src_bytes (src_bytes 16 or 0: zero fill).
// The source is read now; the 16 bytes land in shared memory at this thread's wait.
void cp_async_16(uint32_t shared_destination, const void* global_source, bool valid) {
  State& s = active();
  shared_bytes(s, shared_destination, 16, "cp.async destination");
  PendingCopy copy{shared_destination, {}};
  if (valid) {
    const uintptr_t source = reinterpret_cast<uintptr_t>(global_source);
    if (source % 16 != 0) fail_in_fiber(s, "cp.async source " + hex(source) + " is not 16-byte aligned");
    check_global(s, source, 16, false);
    std::memcpy(copy.bytes, global_source, 16);
  }
  s.current->copies.push_back(copy);
}

// Groups only order the waits; cp.async.wait_all lands every copy of the thread, so the
// runtime keeps no group boundaries.
void cp_async_commit() { active(); }

void cp_async_wait_all() {
  State& s = active();
  Thread& t = *s.current;
  for (const PendingCopy& copy : t.copies) {
    race_check(s, t, s.dynamic_shadow, copy.destination, 16, true, "dynamic shared memory");
    std::memcpy(s.dynamic_base + copy.destination, copy.bytes, 16);
  }
  t.copies.clear();
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 (PTX ISA, "Warp-level matrix load
// instruction: ldmatrix"): lane 8 * i + r gives the address of row r of matrix i (16
// bytes, eight 16-bit elements). Lane l receives in register i the 32-bit word of row
// l / 4, elements 2 * (l % 4) and 2 * (l % 4) + 1 (the lower one in the low half) of
// matrix i; with .trans, of the transposed matrix: elements [2 * (l % 4)][l / 4] and
// [2 * (l % 4) + 1][l / 4] of matrix i as stored.
void ldmatrix_x4(uint32_t (&registers)[4], uint32_t shared_row_address, bool transpose) {
  State& s = active();
  const uint64_t in[2] = {shared_row_address, transpose ? 1u : 0u};
  const int warp_base = s.current->warp * kWarpSize;
  State* self = &s;
  LaneSlot& slot = collective(s, Op::kLdmatrix, kFullMask, in, 2, [self, warp_base](LaneSlot* lanes) {
    uint16_t rows[4][8][8];
    for (int provider = 0; provider < kWarpSize; ++provider) {
      const uint32_t address = static_cast<uint32_t>(lanes[provider].in[0]);
      const uint8_t* row = shared_bytes(*self, address, 16, "ldmatrix row");
      shared_read_as(*self, warp_base + provider, address, 16);
      std::memcpy(rows[provider / 8][provider % 8], row, 16);
    }
    for (int lane = 0; lane < kWarpSize; ++lane) {
      const bool trans = lanes[lane].in[1] != 0;
      const int r = lane / 4, c = 2 * (lane % 4);
      for (int i = 0; i < 4; ++i) {
        const uint16_t lo = trans ? rows[i][c][r] : rows[i][r][c];
        const uint16_t hi = trans ? rows[i][c + 1][r] : rows[i][r][c + 1];
        lanes[lane].out[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
      }
    }
  });
  for (int i = 0; i < 4; ++i) registers[i] = static_cast<uint32_t>(slot.out[i]);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 (PTX ISA, "Matrix
// Fragments for mma.m16n8k16 with floating point type"), with groupID = lane / 4 and
// threadID_in_group = lane % 4:
//   A (16 x 16): a0..a7 in registers a[0..3], two per register, lower element in the low
//     half; row groupID for a0, a1, a4, a5 and groupID + 8 for a2, a3, a6, a7; column
//     2 * threadID_in_group + (i & 1), plus 8 for a4..a7.
//   B (16 x 8): b0, b1 in b0 and b2, b3 in b1; row 2 * threadID_in_group + (i & 1), plus 8
//     for b2, b3; column groupID.
//   C, D (16 x 8, f32): c0..c3; row groupID for c0, c1 and groupID + 8 for c2, c3; column
//     2 * threadID_in_group + (i & 1).
// D = A B + C with float products summed over k in order (the tensor core's internal
// accumulation order is not specified; tests allow for it).
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, MmaType type) {
  State& s = active();
  uint64_t in[10];
  for (int i = 0; i < 4; ++i) in[i] = a[i];
  in[4] = b0;
  in[5] = b1;
  for (int i = 0; i < 4; ++i) in[6 + i] = float_bits(c[i]);
  LaneSlot& slot = collective(s, Op::kMma, kFullMask, in, 10, [type](LaneSlot* lanes) {
    float A[16][16], B[16][8], C[16][8];
    for (int lane = 0; lane < kWarpSize; ++lane) {
      const int g = lane / 4, t = lane % 4;
      const uint64_t* v = lanes[lane].in;
      for (int i = 0; i < 8; ++i) {
        const uint32_t word = static_cast<uint32_t>(v[i / 2]);
        const int row = g + ((i / 2) % 2 == 1 ? 8 : 0);
        const int col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
        A[row][col] = element_to_float(half_of(word, i & 1), type);
      }
      for (int i = 0; i < 4; ++i) {
        const uint32_t word = static_cast<uint32_t>(v[4 + i / 2]);
        B[2 * t + (i & 1) + (i >= 2 ? 8 : 0)][g] = element_to_float(half_of(word, i & 1), type);
      }
      for (int i = 0; i < 4; ++i) C[g + (i >= 2 ? 8 : 0)][2 * t + (i & 1)] = bits_float(static_cast<uint32_t>(v[6 + i]));
    }
    for (int lane = 0; lane < kWarpSize; ++lane) {
      const int g = lane / 4, t = lane % 4;
      for (int i = 0; i < 4; ++i) {
        const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
        float sum = C[row][col];
        for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
        lanes[lane].out[i] = float_bits(sum);
      }
    }
  });
  for (int i = 0; i < 4; ++i) c[i] = bits_float(static_cast<uint32_t>(slot.out[i]));
}

float ex2_approx_ftz(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.0f;  // .ftz: subnormal inputs and results are 0
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? std::copysign(0.0f, y) : y;
}

std::string last_error() { return state != nullptr ? state->error : last_message; }

cudaError_t take_launch_error() {
  const cudaError_t error = pending_launch_error;
  pending_launch_error = cudaSuccess;
  return error;
}

void set_launch_error() {
  pending_launch_error = cudaErrorLaunchFailure;
  if (state != nullptr) last_message = state->error;
}

const char* error_string(cudaError_t error) {
  if (error == cudaSuccess) return "no error";
  return last_message.c_str();
}

}  // namespace simt

// ------------------------------------------------------------------ instrumentation hooks
// GCC's -fsanitize=address with --param asan-instrumentation-with-call-threshold=0 makes
// every load and store of the kernel sources call these (the _noabort forms come with
// -fsanitize-recover). Hidden: they serve this module only, never a real ASan runtime.
#define UNMASK_SIMT_HOOK extern "C" __attribute__((visibility("hidden"))) void
#define UNMASK_SIMT_ACCESS_HOOKS(size)                                                                   \
  UNMASK_SIMT_HOOK __asan_load##size(uintptr_t address) { simt::check_access(address, size, false); }     \
  UNMASK_SIMT_HOOK __asan_store##size(uintptr_t address) { simt::check_access(address, size, true); }     \
  UNMASK_SIMT_HOOK __asan_load##size##_noabort(uintptr_t address) { simt::check_access(address, size, false); } \
  UNMASK_SIMT_HOOK __asan_store##size##_noabort(uintptr_t address) { simt::check_access(address, size, true); }
UNMASK_SIMT_ACCESS_HOOKS(1)
UNMASK_SIMT_ACCESS_HOOKS(2)
UNMASK_SIMT_ACCESS_HOOKS(4)
UNMASK_SIMT_ACCESS_HOOKS(8)
UNMASK_SIMT_ACCESS_HOOKS(16)
UNMASK_SIMT_HOOK __asan_loadN(uintptr_t address, size_t size) { simt::check_access(address, size, false); }
UNMASK_SIMT_HOOK __asan_storeN(uintptr_t address, size_t size) { simt::check_access(address, size, true); }
UNMASK_SIMT_HOOK __asan_loadN_noabort(uintptr_t address, size_t size) { simt::check_access(address, size, false); }
UNMASK_SIMT_HOOK __asan_storeN_noabort(uintptr_t address, size_t size) { simt::check_access(address, size, true); }
UNMASK_SIMT_HOOK __asan_init() {}
UNMASK_SIMT_HOOK __asan_version_mismatch_check_v8() {}
UNMASK_SIMT_HOOK __asan_handle_no_return() {}
