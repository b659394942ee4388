// Binary cross-entropy with logits on CUDA: grid-stride elementwise kernels, one fused pass forward (loss, or
// per-block partial sums) and one backward (grad_input and grad_target together), recomputing from input and
// target. Same formulas as csrc/cpu/bce_with_logits.cpp:
//   loss = w * ((1 - y) * x + lw * sp),   sp = log1p(exp(-|x|)) + max(-x, 0),   lw = 1 + (pw - 1) * y
//   d/dx = w * g * (lw * sigmoid(x) - pw * y),   d/dy = w * g * ((pw - 1) * sp - x)
// weight / pos_weight / grad_output are Broadcast operands read in place. The reduction grid is capped at a
// fixed kMaxBlocks, and the partials are added in a fixed order by one block, so the result is deterministic.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "bce_with_logits.h"

namespace fastnn::cuda {
namespace {

using bce::Operand;

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 2048;  // grid-stride beyond: enough to fill any current GPU

__device__ __forceinline__ float exp_(float x) { return __expf(x); }
__device__ __forceinline__ double exp_(double x) { return ::exp(x); }
__device__ __forceinline__ float log1p_(float x) { return ::log1pf(x); }
__device__ __forceinline__ double log1p_(double x) { return ::log1p(x); }

// By value: a reference to a kernel parameter would make the compiler copy it to local memory.
template <typename A, typename T> __device__ __forceinline__ A read(Operand<T> o, int64_t i) {
  return o.data == nullptr ? A(1) : static_cast<A>(o.data[o.b.offset(i)]);
}

// softplus(-x) = -log(sigmoid(x)), from e = exp(-|x|) <= 1 (never overflows).
template <typename A> __device__ __forceinline__ A softplus_neg(A x, A e) {
  return log1p_(e) + (x < A(0) ? -x : A(0));
}

// Sum over the block, returned to thread 0 (warp shuffles, then one warp over the warp sums).
template <typename A> __device__ A block_sum(A v) {
  __shared__ A warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : A(0);
  if (warp == 0)
    for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

template <typename T, bool REDUCE>
__global__ void __launch_bounds__(kThreads) bce_fwd_kernel(const T* __restrict__ x, const T* __restrict__ y,
                                                           Operand<T> w, Operand<T> pw, T* __restrict__ out,
                                                           at::opmath_type<T>* __restrict__ partial, int64_t n) {
  using A = at::opmath_type<T>;
  A acc = 0;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    const A xv = static_cast<A>(x[i]), yv = static_cast<A>(y[i]);
    const A sp = softplus_neg(xv, exp_(-::abs(xv)));
    const A loss = ((A(1) - yv) * xv + (A(1) + (read<A>(pw, i) - A(1)) * yv) * sp) * read<A>(w, i);
    if constexpr (REDUCE) acc += loss;
    else out[i] = static_cast<T>(loss);
  }
  if constexpr (REDUCE) {
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
  }
}

// One block adds the partials in a fixed order and writes the scalar result.
template <typename T>
__global__ void __launch_bounds__(kThreads) bce_finish_kernel(const at::opmath_type<T>* __restrict__ partial,
                                                              int blocks, int64_t n, bool mean, T* out) {
  using A = at::opmath_type<T>;
  A s = 0;
  for (int b = threadIdx.x; b < blocks; b += kThreads) s += partial[b];
  s = block_sum(s);
  if (threadIdx.x == 0) out[0] = static_cast<T>(mean ? s / A(n) : s);
}

template <typename T, bool DX, bool DY>
__global__ void __launch_bounds__(kThreads) bce_bwd_kernel(const T* __restrict__ x, const T* __restrict__ y,
                                                           Operand<T> w, Operand<T> pw, Operand<T> g,
                                                           at::opmath_type<T> scale, bool has_pw,
                                                           T* __restrict__ dx, T* __restrict__ dy, int64_t n) {
  using A = at::opmath_type<T>;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    const A xv = static_cast<A>(x[i]), yv = static_cast<A>(y[i]);
    const A pwv = read<A>(pw, i);
    const A wg = read<A>(w, i) * read<A>(g, i) * scale;
    const A e = exp_(-::abs(xv));
    if constexpr (DX) {
      const A sig = (xv >= A(0) ? A(1) : e) / (A(1) + e);
      dx[i] = static_cast<T>(((A(1) + (pwv - A(1)) * yv) * sig - pwv * yv) * wg);
    }
    if constexpr (DY) {
      // Without pos_weight d/dy is -x exactly (no 0 * inf at x = -inf).
      const A d = has_pw ? (pwv - A(1)) * softplus_neg(xv, e) - xv : -xv;
      dy[i] = static_cast<T>(d * wg);
    }
  }
}

int grid_for(int64_t n) { return static_cast<int>(std::min<int64_t>(kMaxBlocks, (n + kThreads - 1) / kThreads)); }

at::Tensor bce_with_logits_fwd_cuda(const at::Tensor& input, const at::Tensor& target,
                                    const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
  bce::check_args(input, target, weight, pos_weight, reduction);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous(), y = target.contiguous();
  const int64_t n = x.numel();
  at::Tensor out = bce::fwd_output(x, reduction);
  if (n == 0) return out;
  const int blocks = grid_for(n);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bce_with_logits_fwd_cuda", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const bce::Operands<T> o(x, weight, pos_weight);
    const T *xp = x.const_data_ptr<T>(), *yp = y.const_data_ptr<T>();
    if (reduction == at::Reduction::None) {
      bce_fwd_kernel<T, false><<<blocks, kThreads, 0, stream>>>(xp, yp, o.w, o.pw, out.mutable_data_ptr<T>(),
                                                                nullptr, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    at::Tensor partial = at::empty({blocks}, x.options().dtype(c10::CppTypeToScalarType<A>::value));
    A* pp = partial.mutable_data_ptr<A>();
    bce_fwd_kernel<T, true><<<blocks, kThreads, 0, stream>>>(xp, yp, o.w, o.pw, nullptr, pp, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bce_finish_kernel<T><<<1, kThreads, 0, stream>>>(pp, blocks, n, reduction == at::Reduction::Mean,
                                                     out.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> bce_with_logits_bwd_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                                            const at::Tensor& target,
                                                            const std::optional<at::Tensor>& weight,
                                                            const std::optional<at::Tensor>& pos_weight,
                                                            int64_t reduction, bool input_grad, bool target_grad) {
  bce::check_bwd_args(grad_output, input, target, weight, pos_weight, reduction);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous(), y = target.contiguous();
  const int64_t n = x.numel();
  at::Tensor dx, dy;
  std::tie(dx, dy) = bce::bwd_outputs(x, input_grad, target_grad);
  if (n == 0 || !(input_grad || target_grad)) return {dx, dy};
  const int blocks = grid_for(n);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bce_with_logits_bwd_cuda", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const bce::Operands<T> o(x, weight, pos_weight, grad_output);
    const A scale = bce::grad_scale<A>(reduction, n);
    const T *xp = x.const_data_ptr<T>(), *yp = y.const_data_ptr<T>();
    T* dxp = input_grad ? dx.mutable_data_ptr<T>() : nullptr;
    T* dyp = target_grad ? dy.mutable_data_ptr<T>() : nullptr;
    auto go = [&](auto kernel) {
      kernel<<<blocks, kThreads, 0, stream>>>(xp, yp, o.w, o.pw, o.g, scale, o.has_pw, dxp, dyp, n);
    };
    if (input_grad && target_grad) go(bce_bwd_kernel<T, true, true>);
    else if (input_grad) go(bce_bwd_kernel<T, true, false>);
    else go(bce_bwd_kernel<T, false, true>);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, dy};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnn, CUDA, m) {
  m.impl("bce_with_logits_fwd", &bce_with_logits_fwd_cuda);
  m.impl("bce_with_logits_bwd", &bce_with_logits_bwd_cuda);
}

}  // namespace fastnn::cuda
