// LSTM on CUDA: the fused cell (forward and backward) and the whole recurrence of one layer, as on the CPU
// (csrc/cpu/lstm.cpp, which explains the design). One thread per (batch row, hidden unit) reads that unit's
// four gates; a step is one read of gates and c and one write of h', c' and the activated gates, so the kernel
// is bound by memory bandwidth. The layer op issues, per step, one cuBLAS addmm into the step's slice of the
// gate buffer and one cell launch that activates it in place - no host synchronization, no allocation.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "common.h"
#include "cuda/common.cuh"
#include "lstm.h"

namespace fastnn::cuda {
namespace {

constexpr int kThreads = 256;

template <typename A> __device__ __forceinline__ A sigmoid_(A x) { return A(1) / (A(1) + exp_(-x)); }

// `len` null: every row is active; otherwise row r runs while t < len[r] and keeps its state after.
__device__ __forceinline__ bool active(const int64_t* len, int64_t t, int64_t r) { return len == nullptr || t < len[r]; }

// pre may alias act (the layer activates its gate buffer in place): every thread reads its four gates before
// writing them. hp (the previous h) is read only for inactive rows.
template <typename T>
__global__ void cell_fwd_kernel(const T* pre, const T* __restrict__ bias, const T* __restrict__ cp,
                                const T* __restrict__ hp, T* act, T* __restrict__ c, T* __restrict__ h, int64_t B,
                                int64_t H, const int64_t* __restrict__ len, int64_t t) {
  using A = acc_t<T>;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < B * H;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = idx / H, j = idx - r * H;
    if (!active(len, t, r)) {
      c[idx] = cp[idx];
      h[idx] = hp[idx];
      continue;
    }
    const int64_t g0 = r * 4 * H + j;
    A z[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) z[k] = A(pre[g0 + k * H]) + (bias ? A(bias[j + k * H]) : A(0));
    const A i = sigmoid_(z[0]), f = sigmoid_(z[1]), g = tanh(z[2]), o = sigmoid_(z[3]);
    const A cn = f * A(cp[idx]) + i * g;
    act[g0] = T(i);
    act[g0 + H] = T(f);
    act[g0 + 2 * H] = T(g);
    act[g0 + 3 * H] = T(o);
    c[idx] = T(cn);
    h[idx] = T(o * tanh(cn));
  }
}

// dh + dh2 and dc + dc2 are the incoming gradients (dh2, dc2 may be null); dcp may alias dc2. Inactive rows
// (the layer with lengths) hand their gradients through: dgates 0, dcp = dc, pass = dh.
template <typename T>
__global__ void cell_bwd_kernel(const T* __restrict__ dh, const T* __restrict__ dh2, const T* __restrict__ dc,
                                const T* dc2, const T* __restrict__ act, const T* __restrict__ cp,
                                T* __restrict__ dgates, T* dcp, T* __restrict__ pass, int64_t B, int64_t H,
                                const int64_t* __restrict__ len, int64_t t) {
  using A = acc_t<T>;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < B * H;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = idx / H, j = idx - r * H, g0 = r * 4 * H + j;
    A gh = A(dh[idx]) + (dh2 ? A(dh2[idx]) : A(0));
    A gc = A(dc[idx]) + (dc2 ? A(dc2[idx]) : A(0));
    if (!active(len, t, r)) {
#pragma unroll
      for (int k = 0; k < 4; ++k) dgates[g0 + k * H] = T(0);
      dcp[idx] = T(gc);
      pass[idx] = T(gh);
      continue;
    }
    const A i = A(act[g0]), f = A(act[g0 + H]), g = A(act[g0 + 2 * H]), o = A(act[g0 + 3 * H]);
    const A c0 = A(cp[idx]);
    const A tc = tanh(f * c0 + i * g);
    gc += gh * o * (A(1) - tc * tc);
    dgates[g0] = T(gc * g * i * (A(1) - i));
    dgates[g0 + H] = T(gc * c0 * f * (A(1) - f));
    dgates[g0 + 2 * H] = T(gc * i * (A(1) - g * g));
    dgates[g0 + 3 * H] = T(gh * tc * o * (A(1) - o));
    dcp[idx] = T(gc * f);
    if (pass) pass[idx] = T(0);
  }
}

// Enough blocks to fill any current GPU several times over; the kernels' grid-stride loops cover the rest.
unsigned blocks_for(int64_t n) { return unsigned(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, kThreads), 8192))); }

template <typename T> const T* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<T>() : nullptr; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_fwd_cuda(const at::Tensor& gates_,
                                                                  const std::optional<at::Tensor>& bias_,
                                                                  const at::Tensor& cx_) {
  check_lstm_cell(gates_, cx_, "gates");
  const at::Tensor bias = checked_lstm_bias(bias_, gates_, cx_.size(1));
  const c10::cuda::CUDAGuard guard(cx_.device());
  const int64_t B = cx_.size(0), H = cx_.size(1);
  const at::Tensor gates = gates_.contiguous(), cx = cx_.contiguous();
  at::Tensor hy = at::empty({B, H}, cx.options()), cy = at::empty({B, H}, cx.options());
  at::Tensor act = at::empty({B, 4 * H}, cx.options());
  if (B * H == 0) return {hy, cy, act};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cx.scalar_type(), "lstm_cell_fwd_cuda", [&] {
    cell_fwd_kernel<scalar_t><<<blocks_for(B * H), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        gates.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(bias), cx.const_data_ptr<scalar_t>(), nullptr,
        act.mutable_data_ptr<scalar_t>(), cy.mutable_data_ptr<scalar_t>(), hy.mutable_data_ptr<scalar_t>(), B, H,
        nullptr, 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {hy, cy, act};
}

std::tuple<at::Tensor, at::Tensor> lstm_cell_bwd_cuda(const at::Tensor& grad_hy_, const at::Tensor& grad_cy_,
                                                      const at::Tensor& act_, const at::Tensor& cx_) {
  check_lstm_cell(act_, cx_, "act");
  check_same(grad_hy_, "grad_hy", cx_, "cx");
  check_same(grad_cy_, "grad_cy", cx_, "cx");
  const c10::cuda::CUDAGuard guard(cx_.device());
  const int64_t B = cx_.size(0), H = cx_.size(1);
  const at::Tensor dh = grad_hy_.contiguous(), dc = grad_cy_.contiguous(), act = act_.contiguous();
  const at::Tensor cx = cx_.contiguous();
  at::Tensor dgates = at::empty({B, 4 * H}, cx.options()), dcx = at::empty({B, H}, cx.options());
  if (B * H == 0) return {dgates, dcx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cx.scalar_type(), "lstm_cell_bwd_cuda", [&] {
    cell_bwd_kernel<scalar_t><<<blocks_for(B * H), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        dh.const_data_ptr<scalar_t>(), nullptr, dc.const_data_ptr<scalar_t>(), nullptr,
        act.const_data_ptr<scalar_t>(), cx.const_data_ptr<scalar_t>(), dgates.mutable_data_ptr<scalar_t>(),
        dcx.mutable_data_ptr<scalar_t>(), nullptr, B, H, nullptr, 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dgates, dcx};
}

// lengths arrive on the CPU (checked there); the kernels read a device copy.
at::Tensor device_lengths(const LstmLayerGeometry& geo, const at::Tensor& host, const at::Device& dev) {
  return geo.len ? host.to(dev, /*non_blocking=*/false) : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_fwd_cuda(
    const at::Tensor& x_, const at::Tensor& w_ih, const std::optional<at::Tensor>& bias_, const at::Tensor& w_hh,
    const at::Tensor& h0_, const at::Tensor& c0_, const std::optional<at::Tensor>& lengths, bool reverse) {
  at::Tensor len_host;
  const LstmLayerGeometry geo = check_lstm_layer(x_, "x", w_hh, c0_, lengths, len_host, x_.size(-1));
  const at::Tensor bias = check_lstm_layer_input(x_, w_ih, bias_, w_hh);
  check_same(h0_, "h0", c0_, "c0");
  const c10::cuda::CUDAGuard guard(x_.device());
  const int64_t T = geo.T, B = geo.B, H = geo.H;
  const at::Tensor w_hh_t = w_hh.t(), h0 = h0_.contiguous(), c0 = c0_.contiguous();
  const at::Tensor len = device_lengths(geo, len_host, x_.device());
  at::Tensor hs = at::empty({T, B, H}, x_.options()), cs = at::empty({T, B, H}, x_.options());
  at::Tensor act = at::empty({T, B, 4 * H}, x_.options());
  if (T * B * H == 0) return {hs, cs, act};
  // All steps' input products in one GEMM straight into the gate buffer; each step adds h W_hh^T in place.
  const at::Tensor x2 = x_.reshape({T * B, x_.size(2)});
  at::Tensor act2 = act.view({T * B, 4 * H});
  if (bias.defined()) at::addmm_out(act2, bias, x2, w_ih.t());
  else at::mm_out(act2, x2, w_ih.t());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, act.scalar_type(), "lstm_layer_fwd_cuda", [&] {
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = reverse ? T - 1 - s : s, tp = reverse ? t + 1 : t - 1;
      const at::Tensor h_prev = s == 0 ? h0 : hs.select(0, tp), c_prev = s == 0 ? c0 : cs.select(0, tp);
      at::Tensor act_t = act.select(0, t);
      act_t.addmm_(h_prev, w_hh_t);
      cell_fwd_kernel<scalar_t><<<blocks_for(B * H), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          act_t.const_data_ptr<scalar_t>(), nullptr, c_prev.const_data_ptr<scalar_t>(),
          h_prev.const_data_ptr<scalar_t>(), act_t.mutable_data_ptr<scalar_t>(),
          cs.mutable_data_ptr<scalar_t>() + t * B * H, hs.mutable_data_ptr<scalar_t>() + t * B * H, B, H,
          ptr_or_null<int64_t>(len), t);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {hs, cs, act};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd_cuda(
    const at::Tensor& grad_hs_, const at::Tensor& grad_cs_, const at::Tensor& w_hh_, const at::Tensor& c0_,
    const at::Tensor& cs_, const at::Tensor& act_, const std::optional<at::Tensor>& lengths, bool reverse) {
  at::Tensor len_host;
  const LstmLayerGeometry geo = check_lstm_layer(act_, "act", w_hh_, c0_, lengths, len_host);
  check_lstm_layer_grads(geo, grad_hs_, grad_cs_, cs_, act_);
  const c10::cuda::CUDAGuard guard(act_.device());
  const int64_t T = geo.T, B = geo.B, H = geo.H;
  const at::Tensor dhs = grad_hs_.contiguous(), dcs = grad_cs_.contiguous(), w_hh = w_hh_.contiguous();
  const at::Tensor c0 = c0_.contiguous(), cs = cs_.contiguous(), act = act_.contiguous();
  const at::Tensor len = device_lengths(geo, len_host, act.device());
  at::Tensor dgx = at::empty({T, B, 4 * H}, act.options());
  at::Tensor dh = at::zeros({B, H}, act.options()), dc = at::zeros({B, H}, act.options());
  at::Tensor pass = geo.len ? at::zeros({B, H}, act.options()) : at::Tensor();
  if (T * B * H == 0) return {dgx.zero_(), dh, dc};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, act.scalar_type(), "lstm_layer_bwd_cuda", [&] {
    for (int64_t s = T - 1; s >= 0; --s) {
      const int64_t t = reverse ? T - 1 - s : s, tp = reverse ? t + 1 : t - 1;
      const scalar_t* cp = s == 0 ? c0.const_data_ptr<scalar_t>() : cs.const_data_ptr<scalar_t>() + tp * B * H;
      at::Tensor dg_t = dgx.select(0, t);
      cell_bwd_kernel<scalar_t><<<blocks_for(B * H), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          dhs.const_data_ptr<scalar_t>() + t * B * H, dh.const_data_ptr<scalar_t>(),
          dcs.const_data_ptr<scalar_t>() + t * B * H, dc.const_data_ptr<scalar_t>(),
          act.const_data_ptr<scalar_t>() + t * B * 4 * H, cp, dg_t.mutable_data_ptr<scalar_t>(),
          dc.mutable_data_ptr<scalar_t>(), pass.defined() ? pass.mutable_data_ptr<scalar_t>() : nullptr, B, H,
          ptr_or_null<int64_t>(len), t);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (pass.defined()) at::addmm_out(dh, pass, dg_t, w_hh);
      else at::mm_out(dh, dg_t, w_hh);
    }
  });
  return {dgx, dh, dc};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnn, CUDA, m) {
  m.impl("lstm_cell_fwd", &lstm_cell_fwd_cuda);
  m.impl("lstm_cell_bwd", &lstm_cell_bwd_cuda);
  m.impl("lstm_layer_fwd", &lstm_layer_fwd_cuda);
  m.impl("lstm_layer_bwd", &lstm_layer_bwd_cuda);
}

}  // namespace fastnn::cuda
