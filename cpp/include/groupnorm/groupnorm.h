// groupnorm.h — the plain C++ API: status codes, the problem descriptor, entry points and ISA control.
// Only pointers (aligned to their element type), sizes and plain enums cross it; no vector type nor exception does.
// Semantics are torch.nn.functional.group_norm's, with the biased variance.
#pragma once

#include <cstdint>

namespace groupnorm {

enum Status : int {
  kOk = 0,
  kInvalidArgument = 1,  // a descriptor the caller should have rejected (the Python layer does)
  kUnsupported = 2,      // an ISA level the build or the CPU lacks
  kOutOfMemory = 3,      // scratch could not be allocated
};

// Memory layout of an (N, C, HxW) tensor: kChannelsFirst is NC(HW) contiguous, kChannelsLast is N(HW)C.
enum class Layout : int { kChannelsFirst = 0, kChannelsLast = 1 };
enum class Activation : int { kNone = 0, kSilu = 1 };
// kFloat16 (IEEE binary16) and kBFloat16 are storage types: they compute in float, and their weight, bias,
// mean, rstd and parameter gradients are float arrays.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };
// kAvx512Bf16: the AVX-512 kernels with AVX512_BF16's float -> bfloat16 conversion (Cooper Lake, Sapphire Rapids,
// Zen 4 and later); it differs from kAvx512 only in how bfloat16 results are rounded to storage, not in them.
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kNeon = 3, kAvx512Bf16 = 4 };
constexpr int kIsaCount = 5;

// One group-norm problem. Shape names follow the paper: C channels in G groups of D = C/G, HxW positions.
// Entry points return kInvalidArgument for a descriptor with a negative extent, G not a positive divisor of
// C, eps negative or NaN, an enum out of range, or more than 2^57 elements (N x max(C, G) x HxW).
struct Problem {
  int64_t N = 0;
  int64_t C = 0;
  int64_t G = 1;
  int64_t HxW = 1;
  Layout layout = Layout::kChannelsFirst;
  Activation activation = Activation::kNone;
  double eps = 1e-5;
  int num_threads = 0;  // <= 0: groupnorm::get_num_threads()
  // Outputs whose input + output bytes exceed this go out with non-temporal stores; 0: the last-level
  // cache size (the default), < 0: never.
  int64_t stream_threshold_bytes = 0;
};

// y = act((x - mean) * rstd * weight + bias) per (n, group); weight, bias, mean_out, rstd_out may be null.
// x and y hold the same layout and may be the same pointer (in place); they must not otherwise overlap.
// weight / bias hold C values and mean_out / rstd_out receive N*G values of the compute type: double for
// float64 data, float for float32, float16 and bfloat16 data.
Status group_norm_forward(const Problem& problem, DType dtype, const void* x, const void* weight,
                          const void* bias, void* y, void* mean_out, void* rstd_out);

// Gradients of group_norm_forward given dy = dL/dy (of the activation's output when problem.activation is set)
// and the forward's x, mean and rstd (N*G values each, of the compute type; the low part of a rounded mean is
// recovered from x). dy, x and dx hold the same layout; dx may be dy, or x itself without an activation, and must
// not otherwise overlap them. weight may be null (all ones); bias (null: zeros) is read only with an activation,
// whose input the backward recomputes. dweight / dbias (C values each, of the compute type: sums over N and HxW of
// g*x_hat and g, g the gradient of the normalised output) may be null if unwanted.
Status group_norm_backward(const Problem& problem, DType dtype, const void* dy, const void* x, const void* mean,
                           const void* rstd, const void* weight, const void* bias, void* dx, void* dweight,
                           void* dbias);

// The two entry points' pointer types. groupnorm._core hands their addresses to the libraries built beside it
// (groupnorm.jax's custom calls, groupnorm.torch's C++ autograd node), so that one core, with one ISA level and
// thread count, serves every caller.
using ForwardEntry = decltype(&group_norm_forward);
using BackwardEntry = decltype(&group_norm_backward);

// Thread count used when Problem::num_threads <= 0: the value given to set_num_threads, else OpenMP's
// omp_get_max_threads() in the calling thread (OMP_NUM_THREADS, threadpoolctl). n <= 0 resets.
// In a process forked from one that linked GNU OpenMP (whose worker threads fork() does not copy), every call
// runs on one thread whatever the count asked for (fork_serial() is then true), where a team would hang.
int get_num_threads();
void set_num_threads(int n);
bool fork_serial();
bool openmp_enabled();

const char* isa_name(Isa isa);
bool isa_compiled(Isa isa);   // a kernel table for this level is in the binary
bool isa_supported(Isa isa);  // the CPU and the OS (XGETBV) can run it
Isa isa_best();               // the best level that is both compiled and supported
Isa isa_current();
Status isa_select(Isa isa);   // kUnsupported unless compiled and supported

}  // namespace groupnorm
