// AVX2 + FMA build of the kernels (x86-64-v3 class); the only file compiled with -mavx2 -mfma -mf16c.
#define GROUPNORM_ISA avx2
#include "groupnorm/vec/avx2.h"
#include "../forward_impl.h"
#include "../backward_impl.h"

namespace groupnorm {
namespace avx2 {
GROUPNORM_DEFINE_KERNEL_TABLE(VecF32, VecF64)
}  // namespace avx2
}  // namespace groupnorm
