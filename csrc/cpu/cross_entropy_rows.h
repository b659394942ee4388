// The CPU's fused softmax cross-entropy rows (formulas in csrc/cross_entropy.h), shared by cross_entropy's ops
// (csrc/cpu/cross_entropy.cpp) and linear + cross-entropy's (csrc/cpu/linear_cross_entropy.cpp: its chunk loop
// runs these rows, and its fused float32 kernel takes a row's loss and target gradient from here).
//
// Forward, per row: max (reads x from memory), sum of exp (x again, now from L2: a 32000-class float32 row is
// 125 KiB), plus a dot with the weights when smoothing - one exp per element, no N x C output, only the loss and
// the row's statistics (max, log of the sum of exp). Backward, per row: one pass writing g * (a p - b w) from x and
// the saved statistics, then the target's entry. Rows run in parallel over cores. The fast path reads rows in place
// (float/double, classes contiguous); half types and spatial inputs (N, C, d...) go through a per-task float row
// buffer.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <type_traits>

#include "cpu/vec.h"
#include "cross_entropy.h"

namespace fastnn::cpu {

inline constexpr int64_t kRowGrain = 32768;  // elements per parallel task

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
    if (len < kW<A>) v = zero_tail<A>(v, len), wu = zero_tail<A>(wu, len);
    vec<A> e = exp(v);
    if (len < kW<A>) e = zero_tail<A>(e, len);
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

// Loss of a row of class index t from its statistics: ls = log(s), xm = x_t - m, d = sum u_c (x_c - m) (0 without
// smoothing). Also linear + CE's fused kernel, which gathers the statistics over blocks of classes.
template <typename A> A index_loss(A ls, A xm, int64_t t, A d, const Smooth<A>& p) {
  A loss = (A(1) - p.eps) * (p.w ? p.w[t] : A(1)) * (ls - xm);
  if (p.eps > 0) loss += p.eps / A(p.C) * p.wsum * ls - d;
  return loss;
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
  return index_loss(ls, x[t] - m, t, d, p);
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

// The gradient's entry at the target, with p_t its probability, gk = g w_t (1 - eps) and b = g eps / C:
// g w_t (1 - eps) (p_t - 1) + ...: p_t - 1 is exact near 1, so a confident row (p_t = 1) gets exactly 0 as in
// torch, not the ulp that a p_t - g keep (contracted to an FMA) leaves.
template <typename A> A target_grad(A pt, A gk, A b, int64_t t, const Smooth<A>& p) {
  return gk * (pt - A(1)) + b * (p.wsum * pt - (p.w ? p.w[t] : A(1)));
}

// Gradient of one row (dx may alias x). STREAM: dx written with streaming stores (write_row).
template <typename A, bool STREAM = false>
void bwd_index_row(const A* x, int64_t t, A m, A ls, A g, const Smooth<A>& p, A* dx) {
  const A keep = (A(1) - p.eps) * (p.w ? p.w[t] : A(1)), add = p.eps / A(p.C);
  const A a = g * (keep + add * p.wsum), b = g * add;
  const A dt = target_grad(exp((x[t] - m) - ls), g * keep, b, t, p);  // before the row is written: dx may be x
  write_row<STREAM>(dx, p.C, [&](int64_t i, int64_t len) {
    const vec<A> e = exp((load(x + i, len) - m) - ls) * a;
    vec<A> v = p.w ? e - load(p.w + i, len) * b : e - b;
    if (t >= i && t < i + len) v[t - i] = dt;
    return v;
  });
}

template <typename A, bool STREAM = false>
void bwd_prob_row(const A* x, const A* y, A m, A ls, A g, const Smooth<A>& p, A* dx) {
  const A keep = A(1) - p.eps, add = p.eps / A(p.C);
  auto wy = [&](int64_t i, int64_t len) {
    vec<A> v = load(y + i, len) * keep + add;
    return p.w ? v * load(p.w + i, len) : v;
  };
  vec<A> s{};
  for_chunks<A>(p.C, [&](int64_t i, int64_t len) {
    vec<A> v = wy(i, len);
    if (len < kW<A>) v = zero_tail<A>(v, len);
    s += v;
  });
  const A gs = g * hsum(s);
  write_row<STREAM>(dx, p.C, [&](int64_t i, int64_t len) {
    return exp((load(x + i, len) - m) - ls) * gs - wy(i, len) * g;
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

inline void check_targets(const int64_t* t, int64_t n, int64_t C, int64_t ignore_index) {
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_INDEX(t[i] == ignore_index || (t[i] >= 0 && t[i] < C), "cross_entropy: target ", t[i],
                      " is out of bounds: expected a class index in [0, ", C - 1, "] or ignore_index (",
                      ignore_index, ")");
}

// Runs f(row, x_row, y_row, dx_row) over rows in parallel. Rows are read in place when the classes are
// contiguous and T is the accumulation type; otherwise gathered into a per-task buffer (and dx_row scattered back
// when WRITE). y (probability targets) may be null.
template <typename T, bool WRITE, bool STREAM = false, typename F>
void for_rows(const CeGeometry& g, const T* x, const T* y, T* dx, F&& f) {
  using A = acc_t<T>;
  const int64_t C = g.classes, inner = g.inner;
  const bool direct = std::is_same_v<T, A> && inner == 1;
  at::parallel_for(0, g.rows(), std::max<int64_t>(1, kRowGrain / std::max<int64_t>(C, 1)), [&](int64_t b, int64_t e) {
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
    stream_fence<STREAM>();
  });
}

// The fused rows over raw storage; shared by cross_entropy_* and linear_cross_entropy_*.
template <typename T>
void ce_fwd_rows(const CeGeometry& g, const T* x, const int64_t* ti, const T* ty, const Smooth<acc_t<T>>& p,
                 int64_t ignore_index, acc_t<T>* loss, acc_t<T>* m, acc_t<T>* ls) {
  using A = acc_t<T>;
  for_rows<T, false>(g, x, ty, nullptr, [&](int64_t r, const A* xr, const A* yr, A*) {
    if (ti) {
      if (ti[r] == ignore_index) {  // torch: zero loss; the backward never reads these statistics
        loss[r] = m[r] = ls[r] = 0;
      } else {
        loss[r] = fwd_index_row(xr, ti[r], p, m[r], ls[r]);
      }
    } else {
      loss[r] = fwd_prob_row(xr, yr, p, m[r], ls[r]);
    }
  });
}

// Whether the backward rows write dx with streaming stores: rows read in place (for_rows' direct path) whose output
// streams (vec.h). Only cross_entropy's own ops ask; linear + CE's chunks are read back at once.
template <typename T> bool ce_streams(const CeGeometry& g) {
  return g.inner == 1 && streams<T>(g.rows() * g.classes);
}

// dx may be x itself (inplace_backward).
template <typename T, bool STREAM = false>
void ce_bwd_rows(const CeGeometry& g, const acc_t<T>* grad, const T* x, const int64_t* ti, const T* ty,
                 const Smooth<acc_t<T>>& p, int64_t ignore_index, const acc_t<T>* m, const acc_t<T>* ls, T* dx) {
  using A = acc_t<T>;
  for_rows<T, true, STREAM>(g, x, ty, dx, [&](int64_t r, const A* xr, const A* yr, A* dr) {
    if (!ti) bwd_prob_row<A, STREAM>(xr, yr, m[r], ls[r], grad[r], p, dr);
    else if (ti[r] == ignore_index) std::fill(dr, dr + p.C, A(0));
    else bwd_index_row<A, STREAM>(xr, ti[r], m[r], ls[r], grad[r], p, dr);
  });
}

// The forward and the backward of each row in one visit (the row is still in cache, or in the task's buffer, for
// its second pass): the loss, and the gradient of grad[r] * loss[r] into dx (cross_entropy_fwd_grad).
template <typename T, bool STREAM = false>
void ce_fwd_grad_rows(const CeGeometry& g, const acc_t<T>* grad, const T* x, const int64_t* ti, const T* ty,
                      const Smooth<acc_t<T>>& p, int64_t ignore_index, acc_t<T>* loss, T* dx) {
  using A = acc_t<T>;
  for_rows<T, true, STREAM>(g, x, ty, dx, [&](int64_t r, const A* xr, const A* yr, A* dr) {
    A m, ls;
    if (!ti) {
      loss[r] = fwd_prob_row(xr, yr, p, m, ls);
      bwd_prob_row<A, STREAM>(xr, yr, m, ls, grad[r], p, dr);
    } else if (ti[r] == ignore_index) {
      loss[r] = 0;
      std::fill(dr, dr + p.C, A(0));
    } else {
      loss[r] = fwd_index_row(xr, ti[r], p, m, ls);
      bwd_index_row<A, STREAM>(xr, ti[r], m, ls, grad[r], p, dr);
    }
  });
}

}  // namespace fastnn::cpu
