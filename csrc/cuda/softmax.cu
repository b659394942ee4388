// Softmax and log-softmax on CUDA, forward and backward, over any dim.
//
// Last dim (inner == 1): a row is read in 16-byte slots (when the rows are 16-byte aligned; element-wise
// otherwise) and takes one of two paths.
//  - cached: the row fits in registers (at most kMaxIters slots a thread, in the storage type). Short rows get
//    a group of <= 32 lanes each, several rows per block, reduced with warp shuffles; longer rows get a block of
//    up to 1024 (forward) / 512 (backward, which caches dy and y) threads, reduced through shared memory. One
//    read and one write of each tensor.
//  - cached with a shared-memory tail: a row past the registers' capacity that fits with its remaining slots in
//    the block's shared memory (the GPU's opt-in maximum, e.g. 227 KB on sm_90) gets one block; each thread keeps
//    its slots past the registers' in shared memory (only it reads them back: no barrier). Still one read and
//    one write of each tensor: 128256 bf16 logits, 50257 fp32, the backward of 32000 classes.
//  - online: longer rows take one block per row and two passes: an online max+sum (LogSumExp), then the write
//    (the backward: the dot product, then the write) - two reads instead of one, the second mostly from L2.
// Other dims (inner > 1) use a strided kernel instead of a transposing copy: a block's x threads take adjacent
// columns (coalesced), its y threads split each column's reduction, merged through shared memory.
// The log flag is a run-time argument: it costs one uniform branch and halves the instantiations to compile.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <type_traits>

#include "common.h"
#include "cuda/common.cuh"

namespace fastnn::cuda {
namespace {

// Slots a thread caches per tensor, at most: float 8 x 16 B = 32 registers. The others stop at 4: the
// compiler keeps half types' widened values live too and spills at 8, and 8 doubles' slots spill the same way.
template <typename T> constexpr int kMaxIters = std::is_same_v<T, float> ? 8 : 4;
constexpr int kFwdThreads = 1024;     // cached forward: 32 registers of cache fit the 64 a 1024-thread block allows
constexpr int kBwdThreads = 512;      // cached backward caches dy and y: 64 registers of cache
constexpr int kGroupThreads = 128;    // block size when several short rows share a block
constexpr int kOnlineThreads = 512;
constexpr int kStridedThreads = 256;  // strided kernel: blockDim.x * blockDim.y

// ------------------------------------------------------------------------------------------------------------
// Kernels. Rows are visited by a grid-stride loop whose trip count is uniform over the block, so the
// reductions' shuffles and barriers are reached by every thread; threads of a row past the end only idle.

// The dynamic shared memory of the TAIL kernels: the slots of a row past the registers' (one row per block).
template <typename T> __device__ __forceinline__ Vec<T, kVec<T>>* tail_slots() {
  extern __shared__ __align__(16) unsigned char tail_raw[];
  return reinterpret_cast<Vec<T, kVec<T>>*>(tail_raw);
}

// TAIL: one row per block (blockDim.y == 1); slots from ITERS * blockDim.x on live in shared memory, each read back
// only by the thread that wrote it.
template <typename T, int ITERS, bool TAIL = false>
__global__ void __launch_bounds__(kFwdThreads)
    softmax_fwd_cached(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int64_t n, bool vec, bool log) {
  using A = acc_t<T>;
  constexpr int N = kVec<T>;
  const int64_t slots = ceil_div(n, N), reg_slots = int64_t(ITERS) * blockDim.x;
  Vec<T, N>* tail = tail_slots<T>();  // slot s at tail[s - reg_slots]
  for (int64_t r0 = int64_t(blockIdx.x) * blockDim.y; r0 < rows; r0 += int64_t(gridDim.x) * blockDim.y) {
    const int64_t row = r0 + threadIdx.y;
    const bool live = row < rows;
    const T* xr = x + (live ? row : 0) * n;
    Vec<T, N> c[ITERS];
    A m = neg_inf<A>();
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int64_t slot = int64_t(i) * blockDim.x + threadIdx.x;
      if (live && slot < slots) {
        // -inf padding leaves the max and (as exp(-inf - m) = 0) the sum alone; if m itself is -inf the row is
        // all -inf (or NaN) and the result is NaN anyway, as in torch.
        c[i] = load_slot(xr, slot, n, vec, static_cast<T>(neg_inf<float>()));
#pragma unroll
        for (int j = 0; j < N; ++j) m = fmax(m, static_cast<A>(c[i].v[j]));
      }
    }
    if constexpr (TAIL) {
      for (int64_t slot = reg_slots + threadIdx.x; slot < slots; slot += blockDim.x) {
        const Vec<T, N> v = load_slot(xr, slot, n, vec, static_cast<T>(neg_inf<float>()));
        tail[slot - reg_slots] = v;
#pragma unroll
        for (int j = 0; j < N; ++j) m = fmax(m, static_cast<A>(v.v[j]));
      }
    }
    m = row_reduce(m, MaxOp{});
    A s = 0;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int64_t slot = int64_t(i) * blockDim.x + threadIdx.x;
      if (live && slot < slots) {
#pragma unroll
        for (int j = 0; j < N; ++j) s += exp_(static_cast<A>(c[i].v[j]) - m);  // NaN in x: s NaN, row NaN
      }
    }
    if constexpr (TAIL) {
      for (int64_t slot = reg_slots + threadIdx.x; slot < slots; slot += blockDim.x) {
        const Vec<T, N> v = tail[slot - reg_slots];
#pragma unroll
        for (int j = 0; j < N; ++j) s += exp_(static_cast<A>(v.v[j]) - m);
      }
    }
    s = row_reduce(s, SumOp{});
    // log: (x - m) - log(s), not x - (m + log(s)): at |x| ~ 1e4 that sum would round log(s) away.
    const A log_s = log_(s), inv = A(1) / s;
    auto out = [&](Vec<T, N>& v) {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const A d = static_cast<A>(v.v[j]) - m;
        v.v[j] = static_cast<T>(log ? d - log_s : exp_(d) * inv);
      }
    };
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int64_t slot = int64_t(i) * blockDim.x + threadIdx.x;
      if (live && slot < slots) {
        out(c[i]);
        store_slot(y + row * n, slot, n, vec, c[i]);
      }
    }
    if constexpr (TAIL) {
      for (int64_t slot = reg_slots + threadIdx.x; slot < slots; slot += blockDim.x) {
        Vec<T, N> v = tail[slot - reg_slots];
        out(v);
        store_slot(y + row * n, slot, n, vec, v);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kOnlineThreads)
    softmax_fwd_online(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int64_t n, bool vec, bool log) {
  using A = acc_t<T>;
  constexpr int N = kVec<T>;
  const int64_t slots = ceil_div(n, N);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * n;
    LogSumExp<A> acc = LogSumExp<A>::empty();
#pragma unroll 4
    for (int64_t slot = threadIdx.x; slot < slots; slot += blockDim.x) {
      A v[N];
      widen(load_slot(xr, slot, n, vec, static_cast<T>(neg_inf<float>())), v);
      acc.add(v);
    }
    acc = block_reduce(acc, MergeOp{});
    const A log_s = log_(acc.s), inv = A(1) / acc.s;
#pragma unroll 4
    for (int64_t slot = threadIdx.x; slot < slots; slot += blockDim.x) {
      Vec<T, N> c = load_slot(xr, slot, n, vec, T(0));
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const A v = static_cast<A>(c.v[j]) - acc.m;
        c.v[j] = static_cast<T>(log ? v - log_s : exp_(v) * inv);
      }
      store_slot(y + row * n, slot, n, vec, c);
    }
  }
}

// grad_input: softmax  dx = y * (dy - sum(dy * y));  log_softmax  dx = dy - exp(y) * sum(dy).
template <typename A> __device__ __forceinline__ A bwd_term(A dy, A y, bool log) { return log ? dy : dy * y; }
template <typename A> __device__ __forceinline__ A bwd_value(A dy, A y, A d, bool log) {
  return log ? dy - exp_(y) * d : y * (dy - d);
}

// TAIL: as the forward's; the shared memory holds dy's tail slots, then y's.
template <typename T, int ITERS, bool TAIL = false>
__global__ void __launch_bounds__(kBwdThreads)
    softmax_bwd_cached(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx, int64_t rows,
                       int64_t n, bool vec, bool log) {
  using A = acc_t<T>;
  constexpr int N = kVec<T>;
  const int64_t slots = ceil_div(n, N), reg_slots = int64_t(ITERS) * blockDim.x;
  Vec<T, N>* tail_g = tail_slots<T>();  // slot s at tail_g[s - reg_slots], and of y at tail_y[s - reg_slots]
  Vec<T, N>* tail_y = tail_g + (slots - reg_slots);
  for (int64_t r0 = int64_t(blockIdx.x) * blockDim.y; r0 < rows; r0 += int64_t(gridDim.x) * blockDim.y) {
    const int64_t row = r0 + threadIdx.y;
    const bool live = row < rows;
    const int64_t base = (live ? row : 0) * n;
    Vec<T, N> cg[ITERS], cy[ITERS];
    A d = 0;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int64_t slot = int64_t(i) * blockDim.x + threadIdx.x;
      if (live && slot < slots) {
        cg[i] = load_slot(dy + base, slot, n, vec, T(0));  // zero padding adds nothing to either sum
        cy[i] = load_slot(y + base, slot, n, vec, T(0));
#pragma unroll
        for (int j = 0; j < N; ++j) d += bwd_term(static_cast<A>(cg[i].v[j]), static_cast<A>(cy[i].v[j]), log);
      }
    }
    if constexpr (TAIL) {
      for (int64_t slot = reg_slots + threadIdx.x; slot < slots; slot += blockDim.x) {
        const Vec<T, N> g = load_slot(dy + base, slot, n, vec, T(0)), v = load_slot(y + base, slot, n, vec, T(0));
        tail_g[slot - reg_slots] = g;
        tail_y[slot - reg_slots] = v;
#pragma unroll
        for (int j = 0; j < N; ++j) d += bwd_term(static_cast<A>(g.v[j]), static_cast<A>(v.v[j]), log);
      }
    }
    d = row_reduce(d, SumOp{});
    auto out = [&](Vec<T, N>& g, const Vec<T, N>& v) {  // dy -> dx in place
#pragma unroll
      for (int j = 0; j < N; ++j)
        g.v[j] = static_cast<T>(bwd_value(static_cast<A>(g.v[j]), static_cast<A>(v.v[j]), d, log));
    };
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int64_t slot = int64_t(i) * blockDim.x + threadIdx.x;
      if (live && slot < slots) {
        out(cg[i], cy[i]);
        store_slot(dx + base, slot, n, vec, cg[i]);
      }
    }
    if constexpr (TAIL) {
      for (int64_t slot = reg_slots + threadIdx.x; slot < slots; slot += blockDim.x) {
        Vec<T, N> g = tail_g[slot - reg_slots];
        out(g, tail_y[slot - reg_slots]);
        store_slot(dx + base, slot, n, vec, g);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kOnlineThreads)
    softmax_bwd_online(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx, int64_t rows,
                       int64_t n, bool vec, bool log) {
  using A = acc_t<T>;
  constexpr int N = kVec<T>;
  const int64_t slots = ceil_div(n, N);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t base = row * n;
    A d = 0;
#pragma unroll 4
    for (int64_t slot = threadIdx.x; slot < slots; slot += blockDim.x) {
      const Vec<T, N> g = load_slot(dy + base, slot, n, vec, T(0)), v = load_slot(y + base, slot, n, vec, T(0));
#pragma unroll
      for (int j = 0; j < N; ++j) d += bwd_term(static_cast<A>(g.v[j]), static_cast<A>(v.v[j]), log);
    }
    d = block_reduce(d, SumOp{});
#pragma unroll 4
    for (int64_t slot = threadIdx.x; slot < slots; slot += blockDim.x) {
      Vec<T, N> g = load_slot(dy + base, slot, n, vec, T(0));
      const Vec<T, N> v = load_slot(y + base, slot, n, vec, T(0));
#pragma unroll
      for (int j = 0; j < N; ++j)
        g.v[j] = static_cast<T>(bwd_value(static_cast<A>(g.v[j]), static_cast<A>(v.v[j]), d, log));
      store_slot(dx + base, slot, n, vec, g);
    }
  }
}

// Non-last dim: the tensor is [outer, n, inner]; column (o, c) is x[o][:][c]. blockDim.x adjacent columns,
// blockDim.y threads splitting each column's n elements; partial results merge through shared memory.
template <typename T>
__global__ void __launch_bounds__(kStridedThreads)
    softmax_fwd_strided(const T* __restrict__ x, T* __restrict__ y, int64_t outer, int64_t n, int64_t inner,
                        bool log) {
  using A = acc_t<T>;
  __shared__ __align__(16) unsigned char raw[kStridedThreads * sizeof(LogSumExp<A>)];
  auto* scratch = reinterpret_cast<LogSumExp<A>*>(raw);
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool live = col < inner;
  for (int64_t o = blockIdx.y; o < outer; o += gridDim.y) {
    const int64_t base = o * n * inner + (live ? col : 0);
    LogSumExp<A> acc = LogSumExp<A>::empty();
    if (live) {
      for (int64_t k = threadIdx.y; k < n; k += blockDim.y) {
        const A v[1] = {static_cast<A>(x[base + k * inner])};
        acc.add(v);
      }
    }
    scratch[threadIdx.y * blockDim.x + threadIdx.x] = acc;
    __syncthreads();
    acc = scratch[threadIdx.x];
    for (unsigned k = 1; k < blockDim.y; ++k) acc = LogSumExp<A>::merge(acc, scratch[k * blockDim.x + threadIdx.x]);
    __syncthreads();
    const A log_s = log_(acc.s), inv = A(1) / acc.s;
    if (live) {
      for (int64_t k = threadIdx.y; k < n; k += blockDim.y) {
        const A v = static_cast<A>(x[base + k * inner]) - acc.m;
        y[base + k * inner] = static_cast<T>(log ? v - log_s : exp_(v) * inv);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kStridedThreads)
    softmax_bwd_strided(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx, int64_t outer,
                        int64_t n, int64_t inner, bool log) {
  using A = acc_t<T>;
  __shared__ A scratch[kStridedThreads];
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool live = col < inner;
  for (int64_t o = blockIdx.y; o < outer; o += gridDim.y) {
    const int64_t base = o * n * inner + (live ? col : 0);
    A d = 0;
    if (live) {
      for (int64_t k = threadIdx.y; k < n; k += blockDim.y)
        d += bwd_term(static_cast<A>(dy[base + k * inner]), static_cast<A>(y[base + k * inner]), log);
    }
    scratch[threadIdx.y * blockDim.x + threadIdx.x] = d;
    __syncthreads();
    d = scratch[threadIdx.x];
    for (unsigned k = 1; k < blockDim.y; ++k) d += scratch[k * blockDim.x + threadIdx.x];
    __syncthreads();
    if (live) {
      for (int64_t k = threadIdx.y; k < n; k += blockDim.y) {
        const int64_t i = base + k * inner;
        dx[i] = static_cast<T>(bwd_value(static_cast<A>(dy[i]), static_cast<A>(y[i]), d, log));
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Launch geometry.

constexpr int64_t kMaxGridX = INT_MAX, kMaxGridY = 65535;

// Threads per row, rows per block and slots per thread for a cached row of `slots` slots, or iters == 0 when the
// row does not fit (max_threads * max_iters slots).
struct Cached {
  int threads, rows, iters;
};
Cached cached_config(int64_t slots, int max_threads, int max_iters) {
  if (slots <= 32) {  // one group of <= 32 lanes per row, one slot each
    const int t = next_pow2(slots);
    return {t, kGroupThreads / t, 1};
  }
  if (slots <= 32 * max_iters) return {32, kGroupThreads / 32, next_pow2(ceil_div(slots, 32))};
  if (slots > int64_t(max_threads) * max_iters) return {0, 0, 0};
  // A whole block per row; at least 128 threads, so each thread's share stays a few slots.
  const int t = std::min(max_threads, std::max(128, next_pow2(ceil_div(slots, max_iters))));
  return {t, 1, next_pow2(ceil_div(slots, t))};
}

// Launches the TAIL variant of a cached kernel (one row a block, `threads` threads caching `iters` slots each in
// registers) if the row's remaining slots of `tensors` tensors fit in the device's shared memory; false otherwise.
template <typename Kernel, typename... Args>
bool launch_tail(Kernel kernel, int64_t rows, int64_t slots, int threads, int iters, int tensors, size_t slot_bytes,
                 cudaStream_t stream, Args... args) {
  const int64_t bytes = (slots - int64_t(threads) * iters) * tensors * int64_t(slot_bytes);
  int device = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));  // the static shared memory of block_reduce
  if (bytes <= 0 || bytes + int64_t(attr.sharedSizeBytes) > optin) return false;
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  kernel<<<static_cast<unsigned>(std::min<int64_t>(rows, kMaxGridX)), threads, size_t(bytes), stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

unsigned grid_for(int64_t blocks) { return static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks, kMaxGridX))); }

// Calls f(std::integral_constant<int, I>) for I = iters, a power of two up to kMaxIters<T>.
template <typename T, typename F> void with_iters(int iters, F&& f) {
  switch (iters) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8:
      if constexpr (kMaxIters<T> >= 8) return f(std::integral_constant<int, 8>{});
  }
  TORCH_CHECK(false, "fastnn softmax: unexpected slots per thread ", iters);
}

// Strided kernel: columns across x (up to a warp, for coalescing), the rest of the block splits the reduction.
std::pair<dim3, dim3> strided_config(const DimGeometry& g) {
  const int bx = std::min<int>(32, next_pow2(g.inner));
  const int by = std::min<int>(kStridedThreads / bx, next_pow2(g.size));
  const int64_t gx = ceil_div(g.inner, bx);
  TORCH_CHECK(gx <= kMaxGridX, "fastnn softmax: too many columns (", g.inner, ") after the softmax dim");
  return {dim3(static_cast<unsigned>(gx), static_cast<unsigned>(std::min(g.outer, kMaxGridY))), dim3(bx, by)};
}

template <typename T> void launch_fwd(const T* x, T* y, const DimGeometry& g, bool log, cudaStream_t stream) {
  if (g.inner != 1) {
    const auto [grid, block] = strided_config(g);
    softmax_fwd_strided<T><<<grid, block, 0, stream>>>(x, y, g.outer, g.size, g.inner, log);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t n = g.size, rows = g.outer, slots = ceil_div(n, kVec<T>);
  const bool vec = n % kVec<T> == 0 && aligned16(x) && aligned16(y);
  const Cached c = cached_config(slots, kFwdThreads, kMaxIters<T>);
  // Half the register cache of the plain kernel: the tail loops' registers must fit the 64 of a 1024-thread block.
  constexpr int kTailIters = kMaxIters<T> / 2;
  if (c.iters == 0 && launch_tail(softmax_fwd_cached<T, kTailIters, true>, rows, slots, kFwdThreads, kTailIters, 1,
                                  sizeof(Vec<T>), stream, x, y, rows, n, vec, log))
    return;
  if (c.iters == 0) {
    softmax_fwd_online<T><<<grid_for(rows), kOnlineThreads, 0, stream>>>(x, y, rows, n, vec, log);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  with_iters<T>(c.iters, [&](auto I) {
    softmax_fwd_cached<T, decltype(I)::value><<<grid_for(ceil_div(rows, c.rows)), dim3(c.threads, c.rows), 0,
                                                 stream>>>(x, y, rows, n, vec, log);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename T>
void launch_bwd(const T* dy, const T* y, T* dx, const DimGeometry& g, bool log, cudaStream_t stream) {
  if (g.inner != 1) {
    const auto [grid, block] = strided_config(g);
    softmax_bwd_strided<T><<<grid, block, 0, stream>>>(dy, y, dx, g.outer, g.size, g.inner, log);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t n = g.size, rows = g.outer, slots = ceil_div(n, kVec<T>);
  const bool vec = n % kVec<T> == 0 && aligned16(dy) && aligned16(y) && aligned16(dx);
  const Cached c = cached_config(slots, kBwdThreads, kMaxIters<T>);
  // A quarter of the plain kernel's register cache: with more, ptxas 13.0 spilled the tail loops (sm_80 at 8 slots,
  // sm_90 at 4 for float).
  constexpr int kTailIters = std::max(1, kMaxIters<T> / 4);
  if (c.iters == 0 && launch_tail(softmax_bwd_cached<T, kTailIters, true>, rows, slots, kBwdThreads, kTailIters, 2,
                                  sizeof(Vec<T>), stream, dy, y, dx, rows, n, vec, log))
    return;
  if (c.iters == 0) {
    softmax_bwd_online<T><<<grid_for(rows), kOnlineThreads, 0, stream>>>(dy, y, dx, rows, n, vec, log);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  with_iters<T>(c.iters, [&](auto I) {
    softmax_bwd_cached<T, decltype(I)::value><<<grid_for(ceil_div(rows, c.rows)), dim3(c.threads, c.rows), 0,
                                                 stream>>>(dy, y, dx, rows, n, vec, log);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor softmax_fwd_cuda(const at::Tensor& input, int64_t dim, bool log) {
  check_floating(input, "input");
  TORCH_CHECK(input.is_cuda(), "input must be a CUDA tensor, got ", input.device());
  dim = wrap_dim(dim, input.dim());
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  const DimGeometry g(x, dim);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "softmax_fwd_cuda", [&] {
    launch_fwd<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), g, log, stream);
  });
  return y;
}

at::Tensor softmax_bwd_cuda(const at::Tensor& grad_output, const at::Tensor& output, int64_t dim, bool log) {
  check_floating(output, "output");
  check_same(grad_output, "grad_output", output, "output");
  TORCH_CHECK(output.is_cuda(), "output must be a CUDA tensor, got ", output.device());
  dim = wrap_dim(dim, output.dim());
  const c10::cuda::CUDAGuard guard(output.device());
  const at::Tensor dy = grad_output.contiguous(), y = output.contiguous();
  at::Tensor dx = at::empty(y.sizes(), y.options());
  if (y.numel() == 0) return dx;
  const DimGeometry g(y, dim);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "softmax_bwd_cuda", [&] {
    launch_bwd<scalar_t>(dy.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                         dx.mutable_data_ptr<scalar_t>(), g, log, stream);
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnn, CUDA, m) {
  m.impl("softmax_fwd", &softmax_fwd_cuda);
  m.impl("softmax_bwd", &softmax_bwd_cuda);
}

}  // namespace fastnn::cuda
