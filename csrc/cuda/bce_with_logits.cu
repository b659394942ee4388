// Binary cross-entropy with logits on CUDA: grid-stride elementwise kernels over 16-byte slots of input and target
// (element-wise when unaligned, or the size is not a multiple of the slot), one fused pass forward (loss, or
// per-block partial sums) and one backward (grad_input and grad_target together), recomputing from input and
// target. Same formulas as csrc/cpu/bce_with_logits.cpp:
//   loss = w * ((1 - y) * x + lw * sp),   sp = log1p(exp(-|x|)) + max(-x, 0),   lw = 1 + (pw - 1) * y
//   d/dx = w * g * (lw * sigmoid(x) - pw * y),   d/dy = w * g * ((pw - 1) * sp - x)
// weight / pos_weight / grad_output are Broadcast operands read in place, their offsets walked along the loop (an
// OperandWalk: no division per element, none in 64 bits at all). The reduction grid is capped at a
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
#include "cuda/common.cuh"

namespace fastnn::cuda {
namespace {

using bce::Operand;

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 2048;  // grid-stride beyond: enough to fill any current GPU

__device__ __forceinline__ float exp_(float x) { return __expf(x); }
__device__ __forceinline__ double exp_(double x) { return ::exp(x); }
__device__ __forceinline__ float log1p_(float x) { return ::log1pf(x); }
__device__ __forceinline__ double log1p_(double x) { return ::log1p(x); }

// A Broadcast operand's digits (the flat index in its right-aligned dims) and so its offsets, along a grid-stride
// loop: set once from the thread's first index, then advanced by adding the loop's step digit by digit with one carry
// each (a digit and a step digit are both below the dim's size). Both indices are below 2**32, so the divisions that
// split them are 32-bit (a dim of more elements holds the index whole); a 64-bit division is a subroutine call, whose
// stack frame and spills land in every kernel that has one. The outermost digit is never reduced: past the end it
// only grows, and no element past the end is read. Absent (data == nullptr): reads as 1.
template <typename T> struct OperandWalk {
  static constexpr int D = Broadcast::kMaxDims;
  int64_t digit[D];

  // The operand's geometry is read from the kernel's parameter (o), never copied: copies took registers.
  __device__ static void split(const Broadcast& b, uint32_t i, int64_t (&out)[D]) {
#pragma unroll
    for (int k = D - 1; k > 0; --k) {
      const bool small = b.size[k] <= int64_t(UINT32_MAX);
      out[k] = small ? i % uint32_t(b.size[k]) : i;
      i = small ? i / uint32_t(b.size[k]) : 0;
    }
    out[0] = i;
  }
  __device__ OperandWalk(const Operand<T>& o, uint32_t first) { split(o.b, first, digit); }
  __device__ static int64_t offset(const Broadcast& b, const int64_t (&dg)[D]) {
    int64_t off = 0;
#pragma unroll
    for (int k = 0; k < D; ++k) off += dg[k] * b.stride[k];
    return off;
  }
  // dg += add (digits below the sizes), carrying from the innermost dim outwards.
  __device__ static void carry_add(const Broadcast& b, int64_t (&dg)[D], const int64_t (&add)[D]) {
#pragma unroll
    for (int k = D - 1; k > 0; --k) {
      dg[k] += add[k];
      if (dg[k] >= b.size[k]) {
        dg[k] -= b.size[k];
        dg[k - 1] += 1;
      }
    }
    dg[0] += add[0];
  }
  // dg += 1.
  __device__ static void increment(const Broadcast& b, int64_t (&dg)[D]) {
    dg[D - 1] += 1;
#pragma unroll
    for (int k = D - 1; k > 0; --k) {
      if (dg[k] >= b.size[k]) {
        dg[k] -= b.size[k];
        dg[k - 1] += 1;
      }
    }
  }
  // Advances by the loop's step, split once per thread (step_digits).
  __device__ void next(const Operand<T>& o, const int64_t (&step)[D]) {
    if (o.data != nullptr) carry_add(o.b, digit, step);
  }
  // The values of the `count` (<= N) elements from the current index, 1 past them. One run of the innermost dim
  // (contiguous or one repeated value) holds them all unless they cross its end: then element by element.
  template <typename A, int N> __device__ void read(const Operand<T>& o, A (&v)[N], int64_t count) const {
    if (o.data == nullptr) {
#pragma unroll
      for (int j = 0; j < N; ++j) v[j] = A(1);
      return;
    }
    const Broadcast& b = o.b;
    if (digit[D - 1] + N <= b.size[D - 1]) {
      const T* p = o.data + offset(b, digit);
      const int64_t st = b.stride[D - 1];
#pragma unroll
      for (int j = 0; j < N; ++j) v[j] = j < count ? static_cast<A>(p[j * st]) : A(1);
      return;
    }
    int64_t dg[D];
#pragma unroll
    for (int k = 0; k < D; ++k) dg[k] = digit[k];
#pragma unroll
    for (int j = 0; j < N; ++j) {
      v[j] = j < count ? static_cast<A>(o.data[offset(b, dg)]) : A(1);
      increment(b, dg);
    }
  }
};

// The slots of a grid-stride loop: this thread's first, the loop's step (both below 2**32: the grid is capped).
__device__ __forceinline__ uint32_t first_slot() { return blockIdx.x * kThreads + threadIdx.x; }
__device__ __forceinline__ uint32_t slot_step() { return gridDim.x * kThreads; }

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
                                                           at::opmath_type<T>* __restrict__ partial, int64_t n,
                                                           bool vec) {
  using A = at::opmath_type<T>;
  constexpr int N = kVec<T>;
  const int64_t slots = ceil_div(n, N);
  const uint32_t first = first_slot() * N;
  int64_t step_w[OperandWalk<T>::D], step_pw[OperandWalk<T>::D];
  OperandWalk<T>::split(w.b, slot_step() * N, step_w);
  OperandWalk<T>::split(pw.b, slot_step() * N, step_pw);
  OperandWalk<T> ww(w, first), pww(pw, first);
  A acc = 0;
  for (int64_t s = first_slot(); s < slots; s += slot_step(), ww.next(w, step_w), pww.next(pw, step_pw)) {
    const int64_t count = n - s * N;  // elements of this slot inside the tensor: N but at the end
    A xv[N], yv[N], wv[N], pwv[N];
    widen(load_slot(x, s, n, vec, T(0)), xv);
    widen(load_slot(y, s, n, vec, T(0)), yv);
    ww.read(w, wv, count);
    pww.read(pw, pwv, count);
    Vec<T, N> o;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const A sp = softplus_neg(xv[j], exp_(-::abs(xv[j])));
      const A loss = ((A(1) - yv[j]) * xv[j] + (A(1) + (pwv[j] - A(1)) * yv[j]) * sp) * wv[j];
      if constexpr (REDUCE) acc += j < count ? loss : A(0);
      else o.v[j] = static_cast<T>(loss);
    }
    if constexpr (!REDUCE) store_slot(out, s, n, vec, o);
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

// At least 2 blocks an SM (at most 128 registers): without this bound ptxas 13.0 stopped the sm_80
// input-gradient-only float kernel at 80 registers and spilled.
template <typename T, bool DX, bool DY>
__global__ void __launch_bounds__(kThreads, 2) bce_bwd_kernel(const T* __restrict__ x, const T* __restrict__ y,
                                                           Operand<T> w, Operand<T> pw, Operand<T> g,
                                                           at::opmath_type<T> scale, bool has_pw,
                                                           T* __restrict__ dx, T* __restrict__ dy, int64_t n,
                                                           bool vec) {
  using A = at::opmath_type<T>;
  constexpr int N = kVec<T>;
  const int64_t slots = ceil_div(n, N);
  const uint32_t first = first_slot() * N;
  int64_t step_w[OperandWalk<T>::D], step_pw[OperandWalk<T>::D], step_g[OperandWalk<T>::D];
  OperandWalk<T>::split(w.b, slot_step() * N, step_w);
  OperandWalk<T>::split(pw.b, slot_step() * N, step_pw);
  OperandWalk<T>::split(g.b, slot_step() * N, step_g);
  OperandWalk<T> ww(w, first), pww(pw, first), gw(g, first);
  for (int64_t s = first_slot(); s < slots;
       s += slot_step(), ww.next(w, step_w), pww.next(pw, step_pw), gw.next(g, step_g)) {
    const int64_t count = n - s * N;
    A xv[N], yv[N], wv[N], pwv[N], gv[N];
    widen(load_slot(x, s, n, vec, T(0)), xv);
    widen(load_slot(y, s, n, vec, T(0)), yv);
    ww.read(w, wv, count);
    pww.read(pw, pwv, count);
    gw.read(g, gv, count);
    Vec<T, N> ox, oy;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const A wg = wv[j] * gv[j] * scale;
      const A e = exp_(-::abs(xv[j]));
      if constexpr (DX) {
        const A sig = (xv[j] >= A(0) ? A(1) : e) / (A(1) + e);
        ox.v[j] = static_cast<T>(((A(1) + (pwv[j] - A(1)) * yv[j]) * sig - pwv[j] * yv[j]) * wg);
      }
      if constexpr (DY) {
        // Without pos_weight d/dy is -x exactly (no 0 * inf at x = -inf).
        const A d = has_pw ? (pwv[j] - A(1)) * softplus_neg(xv[j], e) - xv[j] : -xv[j];
        oy.v[j] = static_cast<T>(d * wg);
      }
    }
    if constexpr (DX) store_slot(dx, s, n, vec, ox);
    if constexpr (DY) store_slot(dy, s, n, vec, oy);
  }
}

// Blocks for n elements: a thread a slot, up to kMaxBlocks (which keeps the loop's indices below 2**32).
template <typename T> int grid_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>(kMaxBlocks, ceil_div(ceil_div(n, kVec<T>), kThreads)));
}

at::Tensor bce_with_logits_fwd_cuda(const at::Tensor& input, const at::Tensor& target,
                                    const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
  bce::check_args(input, target, weight, pos_weight, reduction);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous(), y = target.contiguous();
  const int64_t n = x.numel();
  at::Tensor out = bce::fwd_output(x, reduction);
  if (n == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bce_with_logits_fwd_cuda", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const int blocks = grid_for<T>(n);
    const bce::Operands<T> o(x, weight, pos_weight);
    const T *xp = x.const_data_ptr<T>(), *yp = y.const_data_ptr<T>();
    const bool vec = n % kVec<T> == 0 && aligned16(xp) && aligned16(yp) &&
                     (reduction != at::Reduction::None || aligned16(out.const_data_ptr()));
    if (reduction == at::Reduction::None) {
      bce_fwd_kernel<T, false><<<blocks, kThreads, 0, stream>>>(xp, yp, o.w, o.pw, out.mutable_data_ptr<T>(),
                                                                nullptr, n, vec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    at::Tensor partial = at::empty({blocks}, x.options().dtype(c10::CppTypeToScalarType<A>::value));
    A* pp = partial.mutable_data_ptr<A>();
    bce_fwd_kernel<T, true><<<blocks, kThreads, 0, stream>>>(xp, yp, o.w, o.pw, nullptr, pp, n, vec);
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
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bce_with_logits_bwd_cuda", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const int blocks = grid_for<T>(n);
    const bce::Operands<T> o(x, weight, pos_weight, grad_output);
    const A scale = bce::grad_scale<A>(reduction, n);
    const T *xp = x.const_data_ptr<T>(), *yp = y.const_data_ptr<T>();
    T* dxp = input_grad ? dx.mutable_data_ptr<T>() : nullptr;
    T* dyp = target_grad ? dy.mutable_data_ptr<T>() : nullptr;
    const bool vec = n % kVec<T> == 0 && aligned16(xp) && aligned16(yp) && aligned16(dxp) && aligned16(dyp);
    auto go = [&](auto kernel) {
      kernel<<<blocks, kThreads, 0, stream>>>(xp, yp, o.w, o.pw, o.g, scale, o.has_pw, dxp, dyp, n, vec);
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
