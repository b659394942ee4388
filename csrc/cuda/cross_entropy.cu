// Fused softmax cross-entropy on CUDA (formulas in csrc/cross_entropy.h); linear + cross-entropy runs the same rows
// on its chunks' logits (csrc/cuda/cross_entropy_rows.cuh).
//
// One thread block per row (an (n, d1, ...) position; classes `inner` apart, coalesced when inner == 1), rows
// visited by a grid-stride loop (a grid holds fewer than 2**31 blocks; the row count is 64-bit). Forward: a single
// read of the row, each thread keeping an online max / rescaled sum of exp plus the weighted offsets that smoothing
// and probability targets need, combined by block reductions; it writes only the loss and the row's statistics
// (max, log of the sum of exp). Backward: one more read of the row (two for probability targets: their weighted
// sum first), writing the gradient, possibly over the logits (inplace: a kernel without __restrict__ on the logits
// and the gradient; otherwise both are restrict-qualified, so loads need not wait for earlier stores). Forward with
// the gradient (cross_entropy_fwd_grad): both, row by row in one kernel, the second read from L2. Rows of the
// last dim whose start is 16-byte aligned (aligned data, C a multiple of the vector width) are read and written in
// 16-byte slots. Out-of-range class indices are never used as addresses: the read is clamped, the row's loss is
// NaN, and the index lands in a device flag that the host checks after the launch (one sync) and reports as an
// IndexError.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <initializer_list>
#include <optional>

#include "common.h"
#include "cross_entropy.h"
#include "cuda/common.cuh"
#include "cuda/cross_entropy_rows.cuh"

namespace fastnn::cuda {
namespace {

constexpr int kThreads = 512;

struct RowArgs {
  int64_t rows, classes, inner, ignore_index;
  double eps;
  bool vec;  // inner == 1 and every row 16-byte aligned in x (and in the probabilities / dx it is read or written with)
};

// The rows of a grid-stride loop (blockIdx.x, then every gridDim.x-th) as (outer, inner) indices, advanced without
// a division per row. The divisions of block indices (below 2**31) by inner are 32-bit (an inner past 2**32 exceeds
// them: quotient 0): a 64-bit division is a subroutine call, around which ptxas spills the registers live there.
struct RowWalk {
  int64_t row, o, i, step_o, step_i, inner, outer_stride;
  __device__ static void divmod(unsigned v, int64_t d, int64_t& q, int64_t& r) {
    const bool small = d <= int64_t(UINT_MAX);
    q = small ? v / unsigned(d) : 0;
    r = small ? v % unsigned(d) : v;
  }
  __device__ explicit RowWalk(const RowArgs& a) : row(blockIdx.x), inner(a.inner), outer_stride(a.classes * a.inner) {
    divmod(blockIdx.x, inner, o, i);
    divmod(gridDim.x, inner, step_o, step_i);
  }
  __device__ int64_t base() const { return o * outer_stride + i; }  // the row's class 0
  __device__ void next() {
    row += gridDim.x;
    o += step_o;
    i += step_i;  // both below inner: one wrap at most
    if (i >= inner) {
      i -= inner;
      ++o;
    }
  }
};

// Label smoothing's shares, 1 - eps and eps / C, computed once a kernel: the division is a subroutine call, around
// which ptxas would spill the registers live in a row loop.
template <typename A> struct Smoothing {
  A keep, add;
  __device__ explicit Smoothing(const RowArgs& a) : keep(A(1) - A(a.eps)), add(A(a.eps) / A(a.classes)) {}
};

// K values of a row added to the forward's accumulators: the log-sum-exp, and (D) the sum d of wu (x - m) as offsets
// from the running max m, rebased when it grows (as the sum of exp is): no term is positive, so rows of large logits
// lose no precision and overflow only where the loss does; u is the sum of the weights wu.
template <bool D, typename A, int K>
__device__ __forceinline__ void fwd_add(LogSumExp<A>& stat, A& d, A& u, const A (&v)[K], const A (&wu)[K]) {
  const A m_old = stat.m;
  stat.add(v);
  if constexpr (D) {
    if (m_old > neg_inf<A>()) d += u * (m_old - stat.m);
    const A mz = stat.m == neg_inf<A>() ? A(0) : stat.m;  // at -inf: w x = -inf, the loss is inf
#pragma unroll
    for (int j = 0; j < K; ++j) {
      d += wu[j] * (v[j] - mz);
      u += wu[j];
    }
  }
}

template <typename A, typename T> __device__ __forceinline__ A class_weight(const T* w, int64_t c) {
  return w ? static_cast<A>(w[c]) : A(1);
}

// One row's forward, called by every thread of the block (its reductions are block-wide): returns the loss and
// sets the statistics M and log(s) in every thread. t: the row's class index (checked: not ignored, in range), or
// unused for PROB. PROB: target holds probabilities (T); else int64 indices. D: accumulate the weighted offsets
// (smoothing or PROB).
template <typename T, bool PROB, bool D>
__device__ __forceinline__ acc_t<T> ce_fwd_row(const T* __restrict__ x, const T* __restrict__ y,
                                               const T* __restrict__ w, const acc_t<T>* __restrict__ wsum,
                                               int64_t base, int64_t t, const RowArgs& a,
                                               const Smoothing<acc_t<T>>& sm, acc_t<T>& M, acc_t<T>& log_s) {
  using A = acc_t<T>;
  constexpr int N = kVec<T>;
  const int64_t C = a.classes, st = a.inner;
  const A keep = sm.keep, add = sm.add;
  LogSumExp<A> stat = LogSumExp<A>::empty();
  A d = 0, u = 0;
  if (a.vec) {
    const int64_t slots = C / N;
#pragma unroll 2
    for (int64_t s = threadIdx.x; s < slots; s += kThreads) {
      A v[N], wu[N];
      widen(load_slot(x + base, s, C, true, T(0)), v);
      if constexpr (D) {
        if constexpr (PROB) widen(load_slot(y + base, s, C, true, T(0)), wu);
#pragma unroll
        for (int j = 0; j < N; ++j)
          wu[j] = class_weight<A>(w, s * N + j) * (PROB ? wu[j] * keep + add : add);
      }
      fwd_add<D>(stat, d, u, v, wu);
    }
  } else {
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      const A v[1] = {static_cast<A>(x[base + c * st])};
      A wu[1];
      // Smoothing's class share eps / C inside the sum: sum w (x - m) alone can overflow where the loss fits.
      if constexpr (D) wu[0] = class_weight<A>(w, c) * (PROB ? static_cast<A>(y[base + c * st]) * keep + add : add);
      fwd_add<D>(stat, d, u, v, wu);
    }
  }
  const A m_thread = stat.m;
  stat = block_reduce(stat, MergeOp{});
  M = stat.m, log_s = log_(stat.s);
  if constexpr (D) d = m_thread > neg_inf<A>() ? d + u * (m_thread - M) : d;
  A l;
  if constexpr (PROB) {
    const A U = block_reduce(u, SumOp{}), Dv = block_reduce(d, SumOp{});
    l = U * log_s - Dv;
  } else {
    l = keep * class_weight<A>(w, t) * ((M - static_cast<A>(x[base + t * st])) + log_s);
    if constexpr (D) {
      const A Dv = block_reduce(d, SumOp{});
      l += add * (w ? *wsum : A(C)) * log_s - Dv;
    }
  }
  return l;
}

// The class index of a row, or -1 for an ignored row and -2 for an out-of-range one, which thread 0 records in
// flag (any one bad index will do for the message).
__device__ __forceinline__ int64_t checked_target(const int64_t* target, int64_t row, const RowArgs& a,
                                                  int64_t* flag) {
  const int64_t t = target[row];
  if (t == a.ignore_index) return -1;
  if (t < 0 || t >= a.classes) {
    if (threadIdx.x == 0) {
      flag[1] = t;
      flag[0] = 1;
    }
    return -2;
  }
  return t;
}

// Two blocks an SM (1024 threads, each with two 16-byte loads in flight) cover the memory latency; left to itself
// ptxas aims at three and spills.
template <typename T, bool PROB, bool D>
__global__ void __launch_bounds__(kThreads, 2) ce_fwd_kernel(const T* __restrict__ x, const void* __restrict__ target,
                                                          const T* __restrict__ w, const acc_t<T>* __restrict__ wsum,
                                                          acc_t<T>* __restrict__ loss, acc_t<T>* __restrict__ stat_m,
                                                          acc_t<T>* __restrict__ stat_ls,
                                                          int64_t* __restrict__ flag, RowArgs a) {
  using A = acc_t<T>;
  const Smoothing<A> sm(a);
  for (RowWalk r(a); r.row < a.rows; r.next()) {  // uniform over the block: barriers are safe
    const int64_t row = r.row;
    int64_t t = 0;
    if constexpr (!PROB) {
      t = checked_target(static_cast<const int64_t*>(target), row, a, flag);
      if (t == -1) {  // the whole block takes these branches together
        if (threadIdx.x == 0) loss[row] = stat_m[row] = stat_ls[row] = A(0);
        continue;
      }
      if (t == -2) {
        if (threadIdx.x == 0) loss[row] = stat_m[row] = stat_ls[row] = NAN;
        continue;
      }
    }
    A M, log_s;
    const A l = ce_fwd_row<T, PROB, D>(x, static_cast<const T*>(target), w, wsum, r.base(), t, a, sm, M, log_s);
    if (threadIdx.x == 0) {
      loss[row] = l;
      stat_m[row] = M;
      stat_ls[row] = log_s;
    }
  }
}

// One row's gradient from its per-row grad g and statistics m, ls (every thread of the block calls it); x and dx may
// alias (ce_bwd_inplace_kernel): each element is read before it is written, by the same thread. Ignored and
// out-of-range class indices get a zero row.
template <typename T, bool PROB>
__device__ __forceinline__ void ce_bwd_row(acc_t<T> g, acc_t<T> m, acc_t<T> ls, const T* x, const void* target,
                                           const T* w, const acc_t<T>* wsum, T* dx, int64_t row, int64_t base,
                                           const RowArgs& a, const Smoothing<acc_t<T>>& sm) {
  using A = acc_t<T>;
  constexpr int N = kVec<T>;
  const int64_t C = a.classes, st = a.inner;
  const A keep = sm.keep, add = sm.add;
  const T* y = static_cast<const T*>(target);
  // The gradient of class c from its logit v (and, PROB, its target probability yc).
  A ga, gb = g * add, gt = 0, W = w ? *wsum : A(C);
  int64_t t = -1;
  if constexpr (PROB) {
    A u = 0;
    if (a.vec) {
      for (int64_t s = threadIdx.x; s < C / N; s += kThreads) {
        A yv[N];
        widen(load_slot(y + base, s, C, true, T(0)), yv);
#pragma unroll
        for (int j = 0; j < N; ++j) u += (yv[j] * keep + add) * class_weight<A>(w, s * N + j);
      }
    } else {
      for (int64_t c = threadIdx.x; c < C; c += kThreads)
        u += (static_cast<A>(y[base + c * st]) * keep + add) * class_weight<A>(w, c);
    }
    ga = g * block_reduce(u, SumOp{});
  } else {
    t = static_cast<const int64_t*>(target)[row];
    if (t == a.ignore_index || t < 0 || t >= C) {
      if (a.vec) {
        Vec<T, N> z;
#pragma unroll
        for (int j = 0; j < N; ++j) z.v[j] = T(0);
        for (int64_t s = threadIdx.x; s < C / N; s += kThreads) store_slot(dx + base, s, C, true, z);
      } else {
        for (int64_t c = threadIdx.x; c < C; c += kThreads) dx[base + c * st] = T(0);
      }
      return;
    }
    const A wt = class_weight<A>(w, t);
    ga = g * (keep * wt + add * W);
    gt = g * keep * wt;
  }
  auto grad_of = [&](int64_t c, A v, A yc) -> A {
    const A p = exp_((v - m) - ls), wc = class_weight<A>(w, c);
    if constexpr (PROB) return ga * p - g * (yc * keep + add) * wc;
    // The target's entry with p_t - 1 (exact near 1: a confident row gets 0, as in torch; see the CPU kernel).
    return c == t ? gt * (p - A(1)) + gb * (W * p - wc) : ga * p - gb * wc;
  };
  if (a.vec) {
#pragma unroll 2
    for (int64_t s = threadIdx.x; s < C / N; s += kThreads) {
      Vec<T, N> xv = load_slot(x + base, s, C, true, T(0)), yv;
      if constexpr (PROB) yv = load_slot(y + base, s, C, true, T(0));
#pragma unroll
      for (int j = 0; j < N; ++j)
        xv.v[j] = static_cast<T>(grad_of(s * N + j, static_cast<A>(xv.v[j]), PROB ? static_cast<A>(yv.v[j]) : A(0)));
      store_slot(dx + base, s, C, true, xv);
    }
  } else {
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      const int64_t i = base + c * st;
      dx[i] = static_cast<T>(grad_of(c, static_cast<A>(x[i]), PROB ? static_cast<A>(y[i]) : A(0)));
    }
  }
}

template <typename T, bool PROB>
__device__ __forceinline__ void ce_bwd_rows_body(const acc_t<T>* grad, const T* x, const void* target, const T* w,
                                                 const acc_t<T>* wsum, const acc_t<T>* stat_m,
                                                 const acc_t<T>* stat_ls, T* dx, RowArgs a) {
  const Smoothing<acc_t<T>> sm(a);
  for (RowWalk r(a); r.row < a.rows; r.next())  // uniform over the block: barriers are safe
    ce_bwd_row<T, PROB>(grad[r.row], stat_m[r.row], stat_ls[r.row], x, target, w, wsum, dx, r.row, r.base(), a, sm);
}

template <typename T, bool PROB>
__global__ void __launch_bounds__(kThreads) ce_bwd_kernel(const acc_t<T>* __restrict__ grad, const T* __restrict__ x,
                                                          const void* __restrict__ target, const T* __restrict__ w,
                                                          const acc_t<T>* __restrict__ wsum,
                                                          const acc_t<T>* __restrict__ stat_m,
                                                          const acc_t<T>* __restrict__ stat_ls, T* __restrict__ dx,
                                                          RowArgs a) {
  ce_bwd_rows_body<T, PROB>(grad, x, target, w, wsum, stat_m, stat_ls, dx, a);
}

template <typename T, bool PROB>
__global__ void __launch_bounds__(kThreads) ce_bwd_inplace_kernel(const acc_t<T>* __restrict__ grad, T* x_dx,
                                                                  const void* __restrict__ target,
                                                                  const T* __restrict__ w,
                                                                  const acc_t<T>* __restrict__ wsum,
                                                                  const acc_t<T>* __restrict__ stat_m,
                                                                  const acc_t<T>* __restrict__ stat_ls, RowArgs a) {
  ce_bwd_rows_body<T, PROB>(grad, x_dx, target, w, wsum, stat_m, stat_ls, x_dx, a);
}

// Forward and backward of each row in one block visit (cross_entropy_fwd_grad): the row's second read, for its
// gradient, comes from L2 rather than memory. grad: the per-row grad of the loss (a scalar reduction's). One block
// an SM at least: the two passes' code together needs up to 128 registers.
template <typename T, bool PROB, bool D>
__global__ void __launch_bounds__(kThreads, 1) ce_fwd_grad_kernel(const acc_t<T>* __restrict__ grad,
                                                               const T* __restrict__ x,
                                                               const void* __restrict__ target,
                                                               const T* __restrict__ w,
                                                               const acc_t<T>* __restrict__ wsum,
                                                               acc_t<T>* __restrict__ loss, T* __restrict__ dx,
                                                               int64_t* __restrict__ flag, RowArgs a) {
  using A = acc_t<T>;
  const Smoothing<A> sm(a);
  for (RowWalk r(a); r.row < a.rows; r.next()) {  // uniform over the block: barriers are safe
    const int64_t row = r.row, base = r.base();
    int64_t t = 0;
    A M = 0, log_s = 0, l;
    if constexpr (!PROB) t = checked_target(static_cast<const int64_t*>(target), row, a, flag);
    if (t < 0) {  // ce_bwd_row writes its zero gradient
      l = t == -1 ? A(0) : A(NAN);
    } else {
      l = ce_fwd_row<T, PROB, D>(x, static_cast<const T*>(target), w, wsum, base, t, a, sm, M, log_s);
    }
    if (threadIdx.x == 0) loss[row] = l;
    ce_bwd_row<T, PROB>(grad[row], M, log_s, x, target, w, wsum, dx, row, base, a, sm);
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

// vec: the rows are read (and written) in 16-byte slots when they all start 16-byte aligned in every tensor that is.
template <typename T>
RowArgs row_args(const CeGeometry& g, int64_t ignore_index, double eps, std::initializer_list<const void*> data) {
  bool vec = g.inner == 1 && g.classes % kVec<T> == 0;
  for (const void* p : data) vec = vec && aligned16(p);
  return RowArgs{g.rows(), g.classes, g.inner, ignore_index, eps, vec};
}

// Blocks of a grid-stride launch over `rows` rows: one a row, up to what a grid's x dimension holds.
unsigned grid_for(int64_t rows) { return static_cast<unsigned>(std::min<int64_t>(rows, INT_MAX)); }

}  // namespace

void ce_fwd_rows(const at::Tensor& x, const at::Tensor& t, const std::optional<at::Tensor>& w, const CeGeometry& g,
                 int64_t ignore_index, double eps, at::Tensor& loss, at::Tensor& stats, at::Tensor& flag) {
  if (g.rows() == 0) return;
  const bool prob = t.is_floating_point();
  const DeviceWeights dw(w, x.scalar_type());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_entropy_fwd_cuda", [&] {
    using A = acc_t<scalar_t>;
    const RowArgs a =
        row_args<scalar_t>(g, ignore_index, eps, {x.const_data_ptr(), prob ? t.const_data_ptr() : nullptr});
    auto go = [&](auto kernel) {
      kernel<<<grid_for(g.rows()), kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(), t.const_data_ptr(),
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
  const at::Tensor gc = grad.contiguous(), st = stats.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool prob = t.is_floating_point();
  // dx is either x itself (inplace) or a separate allocation; any other overlap is not a supported call.
  const bool inplace = dx.const_data_ptr() == x.const_data_ptr();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_entropy_bwd_cuda", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const RowArgs a = row_args<T>(g, ignore_index, eps, {x.const_data_ptr(), dx.const_data_ptr(),
                                                         prob ? t.const_data_ptr() : nullptr});
    const A *gp = gc.const_data_ptr<A>(), *sm = stat_plane<const A>(st, 0), *sl = stat_plane<const A>(st, 1);
    const T* wp = dw.data<T>();
    const A* wsp = dw.sum_data<A>();
    const unsigned blocks = grid_for(g.rows());
    const void* tp = t.const_data_ptr();
    if (inplace) {
      T* xp = dx.mutable_data_ptr<T>();
      if (prob) ce_bwd_inplace_kernel<T, true><<<blocks, kThreads, 0, stream>>>(gp, xp, tp, wp, wsp, sm, sl, a);
      else ce_bwd_inplace_kernel<T, false><<<blocks, kThreads, 0, stream>>>(gp, xp, tp, wp, wsp, sm, sl, a);
    } else {
      const T* xp = x.const_data_ptr<T>();
      T* dp = dx.mutable_data_ptr<T>();
      if (prob) ce_bwd_kernel<T, true><<<blocks, kThreads, 0, stream>>>(gp, xp, tp, wp, wsp, sm, sl, dp, a);
      else ce_bwd_kernel<T, false><<<blocks, kThreads, 0, stream>>>(gp, xp, tp, wp, wsp, sm, sl, dp, a);
    }
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

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_grad_cuda(const at::Tensor& input, const at::Tensor& target,
                                                               const std::optional<at::Tensor>& weight,
                                                               const at::Tensor& grad_loss, int64_t ignore_index,
                                                               double label_smoothing) {
  bool prob = false;
  const CeGeometry g = check_ce_args(input, target, weight, label_smoothing, prob);
  check_ce_grad_loss(grad_loss, g, input);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous(), t = target.contiguous(), gl = grad_loss.contiguous();
  at::Tensor loss = std::get<0>(ce_fwd_outputs(x, g));
  at::Tensor dx = at::empty(x.sizes(), x.options());
  if (g.rows() == 0) return {loss, dx};
  at::Tensor flag = new_flag(x);
  const DeviceWeights dw(weight, x.scalar_type());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_entropy_fwd_grad_cuda", [&] {
    using A = acc_t<scalar_t>;
    const RowArgs a = row_args<scalar_t>(g, ignore_index, label_smoothing,
                                         {x.const_data_ptr(), dx.const_data_ptr(), prob ? t.const_data_ptr() : nullptr});
    auto go = [&](auto kernel) {
      kernel<<<grid_for(g.rows()), kThreads, 0, stream>>>(gl.const_data_ptr<A>(), x.const_data_ptr<scalar_t>(),
                                                          t.const_data_ptr(), dw.data<scalar_t>(), dw.sum_data<A>(),
                                                          loss.mutable_data_ptr<A>(), dx.mutable_data_ptr<scalar_t>(),
                                                          flag.mutable_data_ptr<int64_t>(), a);
    };
    if (prob) go(ce_fwd_grad_kernel<scalar_t, true, true>);
    else if (label_smoothing > 0) go(ce_fwd_grad_kernel<scalar_t, false, true>);
    else go(ce_fwd_grad_kernel<scalar_t, false, false>);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!prob) report_bad_target(flag, g.classes, ignore_index);
  return {loss, dx};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnn, CUDA, m) {
  m.impl("cross_entropy_fwd_grad", &cross_entropy_fwd_grad_cuda);
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cuda);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cuda);
  m.impl("cross_entropy_bwd_inplace", &cross_entropy_bwd_inplace_cuda);
}

}  // namespace fastnn::cuda
