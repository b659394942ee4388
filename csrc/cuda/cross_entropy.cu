// Fused softmax cross-entropy on CUDA (formulas in csrc/cross_entropy.h); linear + cross-entropy runs the same rows
// on its chunks' logits (csrc/cuda/cross_entropy_rows.cuh).
//
// One thread block per row (an (n, d1, ...) position; classes `inner` apart, coalesced when inner == 1). Forward:
// a single read of the row, each thread keeping an online max / rescaled sum of exp plus the weighted offsets
// that smoothing and probability targets need, combined by block reductions; it writes only the loss and the
// row's statistics (max, log of the sum of exp). Backward: one more read of the row (two for probability targets:
// their weighted sum first), writing the gradient, possibly over the logits (inplace). Out-of-range class indices
// are never used as addresses: the read is clamped, the row's loss is NaN, and the index lands in a device flag
// that the host checks after the launch (one sync) and reports as an IndexError.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "common.h"
#include "cross_entropy.h"
#include "cuda/common.cuh"
#include "cuda/cross_entropy_rows.cuh"

namespace fastnn::cuda {
namespace {

constexpr int kThreads = 512;

struct RowArgs {
  int64_t classes, inner, ignore_index;
  double eps;
};

__device__ __forceinline__ int64_t row_base(int64_t row, const RowArgs& a) {
  return (row / a.inner) * a.classes * a.inner + row % a.inner;
}

// PROB: target holds probabilities (T); else int64 indices. D: accumulate the weighted offsets (smoothing or PROB).
template <typename T, bool PROB, bool D>
__global__ void __launch_bounds__(kThreads) ce_fwd_kernel(const T* __restrict__ x, const void* __restrict__ target,
                                                          const T* __restrict__ w, const acc_t<T>* __restrict__ wsum,
                                                          acc_t<T>* __restrict__ loss, acc_t<T>* __restrict__ stat_m,
                                                          acc_t<T>* __restrict__ stat_ls,
                                                          int64_t* __restrict__ flag, RowArgs a) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x;
  const int64_t base = row_base(row, a), C = a.classes, st = a.inner;
  int64_t t = 0;
  bool ignored = false, bad = false;
  if constexpr (!PROB) {
    t = static_cast<const int64_t*>(target)[row];
    ignored = t == a.ignore_index;
    bad = !ignored && (t < 0 || t >= C);
    if (ignored) {  // the whole block takes this branch together
      if (threadIdx.x == 0) loss[row] = stat_m[row] = stat_ls[row] = A(0);
      return;
    }
    if (bad) {
      if (threadIdx.x == 0) {
        flag[1] = t;  // any one bad index will do for the message
        flag[0] = 1;
        loss[row] = stat_m[row] = stat_ls[row] = NAN;
      }
      return;
    }
  }
  const A keep = A(1) - A(a.eps), add = A(a.eps) / A(C);
  // Weighted sums of x as offsets from this thread's running max, rebased when it grows (as the sum of exp is):
  // no term is positive, so rows of large logits lose no precision and overflow only where the loss does.
  LogSumExp<A> stat = LogSumExp<A>::empty();
  A d = 0, u = 0;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    const A v = static_cast<A>(x[base + c * st]);
    const A one[1] = {v};
    const A m_old = stat.m;
    stat.add(one);
    if constexpr (D) {
      A wu = w ? static_cast<A>(w[c]) : A(1);
      // Smoothing's class share eps / C inside the sum: sum w (x - m) alone can overflow where the loss fits.
      wu *= PROB ? static_cast<A>(static_cast<const T*>(target)[base + c * st]) * keep + add : add;
      if (m_old > neg_inf<A>()) d += u * (m_old - stat.m);
      d += wu * (v - (stat.m == neg_inf<A>() ? A(0) : stat.m));  // at -inf: w x = -inf, the loss is inf
      u += wu;
    }
  }
  const A m_thread = stat.m;
  stat = block_reduce(stat, MergeOp{});
  const A M = stat.m, log_s = log_(stat.s);
  if constexpr (D) d = m_thread > neg_inf<A>() ? d + u * (m_thread - M) : d;
  A l;
  if constexpr (PROB) {
    const A U = block_reduce(u, SumOp{}), Dv = block_reduce(d, SumOp{});
    l = U * log_s - Dv;
  } else {
    const A wt = w ? static_cast<A>(w[t]) : A(1);
    l = keep * wt * ((M - static_cast<A>(x[base + t * st])) + log_s);
    if constexpr (D) {
      const A Dv = block_reduce(d, SumOp{});
      l += add * (w ? *wsum : A(C)) * log_s - Dv;
    }
  }
  if (threadIdx.x == 0) {
    loss[row] = l;
    stat_m[row] = M;
    stat_ls[row] = log_s;
  }
}

template <typename T, bool PROB>
__global__ void __launch_bounds__(kThreads) ce_bwd_kernel(const acc_t<T>* __restrict__ grad, const T* x,
                                                          const void* __restrict__ target, const T* __restrict__ w,
                                                          const acc_t<T>* __restrict__ wsum,
                                                          const acc_t<T>* __restrict__ stat_m,
                                                          const acc_t<T>* __restrict__ stat_ls, T* dx, RowArgs a) {
  // x and dx may alias (inplace): each element is read before it is written, by the same thread.
  using A = acc_t<T>;
  const int64_t row = blockIdx.x;
  const int64_t base = row_base(row, a), C = a.classes, st = a.inner;
  const A g = grad[row], m = stat_m[row], ls = stat_ls[row];
  const A keep = A(1) - A(a.eps), add = A(a.eps) / A(C);
  const T* y = static_cast<const T*>(target);
  if constexpr (PROB) {
    A u = 0;
    for (int64_t c = threadIdx.x; c < C; c += kThreads)
      u += (static_cast<A>(y[base + c * st]) * keep + add) * (w ? static_cast<A>(w[c]) : A(1));
    const A ga = g * block_reduce(u, SumOp{});
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      const A wu = (static_cast<A>(y[base + c * st]) * keep + add) * (w ? static_cast<A>(w[c]) : A(1));
      dx[base + c * st] = static_cast<T>(ga * exp_((static_cast<A>(x[base + c * st]) - m) - ls) - g * wu);
    }
  } else {
    const int64_t t = static_cast<const int64_t*>(target)[row];
    if (t == a.ignore_index || t < 0 || t >= C) {
      for (int64_t c = threadIdx.x; c < C; c += kThreads) dx[base + c * st] = T(0);
      return;
    }
    const A wt = w ? static_cast<A>(w[t]) : A(1);
    const A ga = g * (keep * wt + add * (w ? *wsum : A(C))), gb = g * add, gt = g * keep * wt;
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      const A p = exp_((static_cast<A>(x[base + c * st]) - m) - ls), wc = w ? static_cast<A>(w[c]) : A(1);
      // The target's entry with p_t - 1 (exact near 1: a confident row gets 0, as in torch; see the CPU kernel).
      const A v = c == t ? gt * (p - A(1)) + gb * ((w ? *wsum : A(C)) * p - wc) : ga * p - gb * wc;
      dx[base + c * st] = static_cast<T>(v);
    }
  }
}

// The class weights as the kernels read them: contiguous, with their sum on the device (no sync); null pointers
// without weights.
struct DeviceWeights {
  at::Tensor w, sum;
  DeviceWeights(const std::optional<at::Tensor>& weight, at::ScalarType x_type) {
    if (!weight.has_value()) return;
    w = weight->contiguous();
    sum = weight->sum(ce_acc_type(x_type));
  }
  template <typename T> const T* data() const { return w.defined() ? w.const_data_ptr<T>() : nullptr; }
  template <typename A> const A* sum_data() const { return sum.defined() ? sum.const_data_ptr<A>() : nullptr; }
};

RowArgs row_args(const CeGeometry& g, int64_t ignore_index, double eps) {
  return RowArgs{g.classes, g.inner, ignore_index, eps};
}

}  // namespace

void ce_fwd_rows(const at::Tensor& x, const at::Tensor& t, const std::optional<at::Tensor>& w, const CeGeometry& g,
                 int64_t ignore_index, double eps, at::Tensor& loss, at::Tensor& stats, at::Tensor& flag) {
  if (g.rows() == 0) return;
  const bool prob = t.is_floating_point();
  const DeviceWeights dw(w, x.scalar_type());
  const RowArgs a = row_args(g, ignore_index, eps);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_entropy_fwd_cuda", [&] {
    using A = acc_t<scalar_t>;
    auto go = [&](auto kernel) {
      kernel<<<g.rows(), kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(), t.const_data_ptr(),
                                                dw.data<scalar_t>(), dw.sum_data<A>(), loss.mutable_data_ptr<A>(),
                                                stat_plane<A>(stats, 0), stat_plane<A>(stats, 1),
                                                flag.mutable_data_ptr<int64_t>(), a);
    };
    if (prob) go(ce_fwd_kernel<scalar_t, true, true>);
    else if (eps > 0) go(ce_fwd_kernel<scalar_t, false, true>);
    else go(ce_fwd_kernel<scalar_t, false, false>);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void ce_bwd_rows(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t,
                 const std::optional<at::Tensor>& w, const at::Tensor& stats, const CeGeometry& g, int64_t ignore_index,
                 double eps, at::Tensor& dx) {
  if (g.rows() == 0 || g.classes == 0) return;
  const DeviceWeights dw(w, x.scalar_type());
  const RowArgs a = row_args(g, ignore_index, eps);
  const at::Tensor gc = grad.contiguous(), st = stats.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_entropy_bwd_cuda", [&] {
    using A = acc_t<scalar_t>;
    auto go = [&](auto kernel) {
      kernel<<<g.rows(), kThreads, 0, stream>>>(gc.const_data_ptr<A>(), x.const_data_ptr<scalar_t>(),
                                                t.const_data_ptr(), dw.data<scalar_t>(), dw.sum_data<A>(),
                                                stat_plane<const A>(st, 0), stat_plane<const A>(st, 1),
                                                dx.mutable_data_ptr<scalar_t>(), a);
    };
    if (t.is_floating_point()) go(ce_bwd_kernel<scalar_t, true>);
    else go(ce_bwd_kernel<scalar_t, false>);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor new_flag(const at::Tensor& x) { return at::zeros({2}, x.options().dtype(at::kLong)); }

void report_bad_target(const at::Tensor& flag, int64_t classes, int64_t ignore_index) {
  const at::Tensor f = flag.cpu();  // the one sync: an out-of-range index must not pass silently
  const int64_t* p = f.const_data_ptr<int64_t>();
  TORCH_CHECK_INDEX(p[0] == 0, "cross_entropy: target ", p[1], " is out of bounds: expected a class index in [0, ",
                    classes - 1, "] or ignore_index (", ignore_index, ")");
}

namespace {

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cuda(const at::Tensor& input, const at::Tensor& target,
                                                          const std::optional<at::Tensor>& weight,
                                                          int64_t ignore_index, double label_smoothing, bool) {
  bool prob = false;
  const CeGeometry g = check_ce_args(input, target, weight, label_smoothing, prob);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous(), t = target.contiguous();
  at::Tensor loss, stats;
  std::tie(loss, stats) = ce_fwd_outputs(x, g);
  if (g.rows() == 0) return {loss, stats};
  at::Tensor flag = new_flag(x);
  ce_fwd_rows(x, t, weight, g, ignore_index, label_smoothing, loss, stats, flag);
  if (!prob) report_bad_target(flag, g.classes, ignore_index);
  return {loss, stats};
}

at::Tensor cross_entropy_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight, const at::Tensor& stats,
                                  int64_t ignore_index, double label_smoothing) {
  bool prob = false;
  const CeGeometry g = check_ce_args(input, target, weight, label_smoothing, prob);
  check_ce_bwd_args(grad_loss, stats, g, input);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  ce_bwd_rows(grad_loss, x, target.contiguous(), weight, stats, g, ignore_index, label_smoothing, dx);
  return dx;
}

void cross_entropy_bwd_inplace_cuda(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                                    const std::optional<at::Tensor>& weight, const at::Tensor& stats,
                                    int64_t ignore_index, double label_smoothing) {
  TORCH_CHECK(input.is_contiguous(), "cross_entropy_bwd_inplace: input must be contiguous");
  bool prob = false;
  const CeGeometry g = check_ce_args(input, target, weight, label_smoothing, prob);
  check_ce_bwd_args(grad_loss, stats, g, input);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor dx = input;
  ce_bwd_rows(grad_loss, input, target.contiguous(), weight, stats, g, ignore_index, label_smoothing, dx);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnn, CUDA, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cuda);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cuda);
  m.impl("cross_entropy_bwd_inplace", &cross_entropy_bwd_inplace_cuda);
}

}  // namespace fastnn::cuda
