// emu_selftest.cpp — checks the CUDA emulator (cuda_emu.h) itself with small kernels of its own: coordinates, a
// shared-memory tree reduction behind __syncthreads, other threads' stores seen across a barrier (none carried in a
// register), the launch limits, barriers that only some threads reach (or that threads reach at different calls),
// the block and thread orders, the garbage in fresh shared memory, a missing barrier changing results with the
// seed, and the fault report of a fiber's stack overflow and of a write past the shared memory (in forked
// children). Prints the cost of a fiber switch. Last line: "N passed, M failed".
// Build: c++ -O2 -std=c++17 -I tests/cuda_emu tests/cuda_emu/emu_selftest.cpp [-ldl: glibc before 2.34]
#include "cuda_emu.h"

#include <sys/wait.h>

#include <chrono>
#include <cmath>
#include <cstdarg>
#include <string>

namespace {

int g_passed = 0, g_failed = 0;

__attribute__((format(printf, 2, 3))) bool expect(bool ok, const char* fmt, ...) {
  if (ok) {
    ++g_passed;
    return true;
  }
  ++g_failed;
  va_list args;
  va_start(args, fmt);
  std::printf("FAIL ");
  std::vprintf(fmt, args);
  std::printf("\n");
  va_end(args);
  return false;
}

// ---- kernels ----------------------------------------------------------------------------------------------

struct Coordinates {
  unsigned t[3], b[3], bd[3], gd[3];
};

void record_coordinates(Coordinates* out) {
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  Coordinates& c = out[block * blockDim.x * blockDim.y * blockDim.z + thread];
  c = {{threadIdx.x, threadIdx.y, threadIdx.z}, {blockIdx.x, blockIdx.y, blockIdx.z},
       {blockDim.x, blockDim.y, blockDim.z}, {gridDim.x, gridDim.y, gridDim.z}};
  __syncthreads();  // the coordinates must survive a switch
  if (c.t[0] != threadIdx.x || c.b[0] != blockIdx.x) c.t[0] = ~0u;
}

// Sum of each block's slice of x (blockDim.x values a thread, any blockDim.x), in a tree over shared memory.
void block_sum(const double* x, long per_block, double* sums) {
  double* partial = reinterpret_cast<double*>(gn_emu::shared_memory());
  double acc = 0;
  for (long i = threadIdx.x; i < per_block; i += blockDim.x) acc += x[blockIdx.x * per_block + i];
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (unsigned width = 1; width < blockDim.x; width *= 2) {
    if (threadIdx.x % (2 * width) == 0 && threadIdx.x + width < blockDim.x)
      partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) sums[blockIdx.x] = partial[0];
}

// The same with the barrier inside the tree left out: a race whose outcome depends on the thread order.
void block_sum_racy(const double* x, long per_block, double* sums) {
  double* partial = reinterpret_cast<double*>(gn_emu::shared_memory());
  double acc = 0;
  for (long i = threadIdx.x; i < per_block; i += blockDim.x) acc += x[blockIdx.x * per_block + i];
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (unsigned width = 1; width < blockDim.x; width *= 2)
    if (threadIdx.x % (2 * width) == 0 && threadIdx.x + width < blockDim.x)
      partial[threadIdx.x] += partial[threadIdx.x + width];
  __syncthreads();
  if (threadIdx.x == 0) sums[blockIdx.x] = partial[0];
}

// Threads below `leavers` return before the barrier the rest wait at.
void early_return(unsigned leavers, int* out) {
  if (threadIdx.x < leavers) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

// Odd and even threads wait at different __syncthreads() calls (helpers with different bodies, so that no
// compiler merges them).
__attribute__((noinline)) void barrier_then_write_one(int* out) {
  __syncthreads();
  out[threadIdx.x] = 1;
}
__attribute__((noinline)) void barrier_then_write_two(int* out) {
  __syncthreads();
  out[threadIdx.x] = 2;
}
void split_barrier(int* out) {
  if (threadIdx.x & 1)
    barrier_then_write_one(out);
  else
    barrier_then_write_two(out);
}

// Thread 0 stores to shared memory, the last thread overwrites it a barrier later: thread 0 must read the new value
// (a compiler that took __syncthreads for a function that leaves memory alone would forward its own store).
void cross_barrier_store(int* out) {
  int* shared = reinterpret_cast<int*>(gn_emu::shared_memory());
  if (threadIdx.x == 0) shared[0] = 1;
  __syncthreads();
  const int first = shared[0];
  __syncthreads();
  if (threadIdx.x == blockDim.x - 1) shared[0] = 2;
  __syncthreads();
  out[threadIdx.x] = first * 10 + shared[0];
}

// Every thread increments its counter once per phase for `phases` phases.
void many_barriers(int phases, int* counters) {
  for (int p = 0; p < phases; ++p) {
    counters[blockIdx.x * blockDim.x + threadIdx.x] += 1;
    __syncthreads();
  }
}

// The order blocks and threads ran in: a global clock (the blocks and threads run one at a time).
long g_clock = 0;
void log_order(long* block_ticks, long* thread_ticks) {
  if (threadIdx.x == 0) block_ticks[blockIdx.x] = g_clock;
  thread_ticks[(blockIdx.x * 2) * blockDim.x + threadIdx.x] = g_clock++;
  __syncthreads();
  thread_ticks[(blockIdx.x * 2 + 1) * blockDim.x + threadIdx.x] = g_clock++;
}

// Copies the first `count` bytes of fresh shared memory and writes its last byte.
void read_fresh_shared(unsigned char* out, size_t count) {
  unsigned char* shared = gn_emu::shared_memory();
  if (threadIdx.x == 0) {
    for (size_t i = 0; i < count; ++i) out[blockIdx.x * count + i] = shared[i];
    shared[count - 1] = 0;
    out[gridDim.x * count + blockIdx.x] = (reinterpret_cast<uintptr_t>(shared) % 16 == 0);
  }
}

void count_blocks(int* hits) {
  if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0)
    hits[blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z)] += 1;
}

struct Params {
  int value[8];
};
// Each thread gets its own copy of the parameters: changing it changes no other thread's.
void params_by_value(Params p, int* out) {
  p.value[0] += int(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = p.value[0];
}

// A 32 KiB array on the fiber's stack (kernels keep small arrays there).
void big_local_array(double* out) {
  volatile double local[4096];
  for (int i = 0; i < 4096; ++i) local[i] = i * double(threadIdx.x + 1);
  __syncthreads();
  double sum = 0;
  for (int i = 0; i < 4096; ++i) sum += local[i];
  out[threadIdx.x] = sum;
}

__attribute__((noinline)) double recurse(volatile char* above, int depth) {
  volatile char frame[1024];
  frame[0] = char(depth);
  frame[1023] = above ? above[0] : 0;
  return depth == 0 ? frame[0] : recurse(frame, depth - 1) + frame[1023];
}
void stack_overflow(double* out) { out[threadIdx.x] = recurse(nullptr, 200); }  // > 200 KiB of frames

void write_past_shared(size_t offset) { gn_emu::shared_memory()[offset] = 1; }

// ---- checks -----------------------------------------------------------------------------------------------

void check_coordinates() {
  const dim3 grid(3, 2, 2), block(4, 3, 2);
  const unsigned total = 3 * 2 * 2 * 4 * 3 * 2;
  std::vector<Coordinates> out(total);
  expect(gn_emu::launch(record_coordinates, grid, block, 0, out.data()) == 0, "coordinates: launch failed");
  unsigned bad = 0;
  for (unsigned i = 0; i < total; ++i) {
    const unsigned thread = i % 24, block_linear = i / 24;
    const Coordinates& c = out[i];
    const unsigned want_t[3] = {thread % 4, thread / 4 % 3, thread / 12};
    const unsigned want_b[3] = {block_linear % 3, block_linear / 3 % 2, block_linear / 6};
    for (int k = 0; k < 3; ++k)
      if (c.t[k] != want_t[k] || c.b[k] != want_b[k]) ++bad;
    if (c.bd[0] != 4 || c.bd[1] != 3 || c.bd[2] != 2 || c.gd[0] != 3 || c.gd[1] != 2 || c.gd[2] != 2) ++bad;
  }
  expect(bad == 0, "coordinates: %u wrong", bad);
}

void check_block_sum() {
  for (unsigned threads : {1u, 3u, 32u, 100u, 256u, 1024u}) {
    const unsigned blocks = 7;
    const long per_block = 3 * long(threads) + 5;
    std::vector<double> x(size_t(blocks * per_block)), sums(blocks, NAN);
    for (size_t i = 0; i < x.size(); ++i) x[i] = double(i % 1000);  // integers: every order sums exactly
    const int st = gn_emu::launch(block_sum, dim3(blocks), dim3(threads), threads * sizeof(double), x.data(),
                                  per_block, sums.data());
    unsigned bad = 0;
    for (unsigned b = 0; b < blocks; ++b) {
      double want = 0;
      for (long i = 0; i < per_block; ++i) want += x[size_t(b * per_block + i)];
      if (sums[b] != want) ++bad;
    }
    expect(st == 0 && bad == 0, "block_sum with %u threads: status %d, %u wrong sums", threads, st, bad);
  }
}

void check_visibility() {
  std::vector<int> out(64);
  const int st = gn_emu::launch(cross_barrier_store, dim3(1), dim3(64), sizeof(int), out.data());
  expect(st == 0 && std::count(out.begin(), out.end(), 12) == 64,
         "stores of other threads across a barrier: status %d, thread 0 read %d (want 12)", st, out[0]);
}

void check_limits() {
  int dummy[1024] = {};
  gn_emu::set_quiet(true);
  const struct {
    dim3 grid, block;
    size_t shared;
    int want;
  } cases[] = {
      {dim3(1), dim3(0), 0, 9},          {dim3(1), dim3(1025), 0, 9},           {dim3(1), dim3(32, 32, 2), 0, 9},
      {dim3(1), dim3(1, 1, 65), 0, 9},   {dim3(0), dim3(32), 0, 9},             {dim3(1, 65536), dim3(32), 0, 9},
      {dim3(1, 1, 0), dim3(32), 0, 9},   {dim3(0x80000000u), dim3(1), 0, 9},    {dim3(1), dim3(32), 48 * 1024 + 1, 9},
      {dim3(1), dim3(1024), 48 * 1024, 0}, {dim3(2, 65535), dim3(1), 0, 0},    {dim3(1), dim3(32, 32, 1), 0, 0},
  };
  for (const auto& c : cases) {
    std::vector<int> hits(c.want == 0 ? size_t(c.grid.x) * c.grid.y * c.grid.z : 0);
    const int st = c.want == 0 ? gn_emu::launch(count_blocks, c.grid, c.block, c.shared, hits.data())
                               : gn_emu::launch(early_return, c.grid, c.block, c.shared, 0u, dummy);
    expect(st == c.want, "limits: grid (%u,%u,%u) block (%u,%u,%u) shared %zu gave %d, want %d (%s)", c.grid.x,
           c.grid.y, c.grid.z, c.block.x, c.block.y, c.block.z, c.shared, st, c.want, gn_emu::last_error());
    if (c.want == 0)
      expect(std::count(hits.begin(), hits.end(), 1) == long(hits.size()), "limits: not every block ran once");
  }
  // More blocks than gridDim.y/z may hold, in x: every block once.
  std::vector<int> hits(70001);
  const int st = gn_emu::launch(count_blocks, dim3(70001), dim3(2), 0, hits.data());
  expect(st == 0 && std::count(hits.begin(), hits.end(), 1) == 70001, "70001 blocks: status %d or not each once", st);
  gn_emu::set_quiet(false);
}

void check_divergence() {
  gn_emu::set_quiet(true);
  std::vector<int> out(256);
  int st = gn_emu::launch(early_return, dim3(4), dim3(256), 0, 5u, out.data());
  expect(st == gn_emu::kErrorLaunchFailure && std::strstr(gn_emu::last_error(), "reached by 251 of 256"),
         "some threads return before a barrier: status %d, message '%s'", st, gn_emu::last_error());
  st = gn_emu::launch(early_return, dim3(4), dim3(256), 0, 255u, out.data());
  expect(st == gn_emu::kErrorLaunchFailure, "all but one thread return before a barrier: status %d", st);
  st = gn_emu::launch(early_return, dim3(4), dim3(256), 0, 256u, out.data());
  expect(st == 0, "every thread returns before the barrier (never reached): status %d (%s)", st, gn_emu::last_error());
  st = gn_emu::launch(early_return, dim3(4), dim3(256), 0, 0u, out.data());
  expect(st == 0, "every thread reaches the barrier: status %d (%s)", st, gn_emu::last_error());
  gn_emu::set_check_barrier_sites(true);
  st = gn_emu::launch(split_barrier, dim3(2), dim3(64), 0, out.data());
  gn_emu::set_check_barrier_sites(false);
  expect(st == gn_emu::kErrorLaunchFailure && std::strstr(gn_emu::last_error(), "different __syncthreads"),
         "threads at different __syncthreads calls: status %d, message '%s'", st, gn_emu::last_error());
  gn_emu::set_quiet(false);
  std::printf("divergence report, for example: %s\n", gn_emu::last_error());
}

void check_orders() {
  const unsigned blocks = 64, threads = 128;
  std::vector<long> block_ticks(blocks), thread_ticks(2 * blocks * threads);
  auto run = [&](uint64_t seed) {
    gn_emu::set_seed(seed);
    g_clock = 0;
    const int st = gn_emu::launch(log_order, dim3(blocks), dim3(threads), 0, block_ticks.data(), thread_ticks.data());
    expect(st == 0, "log_order: status %d", st);
  };
  run(0);
  bool in_order = true;
  for (unsigned b = 0; b < blocks; ++b) in_order = in_order && block_ticks[b] == long(b * 2 * threads);
  for (size_t i = 0; i < thread_ticks.size(); ++i) in_order = in_order && thread_ticks[i] == long(i);
  expect(in_order, "seed 0: blocks and threads not in index order");
  run(12345);
  const std::vector<long> first = block_ticks, first_threads = thread_ticks;
  std::vector<long> positions(blocks);  // thread 0 of the block that ran k-th logs a tick in [2kT, 2kT + T)
  for (unsigned b = 0; b < blocks; ++b) positions[b] = block_ticks[b] / long(2 * threads);
  bool shuffled_blocks = false, shuffled_threads = false;
  for (unsigned b = 0; b < blocks; ++b) shuffled_blocks = shuffled_blocks || positions[b] != long(b);
  std::sort(positions.begin(), positions.end());
  bool permutation = true;
  for (unsigned b = 0; b < blocks; ++b) permutation = permutation && positions[b] == long(b);
  for (unsigned b = 0; b < 2 * blocks; ++b)
    for (unsigned t = 1; t < threads; ++t)
      shuffled_threads = shuffled_threads || thread_ticks[b * threads + t] < thread_ticks[b * threads + t - 1];
  expect(permutation && shuffled_blocks && shuffled_threads,
         "seed 12345: blocks ran once each %d, in shuffled order %d, threads shuffled %d", int(permutation),
         int(shuffled_blocks), int(shuffled_threads));
  run(12346);
  expect(block_ticks != first && thread_ticks != first_threads, "seeds 12345 and 12346 gave the same orders");
  gn_emu::set_seed(1);
}

void check_fresh_shared() {
  const unsigned blocks = 5;
  const size_t count = 100;
  bool saw_ff = false, saw_7f = false, all_poisoned = true, aligned = true;
  for (int launch = 0; launch < 8; ++launch) {
    std::vector<unsigned char> out(blocks * count + blocks);
    const int st = gn_emu::launch(read_fresh_shared, dim3(blocks), dim3(4), count, out.data(), count);
    expect(st == 0, "read_fresh_shared: status %d", st);
    for (unsigned b = 0; b < blocks; ++b) {
      const unsigned char first = out[b * count];
      saw_ff = saw_ff || first == 0xff;
      saw_7f = saw_7f || first == 0x7f;
      for (size_t i = 0; i < count; ++i) all_poisoned = all_poisoned && out[b * count + i] == first && first != 0;
      aligned = aligned && out[blocks * count + b] == 1;
    }
  }
  expect(all_poisoned && saw_ff && saw_7f && aligned,
         "fresh shared memory: each block's filled with one garbage byte %d, 0xff seen %d, 0x7f seen %d, 16-byte "
         "aligned %d", int(all_poisoned), int(saw_ff), int(saw_7f), int(aligned));
}

void check_race_shows() {
  const unsigned blocks = 16, threads = 256;
  const long per_block = threads;
  std::vector<double> x(blocks * per_block), sums(blocks), racy(blocks);
  for (size_t i = 0; i < x.size(); ++i) x[i] = double(i % 97);
  gn_emu::launch(block_sum, dim3(blocks), dim3(threads), threads * sizeof(double), x.data(), per_block, sums.data());
  int differing_seeds = 0;
  for (uint64_t seed = 1; seed <= 4; ++seed) {
    gn_emu::set_seed(seed);
    gn_emu::launch(block_sum_racy, dim3(blocks), dim3(threads), threads * sizeof(double), x.data(), per_block,
                   racy.data());
    differing_seeds += racy != sums;
  }
  gn_emu::set_seed(1);
  expect(differing_seeds == 4, "a missing barrier changed the sums under %d of 4 seeds", differing_seeds);
}

void check_params_and_stack() {
  Params p{};
  p.value[0] = 100;
  std::vector<int> out(64);
  int st = gn_emu::launch(params_by_value, dim3(1), dim3(64), 0, p, out.data());
  bool ok = st == 0;
  for (int t = 0; t < 64; ++t) ok = ok && out[size_t(t)] == 100 + t;
  expect(ok, "parameters by value: status %d or a thread saw another's copy", st);
  std::vector<double> sums(256);
  st = gn_emu::launch(big_local_array, dim3(2), dim3(256), 0, sums.data());
  ok = st == 0;
  for (int t = 0; t < 256; ++t) ok = ok && sums[size_t(t)] == 4095.0 * 4096.0 / 2 * (t + 1);
  expect(ok, "32 KiB stack arrays: status %d or wrong sums", st);
}

// Runs body in a forked child with stderr to a pipe: whether it died of SIGSEGV, and what it printed.
template <class Body>
bool dies_with(Body body, const char* wanted) {
  int fds[2];
  if (pipe(fds) != 0) return false;
  std::fflush(stdout);
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(fds[1], 2);
    close(fds[0]);
    body();
    _exit(0);
  }
  close(fds[1]);
  std::string text;
  char buf[512];
  for (ssize_t n; (n = read(fds[0], buf, sizeof buf)) > 0;) text.append(buf, size_t(n));
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  const bool ok = WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV && text.find(wanted) != std::string::npos;
  if (!ok) std::printf("child status 0x%x, stderr: %s\n", status, text.c_str());
  else std::printf("fault report, for example: %s", text.c_str());
  return ok;
}

void check_faults() {
  expect(dies_with([] {
           std::vector<double> out(32);
           gn_emu::launch(stack_overflow, dim3(1), dim3(32), 0, out.data());
         }, "fiber stack overflowed"),
         "a fiber's stack overflow is reported");
  expect(dies_with([] { gn_emu::launch(write_past_shared, dim3(3), dim3(8), 64, size_t(64)); },
                   "past the end of the launch's dynamic shared memory"),
         "a write past the dynamic shared memory is reported");
}

void time_switches() {
  const unsigned blocks = 64, threads = 256;
  const int phases = 20;
  std::vector<int> counters(blocks * threads);
  const gn_emu::Stats before = gn_emu::stats();
  const auto t0 = std::chrono::steady_clock::now();
  const int st = gn_emu::launch(many_barriers, dim3(blocks), dim3(threads), 0, phases, counters.data());
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const uint64_t switches = gn_emu::stats().switches - before.switches;
  expect(st == 0 && std::count(counters.begin(), counters.end(), phases) == long(counters.size()),
         "many_barriers: status %d or a thread missed a phase", st);
  std::printf("fiber switches (" GN_EMU_SWITCH "): %llu in %.3f s, %.3f us each (%u blocks of %u threads, %d "
              "barriers)\n",
              (unsigned long long)switches, secs, 1e6 * secs / double(switches), blocks, threads, phases);
}

}  // namespace

int main() {
  check_coordinates();
  check_block_sum();
  check_visibility();
  check_limits();
  check_divergence();
  check_orders();
  check_fresh_shared();
  check_race_shows();
  check_params_and_stack();
  check_faults();
  time_switches();
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
