# cython: language_level=3
"""groupnorm._cuda: the CUDA kernels of cpp/cuda, called with raw device pointers.

Built only where a CUDA compiler was found (CMake's GROUPNORM_CUDA). groupnorm._gpu imports it when a GPU array
arrives, and groupnorm.config() when asked; the arrays' checks, memory and streams are _gpu's. A problem is the
tuple ``(n, c, s, groups, channels_last, dtype, param_dtype, silu, eps)`` of cpp/cuda/groupnorm_cuda.h, with
dtype names for the dtypes, which `problem` checks once into a Problem that `forward` and `backward` take; pointers
and streams are integers (0 for none).
"""
from libc.stdint cimport int64_t, uintptr_t


cdef extern from "groupnorm_cuda.h" nogil:
    ctypedef struct gn_cuda_problem:
        int64_t n
        int64_t c
        int64_t s
        int64_t groups
        int channels_last
        int dtype
        int param_dtype
        int silu
        double eps
    enum:
        GN_CUDA_FLOAT32
        GN_CUDA_FLOAT64
        GN_CUDA_FLOAT16
        GN_CUDA_BFLOAT16
        GN_CUDA_BAD_PROBLEM
    size_t gn_cuda_forward_workspace(const gn_cuda_problem* p)
    size_t gn_cuda_backward_workspace(const gn_cuda_problem* p)
    int gn_cuda_forward(const gn_cuda_problem* p, const void* x, const void* weight, const void* bias, void* y,
                        void* mean, void* rstd, void* workspace, void* stream)
    int gn_cuda_backward(const gn_cuda_problem* p, const void* dy, const void* x, const void* mean,
                         const void* rstd, const void* weight, const void* bias, void* dx, void* grad_weight,
                         void* grad_bias, void* workspace, void* stream)
    int gn_cuda_problem_valid(const gn_cuda_problem* p)
    int gn_cuda_device_count(int* count)
    int gn_cuda_get_device(int* device)
    int gn_cuda_set_device(int device)
    const char* gn_cuda_error_name(int error)
    const char* gn_cuda_error_string(int error)
    int gn_cuda_runtime_version()
    int gn_cuda_driver_version()


cdef dict _DTYPES = {"float32": GN_CUDA_FLOAT32, "float64": GN_CUDA_FLOAT64, "float16": GN_CUDA_FLOAT16,
                     "bfloat16": GN_CUDA_BFLOAT16}


cdef class Problem:
    """One problem of groupnorm_cuda.h, checked once, with its workspace sizes: `problem(spec)` makes it, and
    groupnorm._gpu keeps it in its plan for every later call of the same shape."""
    cdef gn_cuda_problem p
    cdef readonly tuple spec
    cdef readonly size_t forward_workspace
    cdef readonly size_t backward_workspace

    def __repr__(self):
        return f"groupnorm._cuda.problem({self.spec!r})"


def problem(tuple spec):
    """The Problem of `spec`, ``(n, c, s, groups, channels_last, dtype, param_dtype, silu, eps)``; a ValueError when
    the kernels do not take it."""
    cdef Problem result = Problem.__new__(Problem)
    n, c, s, groups, channels_last, dtype, param_dtype, silu, eps = spec
    result.p.n = n
    result.p.c = c
    result.p.s = s
    result.p.groups = groups
    result.p.channels_last = 1 if channels_last else 0
    result.p.dtype = _DTYPES[dtype]
    result.p.param_dtype = _DTYPES[param_dtype]
    result.p.silu = 1 if silu else 0
    result.p.eps = eps
    if not gn_cuda_problem_valid(&result.p):
        raise ValueError(f"the CUDA kernels do not take the problem {spec} (cpp/cuda/groupnorm_cuda.h)")
    result.spec = spec
    result.forward_workspace = gn_cuda_forward_workspace(&result.p)
    result.backward_workspace = gn_cuda_backward_workspace(&result.p)
    return result


cdef str _error(int code):
    return f"{gn_cuda_error_name(code).decode()} ({code}): {gn_cuda_error_string(code).decode()}"


cdef int _on_device(int device, int* previous) noexcept nogil:
    """Makes `device` current, its caller's in *previous; the runtime's error code."""
    cdef int code = gn_cuda_get_device(previous)
    if code == 0 and previous[0] != device:
        code = gn_cuda_set_device(device)
    return code


cdef int _check(int code, str what) except -1:
    if code != 0:
        raise RuntimeError(f"groupnorm's CUDA {what} failed: {_error(code)}")
    return 0


def device_count():
    """``(count, None)``, or ``(0, reason)`` when the runtime cannot count devices (no driver, say)."""
    cdef int count = 0
    cdef int code = gn_cuda_device_count(&count)
    if code != 0:
        return 0, _error(code)
    return count, None


def versions():
    """``(runtime, driver)`` versions as 1000*major + 10*minor (the driver's 0 where there is none)."""
    return gn_cuda_runtime_version(), gn_cuda_driver_version()


def forward(Problem problem not None, int device, uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t y,
            uintptr_t mean, uintptr_t rstd, uintptr_t workspace, uintptr_t stream):
    """Queues the forward on `stream` of `device` (see gn_cuda_forward); the thread's current device is left as it
    was."""
    cdef const gn_cuda_problem* p = &problem.p
    cdef int code, previous = device
    with nogil:
        code = _on_device(device, &previous)
        if code == 0:
            code = gn_cuda_forward(p, <const void*>x, <const void*>weight, <const void*>bias, <void*>y,
                                   <void*>mean, <void*>rstd, <void*>workspace, <void*>stream)
        if previous != device:
            gn_cuda_set_device(previous)
    _check(code, "forward")


def backward(Problem problem not None, int device, uintptr_t dy, uintptr_t x, uintptr_t mean, uintptr_t rstd,
             uintptr_t weight, uintptr_t bias, uintptr_t dx, uintptr_t grad_weight, uintptr_t grad_bias,
             uintptr_t workspace, uintptr_t stream):
    """Queues the backward on `stream` of `device` (see gn_cuda_backward); the thread's current device is left as
    it was."""
    cdef const gn_cuda_problem* p = &problem.p
    cdef int code, previous = device
    with nogil:
        code = _on_device(device, &previous)
        if code == 0:
            code = gn_cuda_backward(p, <const void*>dy, <const void*>x, <const void*>mean, <const void*>rstd,
                                    <const void*>weight, <const void*>bias, <void*>dx, <void*>grad_weight,
                                    <void*>grad_bias, <void*>workspace, <void*>stream)
        if previous != device:
            gn_cuda_set_device(previous)
    _check(code, "backward")
