// cuda_emu.h — runs CUDA kernels written against cpp/cuda/compat.cuh on the CPU: dim3, threadIdx/blockIdx/
// blockDim/gridDim, __syncthreads, dynamic shared memory and a synchronous launch. Every thread of a block is a
// fiber (a bare stack switch on x86-64, else ucontext) on the calling OS thread, switched only at __syncthreads:
// all threads of the block run up to the barrier, then all go on. Adversarial by design: the blocks of a grid run
// one at a time in a seeded shuffled order, the threads of a block in a fresh seeded order every barrier phase, and
// shared memory and the top of each fiber's stack start out as NaN-like garbage; a barrier that only some threads
// reach (optionally: that they reach at different calls), a fiber's stack overflow and an access past the dynamic
// shared memory are reported. Single-threaded: one launch at a time, from one OS thread.
#ifndef GN_CUDA_EMU_H_
#define GN_CUDA_EMU_H_

#include <dlfcn.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// CUDA's dim3: every component defaults to 1.
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The running emulated thread's coordinates (set by the scheduler before it resumes each fiber).
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace gn_emu {

// The cudaError_t values launch returns.
enum : int {
  kSuccess = 0,
  kErrorInvalidConfiguration = 9,  // bad grid/block dimensions or too much dynamic shared memory
  kErrorLaunchFailure = 719,       // a barrier reached by only some threads of a block (a hang or UB on a GPU)
};

constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxSharedBytes = 48 * 1024;  // the default dynamic shared memory limit, without opt-in
constexpr size_t kFiberStackBytes = 64 * 1024;
constexpr size_t kPoisonedStackBytes = 4096;  // the top of each fiber's stack, refilled with garbage per block

// Counters since the start of the process, for timing reports.
struct Stats {
  uint64_t launches = 0, blocks = 0, threads = 0, switches = 0, barriers = 0;
};

namespace detail {

constexpr uint8_t kRunning = 0, kAtBarrier = 1, kFinished = 2;

inline uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Fisher-Yates with splitmix64 (std::shuffle's distribution is implementation-defined: the same seed would give
// another order under another standard library).
template <class I>
void shuffle(I* first, size_t count, uint64_t& state) {
  for (size_t i = count; i > 1; --i) std::swap(first[i - 1], first[splitmix64(state) % i]);
}

#if defined(__x86_64__) && !defined(GN_EMU_UCONTEXT)
// A context is the stack pointer of a suspended fiber, whose stack holds its callee-saved registers, MXCSR and the
// x87 control word (System V: everything else is caller-saved), and where it resumes. About 20 times cheaper than
// swapcontext, which also saves and restores the signal mask with a system call. -DGN_EMU_UCONTEXT forces the
// portable ucontext path.
#define GN_EMU_SWITCH "x86-64 stack switch"
struct FiberContext {
  void* sp;
};

// Saves the running context's registers on its stack and its stack pointer in *save, then resumes `next`.
__attribute__((naked, noinline)) static void switch_stack(void** /*save*/, void* /*next*/) {
  asm volatile(
      "pushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n\t"
      "subq $8, %rsp\n\tstmxcsr (%rsp)\n\tfnstcw 4(%rsp)\n\t"
      "movq %rsp, (%rdi)\n\tmovq %rsi, %rsp\n\t"
      "ldmxcsr (%rsp)\n\tfldcw 4(%rsp)\n\taddq $8, %rsp\n\t"
      "popq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n\t"
      "ret\n\t");
}

// A fresh context on the `size` bytes at `stack` that enters entry() as if called (it must never return): the
// stack as switch_stack leaves it, the current MXCSR and x87 control word, zero registers, entry as the return
// address and a null one above it.
inline void make_context(FiberContext& ctx, unsigned char* stack, size_t size, void (*entry)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 72);
  uint32_t mxcsr;
  uint16_t fcw;
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(mxcsr), "=m"(fcw));
  std::memset(sp, 0, 72);
  std::memcpy(sp, &mxcsr, 4);
  std::memcpy(reinterpret_cast<unsigned char*>(sp) + 4, &fcw, 2);
  sp[7] = reinterpret_cast<uint64_t>(entry);  // popped by ret, after the eight-byte control words and six registers
  ctx.sp = sp;
}

// Suspends slot `from` (or, when it is finished, drops it) and resumes slot `to`.
inline void jump(FiberContext* contexts, unsigned from, bool from_finished, unsigned to) {
  void* discarded;
  switch_stack(from_finished ? &discarded : &contexts[from].sp, contexts[to].sp);
}

inline void init_context(FiberContext&) {}
#else
#define GN_EMU_SWITCH "ucontext"
struct FiberContext {
  ucontext_t uc;
};

inline void init_context(FiberContext& ctx) { getcontext(&ctx.uc); }

inline void make_context(FiberContext& ctx, unsigned char* stack, size_t size, void (*entry)()) {
  ctx.uc.uc_stack.ss_sp = stack;
  ctx.uc.uc_stack.ss_size = size;
  ctx.uc.uc_link = nullptr;
  makecontext(&ctx.uc, entry, 0);
}

inline void jump(FiberContext* contexts, unsigned from, bool from_finished, unsigned to) {
  if (from_finished)
    setcontext(&contexts[to].uc);
  else
    swapcontext(&contexts[from].uc, &contexts[to].uc);
}
#endif

// One emulated block in flight: its fibers, their order in the current barrier phase, and how far it got.
struct Runtime {
  // Options.
  uint64_t seed = 1;  // 0: blocks and threads in index order, shared memory still poisoned
  bool quiet = false;
  bool check_barrier_sites = false;
  const char* fault_note = nullptr;  // what the program was doing, for the fault report
  Stats stats;
  char last_error[1024] = "";

  // Fibers: one saved context per thread slot and one for the scheduler (slot kMaxThreadsPerBlock), and stacks
  // for up to kMaxThreadsPerBlock threads, made once; each stack sits above a PROT_NONE page that catches its
  // overflow.
  FiberContext* contexts = nullptr;
  unsigned char* stacks = nullptr;
  size_t stack_stride = 0, page = 0;

  // Dynamic shared memory: kMaxSharedBytes below a PROT_NONE page; a launch's buffer ends at that page.
  unsigned char* shared_region = nullptr;
  unsigned char* shared_base = nullptr;
  size_t shared_bytes = 0;

  // The launch and block in flight.
  bool in_launch = false;
  void (*invoke)(const void*) = nullptr;
  const void* args = nullptr;
  uint64_t launch_index = 0, launch_state = 0;
  uint64_t launches_since_seed = 0;  // a launch's orders depend on the seed and this count alone
  unsigned threads = 0;
  std::vector<uint16_t> order;  // order[pos]: the thread that runs pos-th in this phase
  std::vector<uint8_t> state;
  unsigned pos = 0, arrived = 0, finished = 0, phase = 0;
  void* barrier_site = nullptr;  // where this phase's first arrival called __syncthreads
  unsigned split_thread = 0;     // a thread that reached another __syncthreads call this phase, if split_site
  void* split_site = nullptr;
  bool failed = false;

  ~Runtime() = delete;  // lives for the whole process (the signal handler reads it)
};

inline Runtime& runtime() {
  static Runtime* rt = new Runtime();
  return *rt;
}

[[noreturn]] inline void fail_hard(const char* what) {
  std::fprintf(stderr, "cuda_emu: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

// Records (and, unless quiet, prints) a launch error; returns code.
__attribute__((format(printf, 2, 3))) inline int report(int code, const char* fmt, ...) {
  Runtime& rt = runtime();
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(rt.last_error, sizeof rt.last_error, fmt, args);
  va_end(args);
  if (!rt.quiet) std::fprintf(stderr, "cuda_emu: %s\n", rt.last_error);
  return code;
}

// "module+0xoffset" of a code address, for addr2line.
inline void describe_site(void* site, char* out, size_t size) {
  Dl_info info;
  if (site && dladdr(site, &info) && info.dli_fname)
    std::snprintf(out, size, "%s+0x%zx", info.dli_fname, size_t((char*)site - (char*)info.dli_fbase));
  else
    std::snprintf(out, size, "%p", site);
}

inline dim3 thread_coordinates(unsigned linear) {
  return dim3(linear % blockDim.x, linear / blockDim.x % blockDim.y, linear / (blockDim.x * blockDim.y));
}

inline void new_phase_order(Runtime& rt) {
  for (unsigned t = 0; t < rt.threads; ++t) rt.order[t] = uint16_t(t);
  if (rt.seed != 0) shuffle(rt.order.data(), rt.threads, rt.launch_state);
}

// Makes thread `next` current and runs it; `from` is suspended (or, finished, abandoned).
inline void switch_to(Runtime& rt, unsigned from, bool from_finished, unsigned next) {
  threadIdx = thread_coordinates(next);
  if (next == from) return;
  ++rt.stats.switches;
  jump(rt.contexts, from, from_finished, next);
}

inline void to_scheduler(Runtime& rt, unsigned from, bool from_finished) {
  ++rt.stats.switches;
  jump(rt.contexts, from, from_finished, kMaxThreadsPerBlock);  // a suspended `from` is never resumed
}

// Thread `from` has reached a barrier or finished: run the next thread of this phase, or end the phase.
inline void advance(Runtime& rt, unsigned from, bool from_finished) {
  if (++rt.pos < rt.threads) return switch_to(rt, from, from_finished, rt.order[rt.pos]);
  if (rt.finished == rt.threads) return to_scheduler(rt, from, true);  // the block is done
  if (rt.finished > 0 || rt.split_site != nullptr) {
    rt.failed = true;
    return to_scheduler(rt, from, from_finished);
  }
  rt.arrived = 0;  // every thread waits at the same barrier: release them all
  ++rt.phase;
  ++rt.stats.barriers;
  std::fill(rt.state.begin(), rt.state.begin() + rt.threads, kRunning);
  new_phase_order(rt);
  rt.pos = 0;
  switch_to(rt, from, from_finished, rt.order[0]);
}

inline void barrier(void* site) {
  Runtime& rt = runtime();
  if (!rt.in_launch) fail_hard("__syncthreads() called outside a kernel launch");
  const unsigned self = rt.order[rt.pos];
  rt.state[self] = kAtBarrier;
  if (rt.arrived++ == 0) {
    rt.barrier_site = site;
  } else if (rt.check_barrier_sites && site != rt.barrier_site && rt.split_site == nullptr) {
    rt.split_site = site;
    rt.split_thread = self;
  }
  advance(rt, self, false);
}

[[noreturn]] inline void fiber_entry() {
  Runtime& rt = runtime();
  const unsigned self = rt.order[rt.pos];
  rt.invoke(rt.args);
  rt.state[self] = kFinished;
  ++rt.finished;
  advance(rt, self, true);
  fail_hard("a finished fiber was resumed");
}

// SIGSEGV/SIGBUS/SIGFPE: say which emulated thread faulted (or that host code did) and whether it hit a stack or
// shared memory guard page, then die by the signal as before.
inline void fault_handler(int sig, siginfo_t* info, void*) {
  Runtime& rt = runtime();
  const unsigned char* address = static_cast<const unsigned char*>(info->si_addr);
  char what[512];
  if (!rt.in_launch) {
    std::snprintf(what, sizeof what, "outside any kernel launch (host code)");
  } else {
    const char* region = "";
    if (rt.stacks && address >= rt.stacks && address < rt.stacks + rt.stack_stride * kMaxThreadsPerBlock &&
        size_t(address - rt.stacks) % rt.stack_stride < rt.page)
      region = ": a fiber stack overflowed its 64 KiB (kFiberStackBytes)";
    else if (rt.shared_region && address >= rt.shared_region + kMaxSharedBytes &&
             address < rt.shared_region + kMaxSharedBytes + rt.page)
      region = ": an access past the end of the launch's dynamic shared memory";
    else if (rt.shared_region && address >= rt.shared_region && address < rt.shared_base)
      region = ": an access before the start of the launch's dynamic shared memory";
    std::snprintf(what, sizeof what,
                  "in launch #%llu, block (%u,%u,%u) of (%u,%u,%u), thread (%u,%u,%u) of (%u,%u,%u), barrier phase "
                  "%u, dynamic shared memory %zu bytes%s",
                  (unsigned long long)rt.launch_index, blockIdx.x, blockIdx.y, blockIdx.z, gridDim.x, gridDim.y,
                  gridDim.z, threadIdx.x, threadIdx.y, threadIdx.z, blockDim.x, blockDim.y, blockDim.z, rt.phase,
                  rt.shared_bytes, region);
  }
  const char* name = sig == SIGSEGV ? "SIGSEGV" : sig == SIGBUS ? "SIGBUS" : "SIGFPE (an integer division by zero?)";
  char line[1280];
  const int n = std::snprintf(line, sizeof line, "cuda_emu: %s at address %p %s%s%s\n", name, info->si_addr, what,
                              rt.fault_note ? "; while: " : "", rt.fault_note ? rt.fault_note : "");
  if (n > 0) (void)!write(2, line, size_t(std::min(n, int(sizeof line) - 1)));
  signal(sig, SIG_DFL);
  raise(sig);
}

inline void initialise(Runtime& rt) {
  if (rt.contexts) return;
  rt.page = size_t(sysconf(_SC_PAGESIZE));
  rt.stack_stride = rt.page + kFiberStackBytes;
  const size_t stack_total = rt.stack_stride * kMaxThreadsPerBlock;
  void* stacks = mmap(nullptr, stack_total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                      -1, 0);
  void* shared = mmap(nullptr, kMaxSharedBytes + rt.page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (stacks == MAP_FAILED || shared == MAP_FAILED) fail_hard("mmap of the fiber stacks or shared memory failed");
  rt.stacks = static_cast<unsigned char*>(stacks);
  for (unsigned t = 0; t < kMaxThreadsPerBlock; ++t)
    if (mprotect(rt.stacks + t * rt.stack_stride, rt.page, PROT_NONE) != 0) fail_hard("mprotect failed");
  rt.shared_region = static_cast<unsigned char*>(shared);
  if (mprotect(rt.shared_region + kMaxSharedBytes, rt.page, PROT_NONE) != 0) fail_hard("mprotect failed");
  rt.contexts = new FiberContext[kMaxThreadsPerBlock + 1];
  for (unsigned t = 0; t <= kMaxThreadsPerBlock; ++t) init_context(rt.contexts[t]);
  rt.order.resize(kMaxThreadsPerBlock);
  rt.state.resize(kMaxThreadsPerBlock);

  // The handler runs on its own stack: a fiber's overflow leaves it none.
  static unsigned char alternate_stack[64 * 1024];
  stack_t ss{};
  ss.ss_sp = alternate_stack;
  ss.ss_size = sizeof alternate_stack;
  sigaltstack(&ss, nullptr);
  struct sigaction action {};
  action.sa_sigaction = fault_handler;
  action.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&action.sa_mask);
  sigaction(SIGSEGV, &action, nullptr);
  sigaction(SIGBUS, &action, nullptr);
  sigaction(SIGFPE, &action, nullptr);
}

}  // namespace detail

// Installs the fault report now (a launch does it too), for faults in host code before the first launch.
inline void install_fault_handler() { detail::initialise(detail::runtime()); }

namespace detail {

// Runs block blockIdx of the launch in flight to its end; false when its threads split at a barrier.
inline bool run_block(Runtime& rt) {
  const unsigned char fill = (rt.launch_state & 1) ? 0xff : 0x7f;  // NaN everywhere / NaN, huge or -1 mixes
  std::memset(rt.shared_base, fill, rt.shared_bytes);
  for (unsigned t = 0; t < rt.threads; ++t) {
    unsigned char* stack = rt.stacks + t * rt.stack_stride + rt.page;
    std::memset(stack + kFiberStackBytes - kPoisonedStackBytes, 0xff, kPoisonedStackBytes);
    make_context(rt.contexts[t], stack, kFiberStackBytes, fiber_entry);
  }
  std::fill(rt.state.begin(), rt.state.begin() + rt.threads, kRunning);
  rt.pos = rt.arrived = rt.finished = rt.phase = 0;
  rt.split_site = nullptr;
  rt.failed = false;
  new_phase_order(rt);
  threadIdx = thread_coordinates(rt.order[0]);
  ++rt.stats.switches;
  jump(rt.contexts, kMaxThreadsPerBlock, false, rt.order[0]);
  ++rt.stats.blocks;
  rt.stats.threads += rt.threads;
  return !rt.failed;
}

// The message for a block whose threads split at a barrier.
inline int report_split(Runtime& rt) {
  char site[256], other[256];
  describe_site(rt.barrier_site, site, sizeof site);
  if (rt.split_site != nullptr) {
    describe_site(rt.split_site, other, sizeof other);
    const dim3 t = thread_coordinates(rt.split_thread);
    return report(kErrorLaunchFailure,
                  "launch #%llu, block (%u,%u,%u): threads of one block reached different __syncthreads() calls in "
                  "barrier phase %u (%s, and thread (%u,%u,%u) at %s); CUDA leaves that undefined",
                  (unsigned long long)rt.launch_index, blockIdx.x, blockIdx.y, blockIdx.z, rt.phase, site, t.x, t.y,
                  t.z, other);
  }
  unsigned first_finished = 0, first_waiting = 0;
  while (rt.state[first_finished] != kFinished) ++first_finished;
  while (rt.state[first_waiting] != kAtBarrier) ++first_waiting;
  const dim3 f = thread_coordinates(first_finished), w = thread_coordinates(first_waiting);
  return report(kErrorLaunchFailure,
                "launch #%llu, block (%u,%u,%u): __syncthreads() at %s in barrier phase %u reached by %u of %u "
                "threads, the other %u had returned (thread (%u,%u,%u) returned, thread (%u,%u,%u) waits): a "
                "deadlock or undefined behaviour on a GPU",
                (unsigned long long)rt.launch_index, blockIdx.x, blockIdx.y, blockIdx.z, site, rt.phase, rt.arrived,
                rt.threads, rt.finished, f.x, f.y, f.z, w.x, w.y, w.z);
}

template <class Tuple, size_t... I>
void invoke_kernel(const void* packed, std::index_sequence<I...>) {
  const auto& call = *static_cast<const Tuple*>(packed);
  std::get<0>(call)(std::get<I + 1>(call)...);  // each thread gets its own copies of the parameters
}

}  // namespace detail

// The seed of the block and thread orders and of the shared-memory garbage (each launch derives its own from it
// and the number of launches since it was set); 0 runs blocks and threads in index order.
inline void set_seed(uint64_t seed) {
  detail::runtime().seed = seed;
  detail::runtime().launches_since_seed = 0;
}
inline uint64_t seed() { return detail::runtime().seed; }
// Quiet: launch errors are only kept for last_error(), not printed to stderr.
inline void set_quiet(bool quiet) { detail::runtime().quiet = quiet; }
inline const char* last_error() { return detail::runtime().last_error; }
// Whether the threads of a barrier phase must all wait at the same __syncthreads() call (its return address). Off
// by default: an optimising host compiler may duplicate a call into the arms of a branch before it (GCC -O2 does,
// in a loop of `if (t < off) ...; __syncthreads();`), and the copies have different addresses.
inline void set_check_barrier_sites(bool on) { detail::runtime().check_barrier_sites = on; }
// A line the fault report adds (the caller's current case); the string must outlive its use.
inline void set_fault_note(const char* note) { detail::runtime().fault_note = note; }
inline Stats stats() { return detail::runtime().stats; }

// The current block's dynamic shared memory: the launch's shared_bytes, 16-byte aligned, ending at a guard page.
inline unsigned char* shared_memory() { return detail::runtime().shared_base; }

// Runs kernel<<<grid, block, shared_bytes>>>(args...) to completion. 0 on success; kErrorInvalidConfiguration
// for dimensions or shared memory beyond CUDA's limits (nothing runs then); kErrorLaunchFailure when the threads
// of a block split at a barrier (the blocks after it do not run).
template <class... P, class... A>
int launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes, A... args) {
  static_assert(sizeof...(P) == sizeof...(A), "launch: argument count differs from the kernel's parameters");
  using detail::report;
  detail::Runtime& rt = detail::runtime();
  if (rt.in_launch) detail::fail_hard("launch from inside a kernel (dynamic parallelism) is not emulated");
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || block.x > 1024 || block.y > 1024 || block.z > 64)
    return report(kErrorInvalidConfiguration, "invalid block (%u,%u,%u): 1..1024 threads, z <= 64", block.x,
                  block.y, block.z);
  if (grid.x == 0 || grid.x > 0x7fffffffu || grid.y == 0 || grid.y > 65535 || grid.z == 0 || grid.z > 65535)
    return report(kErrorInvalidConfiguration, "invalid grid (%u,%u,%u): x in 1..2^31-1, y and z in 1..65535",
                  grid.x, grid.y, grid.z);
  if (shared_bytes > kMaxSharedBytes)
    return report(kErrorInvalidConfiguration, "%zu bytes of dynamic shared memory: more than %zu", shared_bytes,
                  kMaxSharedBytes);
  detail::initialise(rt);

  using Call = std::tuple<void (*)(P...), P...>;
  const Call call(kernel, static_cast<P>(args)...);
  rt.invoke = [](const void* packed) { detail::invoke_kernel<Call>(packed, std::index_sequence_for<P...>{}); };
  rt.args = &call;
  rt.threads = unsigned(threads);
  rt.shared_bytes = shared_bytes;
  rt.shared_base = rt.shared_region + kMaxSharedBytes - (shared_bytes + 15) / 16 * 16;
  rt.launch_index = rt.stats.launches++;
  uint64_t mix = rt.seed ^ (rt.launches_since_seed++ * 0xd1b54a32d192ed03ull);
  rt.launch_state = detail::splitmix64(mix);
  gridDim = grid;
  blockDim = block;

  // Blocks in a shuffled order: an explicit permutation, or past 2^24 blocks an affine one (i * a + b mod n, a
  // coprime to n).
  const uint64_t count = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint32_t> permutation;
  uint64_t stride = 1, offset = 0;
  if (rt.seed != 0 && count <= (uint64_t(1) << 24)) {
    permutation.resize(count);
    for (uint64_t i = 0; i < count; ++i) permutation[i] = uint32_t(i);
    detail::shuffle(permutation.data(), permutation.size(), rt.launch_state);
  } else if (rt.seed != 0) {
    auto gcd = [](uint64_t a, uint64_t b) { while (b) { a %= b; std::swap(a, b); } return a; };
    do stride = detail::splitmix64(rt.launch_state) % count; while (gcd(stride, count) != 1);
    offset = detail::splitmix64(rt.launch_state) % count;
  }
  rt.in_launch = true;
  int status = kSuccess;
  for (uint64_t i = 0; i < count; ++i) {
    const uint64_t linear =
        permutation.empty() ? uint64_t(((unsigned __int128)i * stride + offset) % count) : permutation[i];
    blockIdx = dim3(unsigned(linear % grid.x), unsigned(linear / grid.x % grid.y),
                    unsigned(linear / (uint64_t(grid.x) * grid.y)));
    if (!detail::run_block(rt)) {
      status = detail::report_split(rt);
      break;
    }
  }
  rt.in_launch = false;
  rt.args = nullptr;
  return status;
}

}  // namespace gn_emu

// CUDA's block barrier. Opaque to the caller's optimiser (GCC's noipa: no inlining, and no inference of what it
// reads or writes), so that no value in memory is carried across it in a register: other threads run inside it.
// Not inlined also so that its return address names the call site (set_check_barrier_sites).
#if defined(__clang__)
__attribute__((noinline)) inline void __syncthreads() { gn_emu::detail::barrier(__builtin_return_address(0)); }
#else
__attribute__((noinline, noipa)) inline void __syncthreads() { gn_emu::detail::barrier(__builtin_return_address(0)); }
#endif

#endif  // GN_CUDA_EMU_H_
