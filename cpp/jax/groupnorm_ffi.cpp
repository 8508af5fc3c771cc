// groupnorm_ffi.cpp: XLA FFI handlers through which JAX calls groupnorm's kernels as custom calls (groupnorm.jax),
// so that they run inside jax.jit and on JAX's own buffers and streams: XLA allocates the results and, on a GPU,
// lends its stream and the kernels' workspace.
//
// Built into the shared library groupnorm/_jax_ffi.so when CMake finds jaxlib's FFI headers (GROUPNORM_JAX), and
// loaded by groupnorm.jax with ctypes. The CPU handlers call the C++ core that groupnorm._core holds, through the
// entry points gn_jax_bind_core receives from it, so that the ISA level and the thread count set through
// groupnorm apply here too; the CUDA handlers (GROUPNORM_JAX_CUDA) call the kernels of cpp/cuda.
//
// Every handler takes the data with channels on axis 1 or last (the attribute channels_last); weight and bias
// are always passed, as empty arrays when has_weight / has_bias is false. Shapes and dtypes are checked by
// groupnorm.jax before the call is traced; the handlers check them again and return an error, never crash.
// With the attribute silu the backward takes the gradient of the SiLU's output and the forward's bias: the kernels
// fuse the SiLU's gradient into their passes (the forward's u = (x - mean) * rstd * w + b recomputed per element).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>

#include "groupnorm/groupnorm.h"
#include "xla/ffi/api/ffi.h"

#ifdef GROUPNORM_JAX_CUDA
#include <cuda_runtime_api.h>

#include "groupnorm_cuda.h"
#endif

namespace ffi = xla::ffi;

namespace {

groupnorm::ForwardEntry core_forward = nullptr;
groupnorm::BackwardEntry core_backward = nullptr;

// The problem's extents: n samples, c channels on axis 1 or last, s positions (the other axes).
struct Extents {
  int64_t n = 0, c = 0, s = 1;
};

ffi::Error extents_of(const ffi::AnyBuffer& x, bool channels_last, int64_t groups, Extents* e) {
  const auto dims = x.dimensions();
  const size_t rank = dims.size();
  if (rank < 2) return ffi::Error::InvalidArgument("groupnorm: the input needs at least 2 dimensions (N, C, *)");
  const size_t channel_axis = channels_last ? rank - 1 : 1;
  e->n = dims[0];
  e->c = dims[channel_axis];
  e->s = 1;
  for (size_t i = 1; i < rank; ++i) {
    if (i != channel_axis) e->s *= dims[i];
  }
  if (groups <= 0 || e->c % groups != 0) {
    return ffi::Error::InvalidArgument("groupnorm: num_groups=" + std::to_string(groups) +
                                       " must be a positive divisor of the channels (" + std::to_string(e->c) + ")");
  }
  return ffi::Error::Success();
}

// The kernels' dtype of x, and whether `param` (weight, bias, statistics) has the compute dtype it needs: float64
// for float64 data, float32 otherwise.
bool data_dtype(ffi::DataType t, groupnorm::DType* out) {
  switch (t) {
    case ffi::DataType::F32: *out = groupnorm::DType::kFloat32; return true;
    case ffi::DataType::F64: *out = groupnorm::DType::kFloat64; return true;
    case ffi::DataType::F16: *out = groupnorm::DType::kFloat16; return true;
    case ffi::DataType::BF16: *out = groupnorm::DType::kBFloat16; return true;
    default: return false;
  }
}

ffi::DataType compute_dtype(groupnorm::DType d) {
  return d == groupnorm::DType::kFloat64 ? ffi::DataType::F64 : ffi::DataType::F32;
}

ffi::Error check_param(const ffi::AnyBuffer& p, bool present, int64_t count, ffi::DataType want, const char* name) {
  if (!present) return ffi::Error::Success();
  if (p.element_type() != want || static_cast<int64_t>(p.element_count()) != count) {
    return ffi::Error::InvalidArgument(std::string("groupnorm: ") + name + " must hold C values of the compute type");
  }
  return ffi::Error::Success();
}

const void* data_or_null(const ffi::AnyBuffer& p, bool present) { return present ? p.untyped_data() : nullptr; }

// A handler's checked call: the extents and the data's dtype, or the error to return (check_forward,
// check_backward).
struct Checked {
  ffi::Error error;
  Extents e;
  groupnorm::DType dtype = groupnorm::DType::kFloat32;
};

ffi::Error check_stats(const ffi::AnyBuffer& mean, const ffi::AnyBuffer& rstd, int64_t count, ffi::DataType ct) {
  if (mean.element_type() != ct || rstd.element_type() != ct || static_cast<int64_t>(mean.element_count()) != count ||
      static_cast<int64_t>(rstd.element_count()) != count) {
    return ffi::Error::InvalidArgument("groupnorm: mean and rstd must hold N*num_groups values of the compute type");
  }
  return ffi::Error::Success();
}

// Checks common to every forward handler: extents, dtypes and sizes.
Checked check_forward(const ffi::AnyBuffer& x, const ffi::AnyBuffer& weight, const ffi::AnyBuffer& bias,
                      const ffi::AnyBuffer& y, const ffi::AnyBuffer& mean, const ffi::AnyBuffer& rstd, int64_t groups,
                      bool channels_last, bool has_weight, bool has_bias) {
  Checked c;
  if (c.error = extents_of(x, channels_last, groups, &c.e); c.error.failure()) return c;
  if (!data_dtype(x.element_type(), &c.dtype) || y.element_type() != x.element_type() ||
      y.element_count() != x.element_count()) {
    c.error = ffi::Error::InvalidArgument("groupnorm: the input must be float16, bfloat16, float32 or float64, and "
                                          "the output of its dtype and size");
    return c;
  }
  const ffi::DataType ct = compute_dtype(c.dtype);
  if (c.error = check_param(weight, has_weight, c.e.c, ct, "weight"); c.error.failure()) return c;
  if (c.error = check_param(bias, has_bias, c.e.c, ct, "bias"); c.error.failure()) return c;
  c.error = check_stats(mean, rstd, c.e.n * groups, ct);
  return c;
}

Checked check_backward(const ffi::AnyBuffer& dy, const ffi::AnyBuffer& x, const ffi::AnyBuffer& mean,
                       const ffi::AnyBuffer& rstd, const ffi::AnyBuffer& weight, const ffi::AnyBuffer& bias,
                       const ffi::AnyBuffer& dx, const ffi::AnyBuffer& dweight, const ffi::AnyBuffer& dbias,
                       int64_t groups, bool channels_last, bool has_weight, bool has_bias) {
  Checked c;
  if (c.error = extents_of(x, channels_last, groups, &c.e); c.error.failure()) return c;
  if (!data_dtype(x.element_type(), &c.dtype) || dy.element_type() != x.element_type() ||
      dx.element_type() != x.element_type() || dy.element_count() != x.element_count() ||
      dx.element_count() != x.element_count()) {
    c.error = ffi::Error::InvalidArgument("groupnorm: grad_output, input and grad_input must share a dtype (float16, "
                                          "bfloat16, float32 or float64) and a size");
    return c;
  }
  const ffi::DataType ct = compute_dtype(c.dtype);
  if (c.error = check_stats(mean, rstd, c.e.n * groups, ct); c.error.failure()) return c;
  if (c.error = check_param(weight, has_weight, c.e.c, ct, "weight"); c.error.failure()) return c;
  if (c.error = check_param(bias, has_bias, c.e.c, ct, "bias"); c.error.failure()) return c;
  if (dweight.element_type() != ct || dbias.element_type() != ct ||
      static_cast<int64_t>(dweight.element_count()) != c.e.c ||
      static_cast<int64_t>(dbias.element_count()) != c.e.c) {
    c.error = ffi::Error::InvalidArgument("groupnorm: grad_weight and grad_bias must hold C values of the compute "
                                          "type");
  }
  return c;
}

ffi::Error status_error(groupnorm::Status status) {
  switch (status) {
    case groupnorm::kOk: return ffi::Error::Success();
    case groupnorm::kInvalidArgument: return ffi::Error::InvalidArgument("groupnorm: the kernels refused the problem");
    case groupnorm::kOutOfMemory: return ffi::Error::Internal("groupnorm: out of memory for the kernels' scratch");
    default: return ffi::Error::Internal("groupnorm: the kernels failed (status " + std::to_string(status) + ")");
  }
}

// The core's problem of a checked call (no activation, eps 0: the forward sets those).
groupnorm::Problem core_problem(const Extents& e, int64_t groups, bool channels_last) {
  groupnorm::Problem p;
  p.N = e.n;
  p.C = e.c;
  p.G = groups;
  p.HxW = e.s;
  p.layout = channels_last ? groupnorm::Layout::kChannelsLast : groupnorm::Layout::kChannelsFirst;
  return p;
}

template <class T> void fill_nan(void* p, int64_t count) {
  T* t = static_cast<T*>(p);
  for (int64_t i = 0; i < count; ++i) t[i] = std::numeric_limits<T>::quiet_NaN();
}

// ------------------------------------------------------------------------------------------------------ CPU

ffi::Error forward_cpu(ffi::AnyBuffer x, ffi::AnyBuffer weight, ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y,
                       ffi::Result<ffi::AnyBuffer> mean, ffi::Result<ffi::AnyBuffer> rstd, int64_t groups,
                       double eps, bool channels_last, bool has_weight, bool has_bias, bool silu) {
  if (core_forward == nullptr) return ffi::Error::Internal("groupnorm: the core is not bound (import groupnorm.jax)");
  const Checked c = check_forward(x, weight, bias, *y, *mean, *rstd, groups, channels_last, has_weight, has_bias);
  if (c.error.failure()) return c.error;
  const Extents& e = c.e;
  const groupnorm::DType dtype = c.dtype;
  if (x.element_count() == 0) {  // a group of no element has no mean
    if (dtype == groupnorm::DType::kFloat64) {
      fill_nan<double>(mean->untyped_data(), e.n * groups);
      fill_nan<double>(rstd->untyped_data(), e.n * groups);
    } else {
      fill_nan<float>(mean->untyped_data(), e.n * groups);
      fill_nan<float>(rstd->untyped_data(), e.n * groups);
    }
    return ffi::Error::Success();
  }
  groupnorm::Problem p = core_problem(e, groups, channels_last);
  p.activation = silu ? groupnorm::Activation::kSilu : groupnorm::Activation::kNone;
  p.eps = eps;
  return status_error(core_forward(p, dtype, x.untyped_data(), data_or_null(weight, has_weight),
                                   data_or_null(bias, has_bias), y->untyped_data(), mean->untyped_data(),
                                   rstd->untyped_data()));
}

ffi::Error backward_cpu(ffi::AnyBuffer dy, ffi::AnyBuffer x, ffi::AnyBuffer mean, ffi::AnyBuffer rstd,
                        ffi::AnyBuffer weight, ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> dx,
                        ffi::Result<ffi::AnyBuffer> dweight, ffi::Result<ffi::AnyBuffer> dbias, int64_t groups,
                        bool channels_last, bool has_weight, bool has_bias, bool silu) {
  if (core_backward == nullptr) return ffi::Error::Internal("groupnorm: the core is not bound (import groupnorm.jax)");
  const Checked c = check_backward(dy, x, mean, rstd, weight, bias, *dx, *dweight, *dbias, groups, channels_last,
                                   has_weight, has_bias);
  if (c.error.failure()) return c.error;
  groupnorm::Problem p = core_problem(c.e, groups, channels_last);
  p.activation = silu ? groupnorm::Activation::kSilu : groupnorm::Activation::kNone;
  if (x.element_count() == 0) {  // sums over no element
    const size_t bytes = dweight->size_bytes();
    std::fill_n(static_cast<unsigned char*>(dweight->untyped_data()), bytes, 0);
    std::fill_n(static_cast<unsigned char*>(dbias->untyped_data()), bytes, 0);
    return ffi::Error::Success();
  }
  return status_error(core_backward(p, c.dtype, dy.untyped_data(), x.untyped_data(), mean.untyped_data(),
                                    rstd.untyped_data(), data_or_null(weight, has_weight),
                                    data_or_null(bias, has_bias), dx->untyped_data(), dweight->untyped_data(),
                                    dbias->untyped_data()));
}

#ifdef GROUPNORM_JAX_CUDA
// ------------------------------------------------------------------------------------------------------ CUDA

int cuda_dtype(groupnorm::DType d) {
  switch (d) {
    case groupnorm::DType::kFloat64: return GN_CUDA_FLOAT64;
    case groupnorm::DType::kFloat16: return GN_CUDA_FLOAT16;
    case groupnorm::DType::kBFloat16: return GN_CUDA_BFLOAT16;
    default: return GN_CUDA_FLOAT32;
  }
}

gn_cuda_problem cuda_problem(const Extents& e, int64_t groups, bool channels_last, groupnorm::DType dtype,
                             bool silu, double eps) {
  gn_cuda_problem p;
  p.n = e.n;
  p.c = e.c;
  p.s = e.s;
  p.groups = groups;
  p.channels_last = channels_last ? 1 : 0;
  p.dtype = cuda_dtype(dtype);
  // Parameters are of the compute type: float32 for 16-bit data, as the kernels' mixed rule allows.
  p.param_dtype = dtype == groupnorm::DType::kFloat64 ? GN_CUDA_FLOAT64 : GN_CUDA_FLOAT32;
  p.silu = silu ? 1 : 0;
  p.eps = eps;
  return p;
}

ffi::Error cuda_error(int code) {
  if (code == 0) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("groupnorm's CUDA kernels failed: ") + gn_cuda_error_name(code) + ": " +
                              gn_cuda_error_string(code));
}

void* workspace_of(ffi::ScratchAllocator& scratch, size_t bytes) {
  const auto memory = scratch.Allocate(bytes, 16);
  return memory.has_value() ? *memory : nullptr;
}

ffi::Error forward_cuda(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer x, ffi::AnyBuffer weight,
                        ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> mean,
                        ffi::Result<ffi::AnyBuffer> rstd, int64_t groups, double eps, bool channels_last,
                        bool has_weight, bool has_bias, bool silu) {
  const Checked c = check_forward(x, weight, bias, *y, *mean, *rstd, groups, channels_last, has_weight, has_bias);
  if (c.error.failure()) return c.error;
  const Extents& e = c.e;
  const groupnorm::DType dtype = c.dtype;
  if (x.element_count() == 0) {  // all-ones bytes are a NaN in float32 and float64
    if (int code = cudaMemsetAsync(mean->untyped_data(), 0xFF, mean->size_bytes(), stream)) return cuda_error(code);
    return cuda_error(cudaMemsetAsync(rstd->untyped_data(), 0xFF, rstd->size_bytes(), stream));
  }
  const gn_cuda_problem p = cuda_problem(e, groups, channels_last, dtype, silu, eps);
  void* workspace = workspace_of(scratch, gn_cuda_forward_workspace(&p));
  if (workspace == nullptr) return ffi::Error::Internal("groupnorm: XLA lent no scratch memory for the workspace");
  return cuda_error(gn_cuda_forward(&p, x.untyped_data(), data_or_null(weight, has_weight),
                                    data_or_null(bias, has_bias), y->untyped_data(), mean->untyped_data(),
                                    rstd->untyped_data(), workspace, stream));
}

ffi::Error backward_cuda(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer dy, ffi::AnyBuffer x,
                         ffi::AnyBuffer mean, ffi::AnyBuffer rstd, ffi::AnyBuffer weight, ffi::AnyBuffer bias,
                         ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dweight,
                         ffi::Result<ffi::AnyBuffer> dbias, int64_t groups, bool channels_last, bool has_weight,
                         bool has_bias, bool silu) {
  const Checked c = check_backward(dy, x, mean, rstd, weight, bias, *dx, *dweight, *dbias, groups, channels_last,
                                   has_weight, has_bias);
  if (c.error.failure()) return c.error;
  const Extents& e = c.e;
  const groupnorm::DType dtype = c.dtype;
  if (x.element_count() == 0) {
    if (int code = cudaMemsetAsync(dweight->untyped_data(), 0, dweight->size_bytes(), stream)) return cuda_error(code);
    return cuda_error(cudaMemsetAsync(dbias->untyped_data(), 0, dbias->size_bytes(), stream));
  }
  const gn_cuda_problem p = cuda_problem(e, groups, channels_last, dtype, silu, 0.0);
  void* workspace = workspace_of(scratch, gn_cuda_backward_workspace(&p));
  if (workspace == nullptr) return ffi::Error::Internal("groupnorm: XLA lent no scratch memory for the workspace");
  return cuda_error(gn_cuda_backward(&p, dy.untyped_data(), x.untyped_data(), mean.untyped_data(),
                                     rstd.untyped_data(), data_or_null(weight, has_weight),
                                     data_or_null(bias, has_bias),
                                     dx->untyped_data(), dweight->untyped_data(), dbias->untyped_data(), workspace,
                                     stream));
}
#endif  // GROUPNORM_JAX_CUDA

}  // namespace

// The core's entry points, from groupnorm._core (the addresses of groupnorm::group_norm_forward / _backward).
extern "C" void gn_jax_bind_core(void* forward, void* backward) {
  core_forward = reinterpret_cast<groupnorm::ForwardEntry>(forward);
  core_backward = reinterpret_cast<groupnorm::BackwardEntry>(backward);
}

// 1 when this library has the CUDA handlers.
extern "C" int gn_jax_has_cuda(void) {
#ifdef GROUPNORM_JAX_CUDA
  return 1;
#else
  return 0;
#endif
}

#define GN_FORWARD_BINDING(...)                                                                               \
  ffi::Ffi::Bind() __VA_ARGS__.Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()              \
      .Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>().Attr<int64_t>("groups")               \
      .Attr<double>("eps").Attr<bool>("channels_last").Attr<bool>("has_weight").Attr<bool>("has_bias")        \
      .Attr<bool>("silu")
#define GN_BACKWARD_BINDING(...)                                                                              \
  ffi::Ffi::Bind() __VA_ARGS__.Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()              \
      .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()                 \
      .Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>().Attr<int64_t>("groups").Attr<bool>("channels_last")          \
      .Attr<bool>("has_weight").Attr<bool>("has_bias").Attr<bool>("silu")

XLA_FFI_DEFINE_HANDLER_SYMBOL(GnForwardCpu, forward_cpu, GN_FORWARD_BINDING());
XLA_FFI_DEFINE_HANDLER_SYMBOL(GnBackwardCpu, backward_cpu, GN_BACKWARD_BINDING());
#ifdef GROUPNORM_JAX_CUDA
XLA_FFI_DEFINE_HANDLER_SYMBOL(GnForwardCuda, forward_cuda,
                              GN_FORWARD_BINDING(.Ctx<ffi::PlatformStream<cudaStream_t>>()
                                                 .Ctx<ffi::ScratchAllocator>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GnBackwardCuda, backward_cuda,
                              GN_BACKWARD_BINDING(.Ctx<ffi::PlatformStream<cudaStream_t>>()
                                                  .Ctx<ffi::ScratchAllocator>()));
#endif
