// groupnorm_cuda.cu: the CUDA translation unit. The kernels and their launchers are in the headers, which
// tests/cuda_emu also compiles for the CPU; this file instantiates them for nvcc and adds the runtime queries.
#include "groupnorm_cuda_impl.cuh"

extern "C" {

int gn_cuda_device_count(int* count) {
  *count = 0;
  const cudaError_t err = cudaGetDeviceCount(count);
  if (err != cudaSuccess) *count = 0;
  return static_cast<int>(err);
}

int gn_cuda_get_device(int* device) { return static_cast<int>(cudaGetDevice(device)); }

int gn_cuda_set_device(int device) {
  const cudaError_t err = cudaSetDevice(device);
  // A failure is returned here, not left as the thread's last error: the next call's launch check
  // (cudaGetLastError) would report it as its own, after a restore whose result the caller ignores.
  if (err != cudaSuccess) (void)cudaGetLastError();
  return static_cast<int>(err);
}

const char* gn_cuda_error_name(int error) {
  if (error == GN_CUDA_BAD_PROBLEM) return "GN_CUDA_BAD_PROBLEM";
  return cudaGetErrorName(static_cast<cudaError_t>(error));
}

const char* gn_cuda_error_string(int error) {
  if (error == GN_CUDA_BAD_PROBLEM) return "the problem is outside what the kernels take (groupnorm_cuda.h)";
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}

int gn_cuda_runtime_version(void) {
  int version = 0;
  cudaRuntimeGetVersion(&version);
  return version;
}

int gn_cuda_driver_version(void) {
  int version = 0;
  cudaDriverGetVersion(&version);
  return version;
}

}  // extern "C"
