// dispatch.cpp — CPU detection (CPUID + XGETBV on x86-64, hwcaps on aarch64), the kernel table chosen once,
// the thread count, and the public entry points. Compiled with no ISA flag: it must run on every CPU.
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#include <pthread.h>
#define GROUPNORM_FORK_GUARD 1
#endif
#endif

#include "groupnorm/groupnorm.h"
#include "kernels/kernel_table.h"

namespace groupnorm {
namespace {

#if defined(__x86_64__) || defined(_M_X64)
struct X86Features {
  bool avx2 = false;    // AVX2 + FMA + F16C, with the OS saving ymm state
  bool avx512 = false;  // AVX-512 F, BW, DQ, VL, with the OS saving opmask and zmm state
  bool avx512_bf16 = false;  // and AVX512_BF16 (CPUID leaf 7, subleaf 1, EAX bit 5)
};

uint64_t read_xcr0() {
  uint32_t eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

X86Features detect_x86() {
  X86Features f;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return f;
  const bool fma = ecx & (1u << 12), osxsave = ecx & (1u << 27), avx = ecx & (1u << 28),
             f16c = ecx & (1u << 29);
  if (!(osxsave && avx)) return f;
  const uint64_t xcr0 = read_xcr0();
  const bool os_ymm = (xcr0 & 0x6) == 0x6, os_zmm = (xcr0 & 0xe6) == 0xe6;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return f;
  const bool avx2 = ebx & (1u << 5), avx512f = ebx & (1u << 16), avx512dq = ebx & (1u << 17),
             avx512bw = ebx & (1u << 30), avx512vl = ebx & (1u << 31);
  f.avx2 = os_ymm && avx2 && fma && f16c;
  f.avx512 = f.avx2 && os_zmm && avx512f && avx512dq && avx512bw && avx512vl;
  const unsigned max_subleaf = eax;
  if (f.avx512 && max_subleaf >= 1 && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx))
    f.avx512_bf16 = eax & (1u << 5);
  return f;
}

// detect_x86() once per process: CPUID traps to the hypervisor in a VM (about 10 us an instruction on the
// development VMs, three of them a detection), and isa_select asks on every call; kernel_check, which selects a
// level before each case, spent 15% of its time there. A process's CPU features do not change.
const X86Features& x86_features() {
  static const X86Features features = detect_x86();
  return features;
}
#endif

bool cpu_has(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return true;
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::kAvx2:
      return x86_features().avx2;
    case Isa::kAvx512:
      return x86_features().avx512;
    case Isa::kAvx512Bf16:
      return x86_features().avx512_bf16;
#endif
#if defined(__aarch64__)
    case Isa::kNeon:
#if defined(__linux__)
      return getauxval(AT_HWCAP) & HWCAP_ASIMD;
#else
      return true;
#endif
#endif
    default:
      return false;
  }
}

#ifdef GROUPNORM_HAVE_AVX512_BF16
// `table` with its null entries taken from `base`.
KernelTable with_base(KernelTable table, const KernelTable& base) {
  if (!table.forward_f32) table.forward_f32 = base.forward_f32;
  if (!table.forward_f64) table.forward_f64 = base.forward_f64;
  if (!table.forward_f16) table.forward_f16 = base.forward_f16;
  if (!table.forward_bf16) table.forward_bf16 = base.forward_bf16;
  if (!table.backward_f32) table.backward_f32 = base.backward_f32;
  if (!table.backward_f64) table.backward_f64 = base.backward_f64;
  if (!table.backward_f16) table.backward_f16 = base.backward_f16;
  if (!table.backward_bf16) table.backward_bf16 = base.backward_bf16;
  return table;
}
#endif

const KernelTable* compiled_table(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return scalar::kernel_table();
#ifdef GROUPNORM_HAVE_AVX2
    case Isa::kAvx2:
      return avx2::kernel_table();
#endif
#ifdef GROUPNORM_HAVE_AVX512
    case Isa::kAvx512:
      return avx512::kernel_table();
#endif
#ifdef GROUPNORM_HAVE_AVX512_BF16
    case Isa::kAvx512Bf16: {
      // Its own bfloat16 kernels, the avx512 level's for the other dtypes; merged here, in baseline code.
      static const KernelTable merged = with_base(*avx512_bf16::kernel_table(), *avx512::kernel_table());
      return &merged;
    }
#endif
#ifdef GROUPNORM_HAVE_NEON
    case Isa::kNeon:
      return neon::kernel_table();
#endif
    default:
      return nullptr;
  }
}

// -1 until the first use picks isa_best(); then the level every call runs.
std::atomic<int> g_isa{-1};
std::atomic<int> g_num_threads{0};

// GNU OpenMP (libgomp) keeps a pool of worker threads between parallel regions and does nothing at fork(): a
// child forked after the parent ran a region inherits the pool's bookkeeping but not its threads, and its first
// region with more than one thread waits for them forever (torch 2.13's CPU kernels hang the same way). LLVM's
// and Intel's runtimes (libomp, libiomp5) rebuild their pool in the child. So a child forked under any other
// runtime than those runs every call on its calling thread, as torch's DataLoader workers are told to.
std::atomic<bool> g_fork_serial{false};

#ifdef GROUPNORM_FORK_GUARD
// Whether the OpenMP runtime this library calls survives fork: the file that defines omp_get_max_threads is
// LLVM's or Intel's. Anything else (libgomp, a runtime linked in statically, a name not recognised) counts as not.
bool openmp_runtime_survives_fork() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&omp_get_max_threads), &info) == 0 || info.dli_fname == nullptr) return false;
  const char* slash = std::strrchr(info.dli_fname, '/');
  const char* file = slash ? slash + 1 : info.dli_fname;
  return std::strncmp(file, "libomp", 6) == 0 || std::strncmp(file, "libiomp", 7) == 0;
}

void on_fork_child() { g_fork_serial.store(true, std::memory_order_relaxed); }

// Registered when the library loads (before any region can run), once per binary that links groupnorm_core.
const bool g_fork_guard = openmp_runtime_survives_fork() || pthread_atfork(nullptr, nullptr, on_fork_child) == 0;
#endif

// The team size a call may use: `requested`, or get_num_threads() where it is <= 0 or fork() left this process
// without OpenMP's threads (get_num_threads() is then 1).
int call_threads(int requested) {
  return requested > 0 && !g_fork_serial.load(std::memory_order_relaxed) ? requested : get_num_threads();
}

Isa current_isa() {
  int isa = g_isa.load(std::memory_order_acquire);
  if (isa < 0) {
    int expected = -1;
    g_isa.compare_exchange_strong(expected, int(isa_best()), std::memory_order_acq_rel);
    isa = g_isa.load(std::memory_order_acquire);
  }
  return Isa(isa);
}

// Largest element count a descriptor may describe: every size the kernels derive from it (at most 24 bytes
// an element, a count of groups or of channels) then fits in int64_t and size_t.
constexpr int64_t kMaxElements = int64_t(1) << 57;

// Extents non-negative, G a positive divisor of C, eps >= 0 (not NaN), enums in range, and N x max(C, G) x HxW
// (a zero extent counted as 1, so an empty tensor's parameters and statistics are bounded too) at most
// kMaxElements, checked without overflow.
bool valid(const Problem& p) {
  if (p.N < 0 || p.C < 0 || p.HxW < 0 || p.G <= 0) return false;
  if (p.C % p.G != 0) return false;
  if (!(p.eps >= 0.0)) return false;
  if (p.layout != Layout::kChannelsFirst && p.layout != Layout::kChannelsLast) return false;
  if (p.activation != Activation::kNone && p.activation != Activation::kSilu) return false;
  int64_t elements = 1;
  for (const int64_t extent : {p.N, p.C > p.G ? p.C : p.G, p.HxW})
    if (extent > 0 && (__builtin_mul_overflow(elements, extent, &elements) || elements > kMaxElements))
      return false;
  return true;
}

}  // namespace

// Size of the last-level cache that CPU 0 sees (kernel_table.h), read once from sysfs (sysconf can report a whole
// package's L3 inside a VM, ten times what one core reaches); 32 MiB where the system does not say.
int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    int64_t size = 0;
    for (int index = 3; index >= 2 && size <= 0; --index) {
      char path[64];
      std::snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu0/cache/index%d/size", index);
      if (std::FILE* f = std::fopen(path, "r")) {
        long value = 0;
        char unit = 0;
        if (std::fscanf(f, "%ld%c", &value, &unit) >= 1)
          size = int64_t(value) * (unit == 'K' ? 1024 : unit == 'M' ? 1024 * 1024 : 1);
        std::fclose(f);
      }
    }
    return size > 0 ? size : int64_t(32) << 20;
  }();
  return bytes;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return "scalar";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kNeon:
      return "neon";
    case Isa::kAvx512Bf16:
      return "avx512_bf16";
  }
  return "unknown";
}

bool isa_compiled(Isa isa) { return compiled_table(isa) != nullptr; }
bool isa_supported(Isa isa) { return cpu_has(isa); }

Isa isa_best() {
  const Isa preferred[] = {Isa::kAvx512Bf16, Isa::kAvx512, Isa::kAvx2, Isa::kNeon};
  for (Isa isa : preferred)
    if (isa_compiled(isa) && isa_supported(isa)) return isa;
  return Isa::kScalar;
}

Isa isa_current() { return current_isa(); }

Status isa_select(Isa isa) {
  if (!isa_compiled(isa) || !isa_supported(isa)) return kUnsupported;
  g_isa.store(int(isa), std::memory_order_release);
  return kOk;
}

bool openmp_enabled() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

int get_num_threads() {
  if (g_fork_serial.load(std::memory_order_relaxed)) return 1;
  const int n = g_num_threads.load(std::memory_order_relaxed);
  if (n > 0) return n;
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void set_num_threads(int n) { g_num_threads.store(n > 0 ? n : 0, std::memory_order_relaxed); }

bool fork_serial() { return g_fork_serial.load(std::memory_order_relaxed); }

Status group_norm_forward(const Problem& problem, DType dtype, const void* x, const void* weight,
                          const void* bias, void* y, void* mean_out, void* rstd_out) {
  if (!valid(problem)) return kInvalidArgument;
  const bool empty = problem.N == 0 || problem.C == 0 || problem.HxW == 0;
  if (!empty && (x == nullptr || y == nullptr)) return kInvalidArgument;
  Problem p = problem;
  p.num_threads = call_threads(p.num_threads);
  if (p.stream_threshold_bytes == 0) p.stream_threshold_bytes = last_level_cache_bytes();
  const KernelTable* table = compiled_table(current_isa());
  switch (dtype) {
    case DType::kFloat32:
      return table->forward_f32(p, static_cast<const float*>(x), static_cast<const float*>(weight),
                                static_cast<const float*>(bias), static_cast<float*>(y),
                                static_cast<float*>(mean_out), static_cast<float*>(rstd_out));
    case DType::kFloat64:
      return table->forward_f64(p, static_cast<const double*>(x), static_cast<const double*>(weight),
                                static_cast<const double*>(bias), static_cast<double*>(y),
                                static_cast<double*>(mean_out), static_cast<double*>(rstd_out));
    case DType::kFloat16:
      return table->forward_f16(p, static_cast<const Half*>(x), static_cast<const float*>(weight),
                                static_cast<const float*>(bias), static_cast<Half*>(y),
                                static_cast<float*>(mean_out), static_cast<float*>(rstd_out));
    case DType::kBFloat16:
      return table->forward_bf16(p, static_cast<const BFloat16*>(x), static_cast<const float*>(weight),
                                 static_cast<const float*>(bias), static_cast<BFloat16*>(y),
                                 static_cast<float*>(mean_out), static_cast<float*>(rstd_out));
  }
  return kInvalidArgument;
}

Status group_norm_backward(const Problem& problem, DType dtype, const void* dy, const void* x, const void* mean,
                           const void* rstd, const void* weight, const void* bias, void* dx, void* dweight,
                           void* dbias) {
  if (!valid(problem)) return kInvalidArgument;
  const bool empty = problem.N == 0 || problem.C == 0 || problem.HxW == 0;
  if (!empty && (dy == nullptr || x == nullptr || mean == nullptr || rstd == nullptr || dx == nullptr))
    return kInvalidArgument;
  // The activation's pass writes dx before the normalisation's reads x.
  if (!empty && problem.activation != Activation::kNone && dx == x) return kInvalidArgument;
  Problem p = problem;
  p.num_threads = call_threads(p.num_threads);
  const KernelTable* table = compiled_table(current_isa());
  switch (dtype) {
    case DType::kFloat32:
      return table->backward_f32(p, static_cast<const float*>(dy), static_cast<const float*>(x),
                                 static_cast<const float*>(mean), static_cast<const float*>(rstd),
                                 static_cast<const float*>(weight), static_cast<const float*>(bias),
                                 static_cast<float*>(dx), static_cast<float*>(dweight), static_cast<float*>(dbias));
    case DType::kFloat64:
      return table->backward_f64(p, static_cast<const double*>(dy), static_cast<const double*>(x),
                                 static_cast<const double*>(mean), static_cast<const double*>(rstd),
                                 static_cast<const double*>(weight), static_cast<const double*>(bias),
                                 static_cast<double*>(dx), static_cast<double*>(dweight),
                                 static_cast<double*>(dbias));
    case DType::kFloat16:
      return table->backward_f16(p, static_cast<const Half*>(dy), static_cast<const Half*>(x),
                                 static_cast<const float*>(mean), static_cast<const float*>(rstd),
                                 static_cast<const float*>(weight), static_cast<const float*>(bias),
                                 static_cast<Half*>(dx), static_cast<float*>(dweight), static_cast<float*>(dbias));
    case DType::kBFloat16:
      return table->backward_bf16(p, static_cast<const BFloat16*>(dy), static_cast<const BFloat16*>(x),
                                  static_cast<const float*>(mean), static_cast<const float*>(rstd),
                                  static_cast<const float*>(weight), static_cast<const float*>(bias),
                                  static_cast<BFloat16*>(dx), static_cast<float*>(dweight),
                                  static_cast<float*>(dbias));
  }
  return kInvalidArgument;
}

}  // namespace groupnorm
