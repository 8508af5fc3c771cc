// groupnorm_cuda.h: the C interface of groupnorm's CUDA kernels (cpp/cuda), for the Python extension
// groupnorm._cuda and for tests. Every pointer is a device pointer (or, in tests/cuda_emu's emulation, a host
// pointer); every call is asynchronous on `stream` and allocates nothing: the caller passes a workspace of at least
// the size the matching *_workspace function returns, from its own framework's allocator.
//
// Tensors are dense in one of two layouts, with S the product of the spatial sizes (1 for a 2-D input):
//   channels first (NCHW):  element (n, c, s) at (n*C + c)*S + s
//   channels last  (NHWC):  element (n, s, c) at (n*S + s)*C + c
// mean and rstd are [N, G], in float64 for float64 data and float32 otherwise; weight and bias are [C], of the
// data's dtype or float32; grad_weight and grad_bias are [C] in the statistics' dtype.
#ifndef GROUPNORM_CUDA_H_
#define GROUPNORM_CUDA_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum gn_cuda_dtype { GN_CUDA_FLOAT32 = 0, GN_CUDA_FLOAT64 = 1, GN_CUDA_FLOAT16 = 2, GN_CUDA_BFLOAT16 = 3 };

typedef struct gn_cuda_problem {
  int64_t n, c, s, groups;  // all >= 1, c % groups == 0, n*c < 2^31 (a grid dimension), n*c*s < 2^62
  int channels_last;        // 0: channels first, 1: channels last
  int dtype;                // gn_cuda_dtype of input, output, grad_output, grad_input
  int param_dtype;          // gn_cuda_dtype of weight and bias: dtype, or GN_CUDA_FLOAT32 with 16-bit data
  int silu;                 // 1: the output is y * sigmoid(y) of the normalised y (the backward differentiates it)
  double eps;               // >= 0 (finite)
} gn_cuda_problem;

// 0 on success; otherwise a CUDA error code (cudaError_t), or GN_CUDA_BAD_PROBLEM for a problem outside the
// rules above (nothing is launched then).
enum { GN_CUDA_BAD_PROBLEM = 100000 };

// Bytes of workspace each call needs (0 for a bad problem). The workspace must be 16-byte aligned.
size_t gn_cuda_forward_workspace(const gn_cuda_problem* p);
size_t gn_cuda_backward_workspace(const gn_cuda_problem* p);

// y = group_norm(x) * weight + bias (then SiLU when p->silu); weight, bias, mean and rstd may be NULL (no
// weight: ones; no bias: zeros; mean/rstd not wanted). y may be x (in place). stream: a cudaStream_t.
int gn_cuda_forward(const gn_cuda_problem* p, const void* x, const void* weight, const void* bias, void* y,
                    void* mean, void* rstd, void* workspace, void* stream);

// The gradients of the forward above from grad_output dy, its input x and the forward's mean and rstd. bias is
// read only when p->silu (the SiLU's input is recomputed from it). weight, bias, grad_weight and grad_bias may be
// NULL; dx may be dy.
int gn_cuda_backward(const gn_cuda_problem* p, const void* dy, const void* x, const void* mean, const void* rstd,
                     const void* weight, const void* bias, void* dx, void* grad_weight, void* grad_bias,
                     void* workspace, void* stream);

// Whether the problem is one the kernels take (1) or not (0).
int gn_cuda_problem_valid(const gn_cuda_problem* p);

// The CUDA runtime, for the extension (groupnorm_cuda.cu only; the emulation has none of these).
// The number of devices into *count; returns the runtime's error (0: none), e.g. when no driver is installed.
int gn_cuda_device_count(int* count);
// The device current for this thread into *device, and making `device` current (the caller's framework may use
// another runtime; the extension puts the caller's device back after each call).
int gn_cuda_get_device(int* device);
int gn_cuda_set_device(int device);
// The runtime's name and description of an error code, and the runtime and driver versions (1000*major + 10*minor;
// the driver's is 0 when there is none).
const char* gn_cuda_error_name(int error);
const char* gn_cuda_error_string(int error);
int gn_cuda_runtime_version(void);
int gn_cuda_driver_version(void);

#ifdef __cplusplus
}
#endif

#endif  // GROUPNORM_CUDA_H_
