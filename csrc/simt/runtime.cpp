// The SIMT interpreter's runtime (runtime.h): fibers, the block scheduler, warp
// collectives with the PTX fragment layouts, cp.async, and the memory checks. Compiled
// without instrumentation; only the kernel sources call into the __asan_* hooks below.
#include "simt/runtime.h"

#include <link.h>
#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
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
// Bytes around shared memory that still count as shared: an access just past a declared
// size is reported as such, not as an unknown address.
constexpr size_t kSharedRedzone = 1024;
// How far before or past a buffer an access is reported against it (an off-by-one).
constexpr uintptr_t kBufferNeighbourhood = 4096;
constexpr uint8_t kPoison = 0xFF;  // fresh shared memory: NaN as a float, -1 as an int
// Shared memory a block may have: sm_80's 163 KiB (the module is built for sm_80 and
// sm_90, whose limit is 227 KiB); over 48 KiB of dynamic shared memory a kernel must
// opt in with cudaFuncSetAttribute, as on a GPU.
constexpr size_t kMaxSharedBytes = 163 * 1024;
constexpr size_t kDefaultDynamicLimit = 48 * 1024;
constexpr size_t kStaticArenaBytes = 48 * 1024;
// A fiber starts with the control words of a fresh thread (round to nearest, all
// exceptions masked, no flush-to-zero), whatever the caller set (torch.set_flush_denormal).
constexpr uint32_t kMxcsr = 0x1F80;
constexpr uint16_t kX87Control = 0x037F;

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
  // __syncwarp calls completed: accesses of two lanes on either side of one are ordered.
  // (Shuffles, votes, ldmatrix and mma synchronise the lanes but order no memory.)
  uint32_t sync_epoch = 0;
  uint64_t generation = 0;   // slots[generation & 1] is the collective now forming
  LaneSlot slots[2][kWarpSize];
};

// Who touched one shared byte since the last barrier (epoch), for the race check.
struct Shadow {
  uint32_t epoch = UINT32_MAX;
  int16_t writer = -1;
  uint32_t writer_sync_epoch = 0;  // the writer's warp's __syncwarp count at the write
  uint32_t reader_warps = 0;       // warps that read it (bit per warp)
  uint32_t reader_lanes = 0;       // lanes of the last reading warp that read it ...
  uint32_t reader_sync_epoch = 0;  // ... since that warp's last __syncwarp
  int16_t reader_warp = -1;
};

// One kind of shared memory of a block: its bytes between redzones, who touched each
// byte (races), and which bytes an unlanded cp.async will overwrite.
struct SharedRegion {
  const char* name = "";
  std::vector<uint8_t> storage;
  uint8_t* base = nullptr;
  size_t bytes = 0;                  // declared
  std::vector<Shadow> shadow;
  std::vector<int16_t> pending;      // thread whose cp.async has not landed here, or -1

  void reset(size_t declared) {
    bytes = declared;
    storage.assign(declared + 2 * kSharedRedzone + 16, kPoison);
    const uintptr_t raw = reinterpret_cast<uintptr_t>(storage.data()) + kSharedRedzone;
    base = reinterpret_cast<uint8_t*>((raw + 15) & ~uintptr_t{15});  // 16-byte aligned, as a GPU's
    shadow.assign(declared, Shadow{});
    pending.assign(declared, -1);
  }
  uintptr_t lo() const { return reinterpret_cast<uintptr_t>(base); }
  uintptr_t hi() const { return lo() + bytes; }
};

// A static __shared__ variable of the launch's kernel (UNMASK_SHARED in cuda_check.cuh).
struct StaticSlot {
  size_t offset, bytes;
};

struct Launch {
  const char* kernel = "";
  Index3 grid{}, block{};
  Entry entry = nullptr;
  void* arguments = nullptr;
  uintptr_t arguments_lo = 0, arguments_hi = 0;
};

struct Segment {
  uintptr_t lo, hi;
};

struct State {
  pthread_t owner;  // the OS thread that opened the session: every fiber runs on it
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
  SharedRegion dynamic_shared, static_shared;
  std::map<int, StaticSlot> static_slots;  // by declaration
  size_t static_used = 0;
  Thread* current = nullptr;  // the fiber running, or nullptr while the scheduler runs
  void* scheduler_sp = nullptr;
  StackPool stacks;
  std::vector<Segment> read_only;  // this module's read-only segments (constants a kernel may read)
};

std::mutex session_mutex;
State* state = nullptr;  // set while a session is open, on the OS thread that owns it
std::atomic<int> simulated_sm_count{132};
std::mutex kernel_limits_mutex;
std::map<const void*, size_t> dynamic_shared_limits;  // cudaFuncSetAttribute's opt-ins
Stats counters;  // under session_mutex
cudaError_t pending_launch_error = cudaSuccess;
std::string last_message;

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

std::string thread_name(const State& s, int id) { return "thread " + format_index(s.threads[id].index); }

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

// Records the first error and abandons the fiber for good (its stack is dropped: the
// faulting access never runs).
[[noreturn]] void fail_in_fiber(State& s, const std::string& message) {
  record_failure(s, where(s) + ": " + message);
  for (;;) yield_to_scheduler(s);  // the scheduler never resumes a fiber after a failure
}

// The session of this OS thread, with a kernel thread running: device functions only.
State& active() {
  if (state == nullptr || !pthread_equal(state->owner, pthread_self()) || state->current == nullptr) {
    throw std::logic_error("simt: a device function ran outside an interpreted kernel");
  }
  return *state;
}

// ------------------------------------------------------------------ memory checks

bool inside(uintptr_t address, size_t size, uintptr_t lo, uintptr_t hi) { return address >= lo && address + size <= hi; }
bool overlaps(uintptr_t address, size_t size, uintptr_t lo, uintptr_t hi) { return address < hi && address + size > lo; }

// t: the thread the access belongs to (an ldmatrix reads rows on behalf of the lanes that
// gave their addresses).
void race_check(State& s, const Thread& t, SharedRegion& region, size_t offset, size_t size, bool write) {
  const Warp& warp = s.warps[t.warp];
  const uint32_t my_warp_bit = 1u << t.warp, my_lane_bit = 1u << t.lane;
  for (size_t i = 0; i < size; ++i) {
    const size_t byte = offset + i;
    if (region.pending[byte] >= 0) {
      fail_in_fiber(s, std::string(write ? "writes" : "reads") + " " + region.name + " byte " + std::to_string(byte) +
                           " that a cp.async of " + thread_name(s, region.pending[byte]) +
                           " has not landed yet (no cp.async wait before)");
    }
    Shadow& b = region.shadow[byte];
    if (b.epoch != s.barrier_epoch) b = Shadow{s.barrier_epoch, -1, 0, 0, 0, 0, -1};
    if (b.writer >= 0 && b.writer != t.id &&
        !(s.threads[b.writer].warp == t.warp && b.writer_sync_epoch < warp.sync_epoch)) {
      fail_in_fiber(s, std::string("race on ") + region.name + " byte " + std::to_string(byte) + ": " +
                           thread_name(s, b.writer) + " wrote it and " + thread_name(s, t.id) + " " +
                           (write ? "writes" : "reads") + " it with no __syncthreads between");
    }
    if (write) {
      const bool other_warp_read = (b.reader_warps & ~my_warp_bit) != 0;
      const bool other_lane_read = b.reader_warp == t.warp && b.reader_sync_epoch == warp.sync_epoch &&
                                   (b.reader_lanes & ~my_lane_bit) != 0;
      if (other_warp_read || other_lane_read) {
        fail_in_fiber(s, std::string("race on ") + region.name + " byte " + std::to_string(byte) +
                             ": another thread read it and " + thread_name(s, t.id) +
                             " writes it with no __syncthreads between");
      }
      b.writer = static_cast<int16_t>(t.id);
      b.writer_sync_epoch = warp.sync_epoch;
    } else {
      if (b.reader_warp != t.warp || b.reader_sync_epoch != warp.sync_epoch) {
        b.reader_warp = static_cast<int16_t>(t.warp);
        b.reader_sync_epoch = warp.sync_epoch;
        b.reader_lanes = 0;
      }
      b.reader_lanes |= my_lane_bit;
      b.reader_warps |= my_warp_bit;
    }
  }
}

// The static variable whose slot holds `offset`, or nullptr.
const StaticSlot* static_slot_at(const State& s, size_t offset) {
  for (const auto& [key, slot] : s.static_slots) {
    if (offset >= slot.offset && offset < slot.offset + slot.bytes) return &slot;
  }
  return nullptr;
}

// Shared memory: true (and checked) if the access is there.
bool check_shared(State& s, uintptr_t address, size_t size, bool write) {
  const char* verb = write ? "write" : "read";
  SharedRegion& dynamic = s.dynamic_shared;
  if (overlaps(address, size, dynamic.lo() - kSharedRedzone, dynamic.hi() + kSharedRedzone)) {
    if (!inside(address, size, dynamic.lo(), dynamic.hi())) {
      fail_in_fiber(s, std::string(verb) + " of " + std::to_string(size) + " bytes at dynamic shared offset " +
                           std::to_string(static_cast<int64_t>(address - dynamic.lo())) + ", outside the " +
                           std::to_string(dynamic.bytes) + " bytes the launch declared");
    }
    race_check(s, *s.current, dynamic, address - dynamic.lo(), size, write);
    return true;
  }
  SharedRegion& statics = s.static_shared;
  if (overlaps(address, size, statics.lo() - kSharedRedzone, statics.hi() + kSharedRedzone)) {
    const int64_t offset = static_cast<int64_t>(address - statics.lo());
    const StaticSlot* slot = offset >= 0 ? static_slot_at(s, static_cast<size_t>(offset)) : nullptr;
    if (slot == nullptr || !inside(address, size, statics.lo() + slot->offset, statics.lo() + slot->offset + slot->bytes)) {
      fail_in_fiber(s, std::string(verb) + " of " + std::to_string(size) + " bytes at static shared offset " +
                           std::to_string(offset) + ", outside every __shared__ variable of the kernel");
    }
    race_check(s, *s.current, statics, static_cast<size_t>(offset), size, write);
    return true;
  }
  return false;
}

void check_global(State& s, uintptr_t address, size_t size, bool write) {
  const char* verb = write ? "write" : "read";
  for (const Buffer& buffer : s.buffers) {
    if (inside(address, size, buffer.begin, buffer.begin + buffer.bytes)) return;
  }
  if (!write) {
    if (inside(address, size, s.launch.arguments_lo, s.launch.arguments_hi)) return;
    const uintptr_t builtins_lo = reinterpret_cast<uintptr_t>(&builtins);
    if (inside(address, size, builtins_lo, builtins_lo + sizeof(builtins))) return;
    for (const Segment& segment : s.read_only) {
      if (inside(address, size, segment.lo, segment.hi)) return;
    }
  }
  // Past the end (or before the start) of a buffer, or straddling its end: an off-by-one,
  // named as such.
  for (const Buffer& buffer : s.buffers) {
    const uintptr_t hi = buffer.begin + buffer.bytes;
    if (overlaps(address, size, buffer.begin - kBufferNeighbourhood, hi + kBufferNeighbourhood)) {
      fail_in_fiber(s, std::string(verb) + " of " + std::to_string(size) + " bytes at byte " +
                           std::to_string(static_cast<int64_t>(address - buffer.begin)) + " of buffer '" +
                           buffer.name + "' (" + std::to_string(buffer.bytes) + " bytes): outside it");
    }
  }
  std::string names;
  for (const Buffer& buffer : s.buffers) names += (names.empty() ? "" : ", ") + buffer.name;
  fail_in_fiber(s, std::string(verb) + " of " + std::to_string(size) + " bytes at " + hex(address) +
                       ", outside every buffer of the launch (" + names + ")");
}

void check_access(uintptr_t address, size_t size, bool write) {
  State* s = state;
  // Host code, no session, or another OS thread's code while a session runs here.
  if (s == nullptr || s->current == nullptr || !pthread_equal(s->owner, pthread_self())) return;
  const Thread& t = *s->current;
  if (inside(address, size, t.stack.lo, t.stack.hi)) return;  // the thread's registers and locals
  if (check_shared(*s, address, size, write)) return;
  check_global(*s, address, size, write);
}

int find_read_only_segments(dl_phdr_info* info, size_t, void* data) {
  auto* found = static_cast<std::pair<uintptr_t, std::vector<Segment>*>*>(data);
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& header = info->dlpi_phdr[i];
    if (header.p_type != PT_LOAD) continue;
    const uintptr_t lo = info->dlpi_addr + header.p_vaddr, hi = lo + header.p_memsz;
    if (found->first < lo || found->first >= hi) continue;
    for (int j = 0; j < info->dlpi_phnum; ++j) {  // this module
      const ElfW(Phdr)& segment = info->dlpi_phdr[j];
      if (segment.p_type == PT_LOAD && (segment.p_flags & PF_W) == 0) {
        const uintptr_t segment_lo = info->dlpi_addr + segment.p_vaddr;
        found->second->push_back(Segment{segment_lo, segment_lo + segment.p_memsz});
      }
    }
    return 1;
  }
  return 0;
}

std::vector<Segment> module_read_only_segments() {
  std::vector<Segment> segments;
  std::pair<uintptr_t, std::vector<Segment>*> data{reinterpret_cast<uintptr_t>(&module_read_only_segments), &segments};
  dl_iterate_phdr(find_read_only_segments, &data);
  return segments;
}

// ------------------------------------------------------------------ scheduler

[[noreturn]] void thread_exit(State& s);

void fiber_main(Thread*) {
  State& s = *state;
  try {
    s.launch.entry(s.launch.arguments);
  } catch (const std::exception& error) {  // never unwind past the fiber's first frame
    fail_in_fiber(s, std::string("the runtime failed: ") + error.what());
  }
  thread_exit(s);
}

void prepare_fiber(Thread& t) {
  // The initial frame the switch pops: control words, r15, r14, r13 (entry), r12 (its
  // argument), rbx, rbp, then the return address, the trampoline. The stack top is
  // 16-byte aligned, so the trampoline's call enters fiber_main with the ABI's alignment.
  uint64_t* top = reinterpret_cast<uint64_t*>(t.stack.hi & ~uintptr_t{15});
  uint64_t* frame = top - 8;
  frame[0] = static_cast<uint64_t>(kMxcsr) | (static_cast<uint64_t>(kX87Control) << 32);
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
  for (SharedRegion* region : {&s.dynamic_shared, &s.static_shared}) {  // fresh, uninitialised shared memory
    std::fill(region->storage.begin(), region->storage.end(), kPoison);
  }
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
    if (op == Op::kSyncWarp) ++warp.sync_epoch;
    release_warp_lanes(s, t.warp);
  } else {
    t.wait = Wait::kWarp;
    yield_to_scheduler(s);
  }
  return slot;
}

// All lanes must agree on word `index` of their inputs (an instruction's qualifiers).
void require_uniform(State& s, const LaneSlot* lanes, int index, const char* what) {
  for (int lane = 1; lane < kWarpSize; ++lane) {
    if (lanes[lane].in[index] != lanes[0].in[index]) {
      fail_in_fiber(s, std::string("the lanes of a warp disagree on ") + what + " in one " + "collective");
    }
  }
}

uint16_t half_of(uint32_t word, int which) { return static_cast<uint16_t>(which == 0 ? word & 0xFFFFu : word >> 16); }

float element_to_float(uint16_t bits, MmaType type) {
  return type == MmaType::kBFloat16 ? bits_float(static_cast<uint32_t>(bits) << 16) : half_bits_to_float(bits);
}

// Dynamic shared memory at a shared-window address (the offset into it).
uint8_t* shared_bytes(State& s, uint32_t address, size_t size, const char* what) {
  if (address % 16 != 0 || static_cast<size_t>(address) + size > s.dynamic_shared.bytes) {
    fail_in_fiber(s, std::string(what) + " at shared address " + std::to_string(address) + ": must be 16-byte aligned "
                     "and inside the " + std::to_string(s.dynamic_shared.bytes) + " bytes of dynamic shared memory");
  }
  return s.dynamic_shared.base + address;
}

}  // namespace

// ------------------------------------------------------------------ public entry points

Builtins builtins{};

Session::Session(std::vector<Buffer> buffers) {
  std::unique_lock<std::mutex> lock(session_mutex);
  auto fresh = std::make_unique<State>();
  fresh->owner = pthread_self();
  fresh->buffers = std::move(buffers);
  fresh->read_only = module_read_only_segments();
  state = fresh.release();
  lock.release();  // held until the destructor
}

Session::~Session() {
  delete state;
  state = nullptr;
  session_mutex.unlock();
}

bool Session::failed() const { return state->failed; }
std::string Session::error() const { return state->error; }

void set_sm_count(int count) { simulated_sm_count.store(count > 0 ? count : 1); }
int sm_count() { return simulated_sm_count.load(); }

Stats stats() {
  std::lock_guard<std::mutex> lock(session_mutex);
  return counters;
}

void reset_stats() {
  std::lock_guard<std::mutex> lock(session_mutex);
  counters = Stats{};
}

void allow_dynamic_shared(const void* kernel, size_t bytes) {
  std::lock_guard<std::mutex> lock(kernel_limits_mutex);
  dynamic_shared_limits[kernel] = bytes;
}

bool run_grid(const char* name, const void* kernel, Index3 grid, Index3 block, size_t dynamic_shared_bytes,
              Entry entry, const void* arguments, size_t argument_bytes) {
  if (state == nullptr || !pthread_equal(state->owner, pthread_self())) {
    throw std::logic_error("simt: a kernel launch outside a session");
  }
  State& s = *state;
  if (s.failed) return false;
  const auto started = std::chrono::steady_clock::now();
  s.launch = Launch{name, grid, block, entry, const_cast<void*>(arguments), reinterpret_cast<uintptr_t>(arguments),
                    reinterpret_cast<uintptr_t>(arguments) + argument_bytes};
  size_t dynamic_limit = kDefaultDynamicLimit;
  {
    std::lock_guard<std::mutex> lock(kernel_limits_mutex);
    const auto found = dynamic_shared_limits.find(kernel);
    if (found != dynamic_shared_limits.end()) dynamic_limit = found->second;
  }
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  std::string refusal;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535 || grid.x > 2147483647u) {
    refusal = "grid " + format_index(grid) + " and block " + format_index(block) + " are outside CUDA's limits";
  } else if (dynamic_shared_bytes > dynamic_limit) {
    refusal = std::to_string(dynamic_shared_bytes) + " bytes of dynamic shared memory, over the " +
              std::to_string(dynamic_limit) + " the kernel may use (over 48 KiB needs cudaFuncSetAttribute)";
  } else if (dynamic_shared_bytes > kMaxSharedBytes) {
    refusal = std::to_string(dynamic_shared_bytes) + " bytes of dynamic shared memory, over sm_80's 163 KiB";
  }
  if (!refusal.empty()) {
    record_failure(s, "kernel " + std::string(name) + ": invalid launch: " + refusal);
    return false;
  }
  s.dynamic_shared.name = "dynamic shared memory";
  s.dynamic_shared.reset(dynamic_shared_bytes);
  s.static_shared.name = "static shared memory";
  s.static_shared.reset(kStaticArenaBytes);
  s.static_slots.clear();
  s.static_used = 0;
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

void* dynamic_shared() { return active().dynamic_shared.base; }

void* static_shared(int key, size_t bytes, size_t alignment) {
  State& s = active();
  const auto found = s.static_slots.find(key);
  if (found != s.static_slots.end()) {
    if (found->second.bytes != bytes) fail_in_fiber(s, "a __shared__ variable declared with two sizes");
    return s.static_shared.base + found->second.offset;
  }
  const size_t offset = (s.static_used + alignment - 1) / alignment * alignment;
  if (offset + bytes > kStaticArenaBytes) fail_in_fiber(s, "static __shared__ variables over 48 KiB");
  s.static_slots[key] = StaticSlot{offset, bytes};
  s.static_used = offset + bytes;
  return s.static_shared.base + offset;
}

uint32_t shared_address(const void* generic) {
  State& s = active();
  const uintptr_t address = reinterpret_cast<uintptr_t>(generic);
  if (address < s.dynamic_shared.lo() || address > s.dynamic_shared.hi()) {
    fail_in_fiber(s, "__cvta_generic_to_shared of an address outside dynamic shared memory (" + hex(address) + ")");
  }
  return static_cast<uint32_t>(address - s.dynamic_shared.lo());
}

void sync_threads() {
  State& s = active();
  Thread& t = *s.current;
  if (s.warps[t.warp].arrived > 0) {
    fail_in_fiber(s, std::string("__syncthreads while other lanes of the warp wait in ") + op_name(s.warps[t.warp].op));
  }
  // Stricter than PTX's bar.sync, which waits only for threads that have not exited: the
  // CUDA C++ guide asks every thread of the block to reach each __syncthreads.
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
  if (width <= 0 || width > kWarpSize || (width & (width - 1)) != 0) {
    fail_in_fiber(s, "shuffle width must be a power of 2 in 1..32");
  }
  const uint64_t in[4] = {bits, static_cast<uint64_t>(static_cast<int64_t>(lane_arg)), static_cast<uint64_t>(mode),
                          static_cast<uint64_t>(width)};
  State* self = &s;
  LaneSlot& slot = collective(s, Op::kShuffle, mask, in, 4, [self](LaneSlot* lanes) {
    require_uniform(*self, lanes, 2, "the shuffle mode");
    require_uniform(*self, lanes, 3, "the shuffle width");
    const int width = static_cast<int>(lanes[0].in[3]);
    for (int lane = 0; lane < kWarpSize; ++lane) {
      const int arg = static_cast<int>(static_cast<int64_t>(lanes[lane].in[1]));
      const int base = lane & ~(width - 1);  // the lane's segment of `width` lanes
      int source = lane;
      switch (static_cast<Shuffle>(lanes[lane].in[2])) {
        case Shuffle::kIndex: source = base + (arg & (width - 1)); break;
        case Shuffle::kUp: source = lane - arg >= base ? lane - arg : lane; break;
        case Shuffle::kDown: source = lane + arg < base + width ? lane + arg : lane; break;
        // Earlier segments may be read, later ones give the lane its own value (CUDA guide, __shfl_xor_sync).
        case Shuffle::kXor: source = (lane ^ (arg & 31)) < base + width ? lane ^ (arg & 31) : lane; break;
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
// of other threads (atomics among themselves never race); atomics are not recorded, so a
// plain access after another thread's atomic in the same barrier interval goes unseen.
template <typename T>
T atomic_update(T* address, T value) {
  State& s = active();
  const uintptr_t a = reinterpret_cast<uintptr_t>(address);
  const Thread& t = *s.current;
  if (!inside(a, sizeof(T), t.stack.lo, t.stack.hi)) {
    SharedRegion* region = nullptr;
    for (SharedRegion* candidate : {&s.dynamic_shared, &s.static_shared}) {
      if (inside(a, sizeof(T), candidate->lo(), candidate->hi())) region = candidate;
    }
    if (region == nullptr) check_global(s, a, sizeof(T), true);
    for (size_t i = 0; region != nullptr && i < sizeof(T); ++i) {
      const Shadow& b = region->shadow[a - region->lo() + i];
      if (b.epoch != s.barrier_epoch) continue;
      const bool plain_write = b.writer >= 0 && b.writer != t.id;
      const bool plain_read = (b.reader_warps & ~(1u << t.warp)) != 0 ||
                              (b.reader_warp == t.warp && (b.reader_lanes & ~(1u << t.lane)) != 0);
      if (plain_write || plain_read) {
        fail_in_fiber(s, std::string("race: an atomic on ") + region->name + " byte " +
                             std::to_string(a - region->lo() + i) +
                             " meets a plain access of another thread with no __syncthreads between");
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
// The source is read now; the 16 bytes land in shared memory at this thread's wait, and
// until then any access to them, by any thread, is an error.
void cp_async_16(uint32_t shared_destination, const void* global_source, bool valid) {
  State& s = active();
  Thread& t = *s.current;
  shared_bytes(s, shared_destination, 16, "cp.async destination");
  PendingCopy copy{shared_destination, {}};
  if (valid) {
    const uintptr_t source = reinterpret_cast<uintptr_t>(global_source);
    if (source % 16 != 0) fail_in_fiber(s, "cp.async source " + hex(source) + " is not 16-byte aligned");
    check_global(s, source, 16, false);
    std::memcpy(copy.bytes, global_source, 16);
  }
  for (uint32_t i = 0; i < 16; ++i) {
    int16_t& owner = s.dynamic_shared.pending[shared_destination + i];
    if (owner >= 0) {
      fail_in_fiber(s, "cp.async to dynamic shared byte " + std::to_string(shared_destination + i) +
                           " that an earlier cp.async of " + thread_name(s, owner) + " has not landed");
    }
    owner = static_cast<int16_t>(t.id);
  }
  t.copies.push_back(copy);
}

// Groups only order the waits; cp.async.wait_all lands every copy of the thread, so the
// runtime keeps no group boundaries.
void cp_async_commit() { active(); }

void cp_async_wait_all() {
  State& s = active();
  Thread& t = *s.current;
  for (const PendingCopy& copy : t.copies) {
    for (uint32_t i = 0; i < 16; ++i) s.dynamic_shared.pending[copy.destination + i] = -1;
    race_check(s, t, s.dynamic_shared, copy.destination, 16, true);
    std::memcpy(s.dynamic_shared.base + copy.destination, copy.bytes, 16);
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
    require_uniform(*self, lanes, 1, ".trans");
    uint16_t rows[4][8][8];
    for (int provider = 0; provider < kWarpSize; ++provider) {
      const uint32_t address = static_cast<uint32_t>(lanes[provider].in[0]);
      const uint8_t* row = shared_bytes(*self, address, 16, "ldmatrix row");
      race_check(*self, self->threads[warp_base + provider], self->dynamic_shared, address, 16, false);
      std::memcpy(rows[provider / 8][provider % 8], row, 16);
    }
    const bool trans = lanes[0].in[1] != 0;
    for (int lane = 0; lane < kWarpSize; ++lane) {
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

std::string last_error() {
  const bool mine = state != nullptr && pthread_equal(state->owner, pthread_self());
  return mine ? state->error : last_message;
}

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
// (GCC leaves out accesses it proves in bounds of a static object: the kernels' static
// shared variables are therefore reached through UNMASK_SHARED, never declared static.)
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
