// AVX-512 (F, BW, DQ, VL) + AVX512_BF16 build of the bfloat16 kernels: the avx512 level's code, with float ->
// bfloat16 narrowing by vcvtneps2bf16 (vec/avx512.h, under __AVX512BF16__); the only file compiled with
// -mavx512bf16. The other dtypes would compile to the avx512 level's instructions: dispatch.cpp lends them.
#define GROUPNORM_ISA avx512_bf16
#include "groupnorm/vec/avx512.h"
#include "../forward_impl.h"
#include "../backward_impl.h"

namespace groupnorm {
namespace avx512_bf16 {
GROUPNORM_DEFINE_BF16_KERNEL_TABLE(VecF32)
}  // namespace avx512_bf16
}  // namespace groupnorm
