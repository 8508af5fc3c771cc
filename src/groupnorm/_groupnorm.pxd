# Declarations of the C++ API in cpp/include/groupnorm/groupnorm.h, for _core.pyx.
from libc.stdint cimport int64_t
from libcpp cimport bool as cbool

cdef extern from "groupnorm/groupnorm.h" namespace "groupnorm" nogil:
    ctypedef enum Status:
        kOk
        kInvalidArgument
        kUnsupported
        kOutOfMemory

    enum class Layout(int):
        kChannelsFirst
        kChannelsLast

    enum class Activation(int):
        kNone
        kSilu

    enum class DType(int):
        kFloat32
        kFloat64
        kFloat16
        kBFloat16

    enum class Isa(int):
        kScalar
        kAvx2
        kAvx512
        kNeon
        kAvx512Bf16

    cdef struct Problem:
        int64_t N
        int64_t C
        int64_t G
        int64_t HxW
        Layout layout
        Activation activation
        double eps
        int num_threads

    Status group_norm_forward(const Problem& problem, DType dtype, const void* x, const void* weight,
                              const void* bias, void* y, void* mean_out, void* rstd_out)
    Status group_norm_backward(const Problem& problem, DType dtype, const void* dy, const void* x,
                               const void* mean, const void* rstd, const void* weight, const void* bias, void* dx,
                               void* dweight, void* dbias)
    int get_num_threads()
    void set_num_threads(int n)
    cbool fork_serial()
    cbool openmp_enabled()
    const char* isa_name(Isa isa)
    cbool isa_compiled(Isa isa)
    cbool isa_supported(Isa isa)
    Isa isa_best()
    Isa isa_current()
    Status isa_select(Isa isa)
