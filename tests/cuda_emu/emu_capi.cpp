// The C interface of cpp/cuda/groupnorm_cuda.h on the emulated kernels, as a shared library: tests/test_gpu_path.py
// loads it (ctypes) in place of groupnorm._cuda to run groupnorm._gpu's path from torch tensors to the kernels on
// the CPU. Pointers are host pointers; the stream is ignored. gn_emu_set_seed fixes the block and thread orders.
#include "groupnorm_cuda_impl.cuh"

extern "C" void gn_emu_set_seed(uint64_t seed) { gn_emu::set_seed(seed); }
