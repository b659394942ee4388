// Fused softmax cross-entropy on the CPU (formulas in csrc/cross_entropy.h), and linear + cross-entropy on top.
//
// Forward, per row: max (reads x from memory), sum of exp (x again, now from L2: a 32000-class float32 row is
// 125 KiB), plus a dot with the weights when smoothing - one exp per element, no N x C output, only the loss and
// the logsumexp. Backward, per row: one pass writing g * (a p - b w) from x and the saved logsumexp, then the
// target's entry. Rows run in parallel over cores. The fast path reads rows in place (float/double, classes
// contiguous); half types and spatial inputs (N, C, d...) go through a per-task float row buffer.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <memory>
#include <optional>

#include "common.h"
#include "cpu/alloc.h"
#include "cpu/vec.h"
#include "cross_entropy.h"

namespace fastnn::cpu {
namespace {

constexpr int64_t kGrain = 32768;  // elements per parallel task

template <typename A> struct Smooth {
  const A* w;  // class weights (accumulation type) or nullptr
  A wsum;      // sum of the weights, C without weights
  A eps;       // label smoothing
  int64_t C;
};

// After the max pass, one pass over a row for sum(exp(x - m)) and, when D, sum(u_c (x_c - m)) with u_c the class
// weight times the smoothed probability y'_c (y non-null) or smoothing's class share eps / C (y null: inside the sum,
// which alone can overflow where the loss fits). Offsets from m keep a row of large logits (|x| ~ 1e4) exact, as
// torch's log_softmax is.
template <typename A, bool D> void exp_and_dev_sums(const A* x, A m, const Smooth<A>& p, const A* y, A& s_out,
                                                    A& d_out, A& u_out) {
  const A keep = A(1) - p.eps, add = p.eps / A(p.C);
  vec<A> s{}, d{}, u{};
  for_chunks<A>(p.C, [&](int64_t i, int64_t len) {
    vec<A> v = load(x + i, len) - m;
    vec<A> wu{};
    if constexpr (D) {
      wu = y ? load(y + i, len) * keep + add : splat<A>(add);
      if (p.w) wu *= load(p.w + i, len);
    }
    for (int k = static_cast<int>(len); k < kW<A>; ++k) v[k] = wu[k] = 0;  // int k: GCC then sees k < kW
    vec<A> e = exp(v);
    for (int k = static_cast<int>(len); k < kW<A>; ++k) e[k] = 0;
    s += e;
    if constexpr (D) {
      u += wu;
      d += wu * v;
    }
  });
  s_out = hsum(s);
  d_out = hsum(d);
  u_out = hsum(u);
}

// Loss of one row of class index t; sets its statistics m and log(s) (stat_plane).
template <typename A> A fwd_index_row(const A* x, int64_t t, const Smooth<A>& p, A& m_out, A& ls_out) {
  const A m = max_of(x, p.C);
  A s, d = 0, u;
  if (p.eps > 0) exp_and_dev_sums<A, true>(x, m, p, nullptr, s, d, u);
  else exp_and_dev_sums<A, false>(x, m, p, nullptr, s, d, u);
  const A ls = std::log(s);
  m_out = m;
  ls_out = ls;
  const A wt = p.w ? p.w[t] : A(1);
  A loss = (A(1) - p.eps) * wt * (ls - (x[t] - m));
  if (p.eps > 0) loss += p.eps / A(p.C) * p.wsum * ls - d;
  return loss;
}

// Loss of one row of probabilities y; sets m and log(s). loss = S lse - sum(w y' x) = S log(s) - sum(w y' (x - m)).
template <typename A> A fwd_prob_row(const A* x, const A* y, const Smooth<A>& p, A& m_out, A& ls_out) {
  const A m = max_of(x, p.C);
  A s, d, S;
  exp_and_dev_sums<A, true>(x, m, p, y, s, d, S);
  const A ls = std::log(s);
  m_out = m;
  ls_out = ls;
  return S * ls - d;
}

// Gradient of one row (dx may alias x).
template <typename A> void bwd_index_row(const A* x, int64_t t, A m, A ls, A g, const Smooth<A>& p, A* dx) {
  const A keep = (A(1) - p.eps) * (p.w ? p.w[t] : A(1)), add = p.eps / A(p.C);
  const A a = g * (keep + add * p.wsum), b = g * add;
  const A xt = x[t];
  for_chunks<A>(p.C, [&](int64_t i, int64_t len) {
    const vec<A> e = exp((load(x + i, len) - m) - ls) * a;
    store(dx + i, p.w ? e - load(p.w + i, len) * b : e - b, len);
  });
  // The target's entry as g w_t (1 - eps) (p_t - 1) + ...: p_t - 1 is exact near 1, so a confident row (p_t = 1)
  // gets exactly 0 as in torch, not the ulp that a p_t - g keep (contracted to an FMA) leaves.
  const A pt = exp((xt - m) - ls);
  dx[t] = g * keep * (pt - A(1)) + b * (p.wsum * pt - (p.w ? p.w[t] : A(1)));
}

template <typename A> void bwd_prob_row(const A* x, const A* y, A m, A ls, A g, const Smooth<A>& p, A* dx) {
  const A keep = A(1) - p.eps, add = p.eps / A(p.C);
  auto wy = [&](int64_t i, int64_t len) {
    vec<A> v = load(y + i, len) * keep + add;
    return p.w ? v * load(p.w + i, len) : v;
  };
  vec<A> s{};
  for_chunks<A>(p.C, [&](int64_t i, int64_t len) {
    vec<A> v = wy(i, len);
    if (len < kW<A>) for (int64_t k = len; k < kW<A>; ++k) v[k] = 0;
    s += v;
  });
  const A gs = g * hsum(s);
  for_chunks<A>(p.C, [&](int64_t i, int64_t len) {
    store(dx + i, exp((load(x + i, len) - m) - ls) * gs - wy(i, len) * g, len);
  });
}

// Class weights in the accumulation type, and their sum.
template <typename T, typename A> struct Weights {
  std::unique_ptr<A[]> buf;
  Smooth<A> p;
  Weights(const std::optional<at::Tensor>& w, double eps, int64_t C) : p{nullptr, A(C), A(eps), C} {
    if (!w.has_value()) return;
    const at::Tensor wc = w->contiguous();
    buf.reset(new A[C]);
    load_row(wc.const_data_ptr<T>(), buf.get(), C);
    p.w = buf.get();
    p.wsum = sum(buf.get(), C);
  }
};

void check_targets(const int64_t* t, int64_t n, int64_t C, int64_t ignore_index) {
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_INDEX(t[i] == ignore_index || (t[i] >= 0 && t[i] < C), "cross_entropy: target ", t[i],
                      " is out of bounds: expected a class index in [0, ", C - 1, "] or ignore_index (",
                      ignore_index, ")");
}

// Runs f(row, x_row, y_row, dx_row) over rows in parallel. Rows are read in place when the classes are
// contiguous and T is the accumulation type; otherwise gathered into a per-task buffer (and dx_row scattered back
// when WRITE). y (probability targets) may be null.
template <typename T, bool WRITE, typename F>
void for_rows(const CeGeometry& g, const T* x, const T* y, T* dx, F&& f) {
  using A = acc_t<T>;
  const int64_t C = g.classes, inner = g.inner;
  const bool direct = std::is_same_v<T, A> && inner == 1;
  at::parallel_for(0, g.rows(), std::max<int64_t>(1, kGrain / std::max<int64_t>(C, 1)), [&](int64_t b, int64_t e) {
    std::unique_ptr<A[]> buf(direct ? nullptr : new A[2 * C]);
    for (int64_t r = b; r < e; ++r) {
      const int64_t base = (r / inner) * C * inner + r % inner;
      if (direct) {
        f(r, reinterpret_cast<const A*>(x + base), y ? reinterpret_cast<const A*>(y + base) : nullptr,
          WRITE ? reinterpret_cast<A*>(dx + base) : nullptr);
        continue;
      }
      A *bx = buf.get(), *by = buf.get() + C;
      for (int64_t c = 0; c < C; ++c) bx[c] = static_cast<A>(x[base + c * inner]);
      if (y) for (int64_t c = 0; c < C; ++c) by[c] = static_cast<A>(y[base + c * inner]);
      f(r, bx, y ? by : nullptr, bx);
      if constexpr (WRITE) for (int64_t c = 0; c < C; ++c) dx[base + c * inner] = static_cast<T>(bx[c]);
    }
  });
}

// The fused rows over raw storage; shared by cross_entropy_* and linear_cross_entropy_*.
template <typename T>
void ce_fwd_rows(const CeGeometry& g, const T* x, const int64_t* ti, const T* ty, const Smooth<acc_t<T>>& p,
                 int64_t ignore_index, acc_t<T>* loss, acc_t<T>* m, acc_t<T>* ls) {
  using A = acc_t<T>;
  for_rows<T, false>(g, x, ty, nullptr, [&](int64_t r, const A* xr, const A* yr, A*) {
    if (ti) {
      if (ti[r] == ignore_index) {  // torch: zero loss; the backward never reads this lse
        loss[r] = m[r] = ls[r] = 0;
      } else {
        loss[r] = fwd_index_row(xr, ti[r], p, m[r], ls[r]);
      }
    } else {
      loss[r] = fwd_prob_row(xr, yr, p, m[r], ls[r]);
    }
  });
}

// dx may be x itself (inplace_backward).
template <typename T>
void ce_bwd_rows(const CeGeometry& g, const acc_t<T>* grad, const T* x, const int64_t* ti, const T* ty,
                 const Smooth<acc_t<T>>& p, int64_t ignore_index, const acc_t<T>* m, const acc_t<T>* ls, T* dx) {
  using A = acc_t<T>;
  for_rows<T, true>(g, x, ty, dx, [&](int64_t r, const A* xr, const A* yr, A* dr) {
    if (!ti) bwd_prob_row(xr, yr, m[r], ls[r], grad[r], p, dr);
    else if (ti[r] == ignore_index) std::fill(dr, dr + p.C, A(0));
    else bwd_index_row(xr, ti[r], m[r], ls[r], grad[r], p, dr);
  });
}

struct CeCall {
  CeGeometry g;
  bool prob;
  at::Tensor x, t;
};

CeCall prepare(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
               int64_t ignore_index, double label_smoothing) {
  CeCall c;
  c.g = check_ce_args(input, target, weight, label_smoothing, c.prob);
  c.x = input.contiguous();
  c.t = target.contiguous();
  if (!c.prob) check_targets(c.t.const_data_ptr<int64_t>(), c.t.numel(), c.g.classes, ignore_index);
  return c;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cpu(const at::Tensor& input, const at::Tensor& target,
                                                         const std::optional<at::Tensor>& weight,
                                                         int64_t ignore_index, double label_smoothing,
                                                         bool /*inplace_backward*/) {
  const CeCall c = prepare(input, target, weight, ignore_index, label_smoothing);
  at::Tensor loss, lse;
  std::tie(loss, lse) = ce_fwd_outputs(c.x, c.g);
  if (c.g.rows() == 0) return {loss, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.x.scalar_type(), "cross_entropy_fwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    const Weights<scalar_t, A> w(weight, label_smoothing, c.g.classes);
    ce_fwd_rows<scalar_t>(c.g, c.x.const_data_ptr<scalar_t>(), c.prob ? nullptr : c.t.const_data_ptr<int64_t>(),
                          c.prob ? c.t.const_data_ptr<scalar_t>() : nullptr, w.p, ignore_index,
                          loss.mutable_data_ptr<A>(), stat_plane<A>(lse, 0), stat_plane<A>(lse, 1));
  });
  return {loss, lse};
}

// Writes grad_input into `out` (a fresh tensor, or the contiguous input itself).
void cross_entropy_bwd_into(const at::Tensor& grad_loss, const CeCall& c, const std::optional<at::Tensor>& weight,
                            const at::Tensor& lse, int64_t ignore_index, double label_smoothing, at::Tensor& out) {
  check_ce_bwd_args(grad_loss, lse, c.g, c.x);
  if (c.g.rows() == 0 || c.g.classes == 0) return;
  const at::Tensor gl = grad_loss.contiguous(), l = lse.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.x.scalar_type(), "cross_entropy_bwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    const Weights<scalar_t, A> w(weight, label_smoothing, c.g.classes);
    ce_bwd_rows<scalar_t>(c.g, gl.const_data_ptr<A>(), c.x.const_data_ptr<scalar_t>(),
                          c.prob ? nullptr : c.t.const_data_ptr<int64_t>(),
                          c.prob ? c.t.const_data_ptr<scalar_t>() : nullptr, w.p, ignore_index,
                          stat_plane<const A>(l, 0), stat_plane<const A>(l, 1), out.mutable_data_ptr<scalar_t>());
  });
}

at::Tensor cross_entropy_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                                 const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                 int64_t ignore_index, double label_smoothing) {
  const CeCall c = prepare(input, target, weight, ignore_index, label_smoothing);
  at::Tensor dx = empty(c.x.sizes(), c.x.options());
  cross_entropy_bwd_into(grad_loss, c, weight, lse, ignore_index, label_smoothing, dx);
  return dx;
}

void cross_entropy_bwd_inplace_cpu(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                                   const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                   int64_t ignore_index, double label_smoothing) {
  TORCH_CHECK(input.is_contiguous(), "cross_entropy_bwd_inplace: input must be contiguous");
  const CeCall c = prepare(input, target, weight, ignore_index, label_smoothing);
  at::Tensor out = c.x;  // the same storage as input
  cross_entropy_bwd_into(grad_loss, c, weight, lse, ignore_index, label_smoothing, out);
}

// ---- linear + cross-entropy: csrc/cross_entropy.h's chunk loop around the rows above.

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_fwd_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const std::optional<at::Tensor>& class_weight, int64_t ignore_index,
    double label_smoothing, int64_t chunk) {
  const int64_t V = check_linear_ce_fwd_args(input, weight, bias, target, class_weight, chunk);
  const at::Tensor t = target.contiguous();
  check_targets(t.const_data_ptr<int64_t>(), t.numel(), V, ignore_index);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "linear_cross_entropy_fwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    const Weights<scalar_t, A> w(class_weight, label_smoothing, V);
    out = linear_ce_forward(input, weight, bias, t, chunk,
                            [&](const at::Tensor& logits, const at::Tensor& ts, at::Tensor loss, at::Tensor lse) {
      const CeGeometry g{logits.size(0), V, 1};
      ce_fwd_rows<scalar_t>(g, logits.const_data_ptr<scalar_t>(), ts.const_data_ptr<int64_t>(), nullptr, w.p,
                            ignore_index, loss.mutable_data_ptr<A>(), stat_plane<A>(lse, 0), stat_plane<A>(lse, 1));
    }, empty);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& target, const std::optional<at::Tensor>& class_weight,
    const at::Tensor& lse, int64_t ignore_index, double label_smoothing, int64_t chunk) {
  const int64_t V = check_linear_ce_bwd_args(grad_loss, input, weight, bias, target, class_weight, lse, chunk);
  const at::Tensor t = target.contiguous();
  check_targets(t.const_data_ptr<int64_t>(), t.numel(), V, ignore_index);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "linear_cross_entropy_bwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    const Weights<scalar_t, A> w(class_weight, label_smoothing, V);
    out = linear_ce_backward(grad_loss, input, weight, bias, t, lse, chunk,
                             [&](const at::Tensor& gs, at::Tensor& logits, const at::Tensor& ts, const at::Tensor& ls) {
      const CeGeometry g{logits.size(0), V, 1};
      auto* p = logits.mutable_data_ptr<scalar_t>();
      ce_bwd_rows<scalar_t>(g, gs.const_data_ptr<A>(), p, ts.const_data_ptr<int64_t>(), nullptr, w.p, ignore_index,
                            stat_plane<const A>(ls, 0), stat_plane<const A>(ls, 1), p);
    }, empty);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnn, CPU, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cpu);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cpu);
  m.impl("cross_entropy_bwd_inplace", &cross_entropy_bwd_inplace_cpu);
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd_cpu);
  m.impl("linear_cross_entropy_bwd", &linear_cross_entropy_bwd_cpu);
}

}  // namespace fastnn::cpu
