// AVX-512 (F, BW, DQ, VL) build of the kernels (x86-64-v4 class); the only file compiled with -mavx512*.
#define GROUPNORM_ISA avx512
#include "groupnorm/vec/avx512.h"
#include "../forward_impl.h"
#include "../backward_impl.h"

namespace groupnorm {
namespace avx512 {
GROUPNORM_DEFINE_KERNEL_TABLE(VecF32, VecF64)
}  // namespace avx512
}  // namespace groupnorm
