// The CUDA runtime, c10/ATen CUDA and cuBLAS calls of csrc/cuda/*.cu, for compiling those files whole as host C++
// (tools/cuda_emu/library.py): kernels run in prelude.h's emulator on CPU memory, the launch geometry, device
// queries and host logic are the files' own. The emulated device is an sm_90 (EMU_SM) with EMU_SMS multiprocessors
// (default 8, so that grid-stride loops and co-residency limits are reached by small shapes).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <dlfcn.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>
#include <utility>

#include "prelude.h"

#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

using cudaStream_t = void*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
inline const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

struct cudaDeviceProp {
  int major = 9, minor = 0;
  int multiProcessorCount = 8;
  size_t sharedMemPerBlockOptin = kEmuMaxSmem;
  size_t sharedMemPerMultiprocessor = 228 * 1024;
  int maxThreadsPerMultiProcessor = 2048;
  int cooperativeLaunch = 1;
  char name[32] = "cuda_emu sm_90";
};
// EMU_SMS: the multiprocessor count; EMU_SM: the compute capability (default 90; e.g. 75 turns the sm_80+ paths
// off). Read at every query, so a check can change them between calls.
inline cudaDeviceProp* emu_device_prop() {
  static thread_local cudaDeviceProp p;
  p = cudaDeviceProp{};
  if (const char* e = getenv("EMU_SMS")) p.multiProcessorCount = atoi(e);
  if (const char* e = getenv("EMU_SM")) p.major = atoi(e) / 10, p.minor = atoi(e) % 10;
  return &p;
}
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin, cudaDevAttrMultiProcessorCount };
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? emu_device_prop()->multiProcessorCount
                                           : int(emu_device_prop()->sharedMemPerBlockOptin);
  return cudaSuccess;
}
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
struct cudaFuncAttributes {
  size_t sharedSizeBytes = 256;  // block_reduce's scratch and the like: the emulator does not know the kernel's
};
template <typename K> cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, K) {
  *a = cudaFuncAttributes{};
  return cudaSuccess;
}
// The dynamic shared memory granted to each kernel by cudaFuncSetAttribute: a launch asking for more than the
// default 48 KB without a grant fails on a GPU, and aborts here.
struct EmuSmemGrants {
  std::mutex mu;
  std::map<const void*, int> bytes;
};
inline EmuSmemGrants emu_smem_grants;
template <typename K> cudaError_t cudaFuncSetAttribute(K kernel, cudaFuncAttribute, int value) {
  if (value < 0 || size_t(value) > kEmuMaxSmem) emu_fail("cudaFuncSetAttribute: shared memory past the opt-in maximum");
  std::lock_guard<std::mutex> lock(emu_smem_grants.mu);
  emu_smem_grants.bytes[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}
inline void emu_check_smem_grant(const void* kernel, size_t smem) {
  if (smem <= 48 * 1024) return;
  std::lock_guard<std::mutex> lock(emu_smem_grants.mu);
  const auto it = emu_smem_grants.bytes.find(kernel);
  if (it == emu_smem_grants.bytes.end() || size_t(it->second) < smem)
    emu_fail("a launch asks for more than 48 KB of dynamic shared memory that cudaFuncSetAttribute did not grant");
}
// Blocks an SM holds at once by threads and shared memory (registers are not modelled).
template <typename K> cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int threads, size_t smem) {
  const cudaDeviceProp* p = emu_device_prop();
  int by_smem = smem ? int(p->sharedMemPerMultiprocessor / (smem + 1024)) : 32;
  *n = std::min({32, p->maxThreadsPerMultiProcessor / threads, by_smem});
  return cudaSuccess;
}

// Every launch since the last call of the library's op `launches()`: "site@offset", the .cu file's line and the
// kernel's address within the library (checks.py names it from the symbol table).
struct EmuLaunchLog {
  std::mutex mu;
  std::vector<std::string> entries;
  void add(const char* site, const void* kernel) {
    Dl_info info{};
    const uintptr_t base = dladdr(kernel, &info) ? reinterpret_cast<uintptr_t>(info.dli_fbase) : 0;
    std::lock_guard<std::mutex> lock(mu);
    entries.push_back(std::string(site) + "@" + std::to_string(reinterpret_cast<uintptr_t>(kernel) - base));
  }
};
inline EmuLaunchLog emu_launch_log;

// kernel<<<grid, block, smem, stream>>>(args) is rewritten by library.py as
// emu_launch_kernel("file:line", kernel, [&] { kernel(args); }, grid, block, smem, stream).
template <typename K, typename F>
void emu_launch_kernel(const char* site, K kernel, F&& call, dim3 grid, dim3 block, size_t smem = 0,
                       cudaStream_t = nullptr) {
  emu_launch_log.add(site, reinterpret_cast<const void*>(kernel));
  emu_check_smem_grant(reinterpret_cast<const void*>(kernel), smem);
  emu_launch(grid, block, smem, call);
}
// cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), ...) is rewritten as emu_cooperative(kernel, ...):
// the typed function pointer lets the emulator read back the arguments from `args`.
template <typename... P>
cudaError_t emu_cooperative(void (*kernel)(P...), dim3 grid, dim3 block, void** args, size_t smem, cudaStream_t) {
  const auto call = [&]<size_t... I>(std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<P>>*>(args[I])...);
  };
  emu_launch_log.add("cooperative", reinterpret_cast<const void*>(kernel));
  emu_check_smem_grant(reinterpret_cast<const void*>(kernel), smem);
  emu_launch(grid, block, smem, [&] { call(std::index_sequence_for<P...>{}); }, grid.x * grid.y * grid.z);
  return cudaSuccess;
}

#define C10_CUDA_CHECK(expr)                                       \
  do {                                                             \
    if ((expr) != cudaSuccess) emu_fail("a CUDA call failed: " #expr); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

namespace c10::cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int = -1) { return {}; }
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(int) {}
};
}  // namespace c10::cuda
namespace at::cuda {
using c10::cuda::getCurrentCUDAStream;
inline cudaDeviceProp* getCurrentDeviceProperties() { return emu_device_prop(); }
}  // namespace at::cuda

// ---- cuBLAS: the one call fastnn makes (cublasGemmEx, column-major, 16-bit A and B, float32 C and compute).
using cublasHandle_t = void*;
using cublasStatus_t = int;
constexpr cublasStatus_t CUBLAS_STATUS_SUCCESS = 0;
enum cublasOperation_t { CUBLAS_OP_N, CUBLAS_OP_T };
enum cudaDataType_t { CUDA_R_16F, CUDA_R_16BF, CUDA_R_32F };
using cudaDataType = cudaDataType_t;
enum cublasComputeType_t { CUBLAS_COMPUTE_32F };
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT };
namespace at::cuda {
inline cublasHandle_t getCurrentCUDABlasHandle() { return nullptr; }
}  // namespace at::cuda
inline float emu_load(const void* p, cudaDataType_t t, int64_t i) {
  switch (t) {
    case CUDA_R_16F: return float(static_cast<const c10::Half*>(p)[i]);
    case CUDA_R_16BF: return float(static_cast<const c10::BFloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}
inline cublasStatus_t cublasGemmEx(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                   const void* alpha, const void* A, cudaDataType_t at, int lda, const void* B,
                                   cudaDataType_t bt, int ldb, const void* beta, void* C, cudaDataType_t ct, int ldc,
                                   cublasComputeType_t, cublasGemmAlgo_t) {
  if (ct != CUDA_R_32F) emu_fail("cublasGemmEx: the emulation takes a float32 C only");
  const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
  float* c = static_cast<float*>(C);
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < m; ++i) {
      float s = 0.f;
      for (int p = 0; p < k; ++p)
        s += emu_load(A, at, ta == CUBLAS_OP_N ? i + int64_t(p) * lda : p + int64_t(i) * lda) *
             emu_load(B, bt, tb == CUBLAS_OP_N ? p + int64_t(j) * ldb : j + int64_t(p) * ldb);
      float& out = c[i + int64_t(j) * ldc];
      out = al * s + (be == 0.f ? 0.f : be * out);
    }
  return CUBLAS_STATUS_SUCCESS;
}
#define TORCH_CUDABLAS_CHECK(expr)                                              \
  do {                                                                          \
    if ((expr) != CUBLAS_STATUS_SUCCESS) emu_fail("a cuBLAS call failed: " #expr); \
  } while (0)

// ---- what csrc/cuda/mma.cuh adds to prelude.h's tensor-core emulation
namespace fastnn::cuda {
template <typename T> constexpr bool kHalfType = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;
}
namespace fastnn::cuda::mma {
template <typename T> inline uint16_t bits(float x) { return static_cast<uint16_t>(pack2<T>(x, 0.f) & 0xffffu); }
}  // namespace fastnn::cuda::mma
