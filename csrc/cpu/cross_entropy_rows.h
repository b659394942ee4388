// The CPU's fused softmax cross-entropy rows (formulas in csrc/cross_entropy.h), shared by cross_entropy's ops
// (csrc/cpu/cross_entropy.cpp) and linear + cross-entropy's (csrc/cpu/linear_cross_entropy.cpp: its chunk loop
// runs these rows, and its fused float32 kernel takes a row's loss and target gradient from here).
//
// Forward, per row: max (reads x from memory), sum of exp (x again, now from L2: a 32000-class float32 row is
// 125 KiB), plus a dot with the weights when smoothing - one exp per element, no N x C output, only the loss and
// the row's statistics (max, log of the sum of exp). Backward, per row: one pass writing g * (a p - b w) from x and
// the saved statistics, then the target's entry. Rows run in parallel over cores. The fast path reads rows in place
// (float/double, classes contiguous); half types go through a per-task float row buffer. Spatial inputs (N, C, d...),
// whose classes lie `inner` apart, run the same formulas on slabs of positions side by side (cpu/slabs.h): each
// pass over the classes is vector operations across positions.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <type_traits>

#include "cpu/slabs.h"
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
// torch, not the ulp that a p_t - g keep (contracted to an FMA) leaves. Out of line, so that every caller (the
// backward's head, vector and tail loops, streamed or not) rounds it the same way: each inlined copy could
// contract it into FMAs differently.
template <typename A> [[gnu::noinline]] A target_grad(A pt, A gk, A b, int64_t t, const Smooth<A>& p) {
  return gk * (pt - A(1)) + b * (p.wsum * pt - (p.w ? p.w[t] : A(1)));
}

// Gradient of one row (dx may alias x). STREAM: dx written with streaming stores (write_row).
template <typename A, bool STREAM = false>
void bwd_index_row(const A* x, int64_t t, A m, A ls, A g, const Smooth<A>& p, A* dx) {
  const A keep = (A(1) - p.eps) * (p.w ? p.w[t] : A(1)), add = p.eps / A(p.C);
  const A a = g * (keep + add * p.wsum), b = g * add;
  write_row<STREAM>(dx, p.C, [&](int64_t i, int64_t len) {
    const vec<A> pr = exp((load(x + i, len) - m) - ls);  // read before the chunk is written: dx may be x
    const vec<A> e = pr * a;
    vec<A> v = p.w ? e - load(p.w + i, len) * b : e - b;
    if (t >= i && t < i + len) v[t - i] = target_grad(pr[t - i], g * keep, b, t, p);
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

// Runs f(row, x_row, y_row, dx_row) over the rows of an input whose classes are contiguous (inner == 1; spatial
// inputs take ce_slabs), in parallel. Rows are read in place when T is the accumulation type, else converted into
// a per-task buffer (and dx_row converted back when WRITE). y (probability targets) may be null.
template <typename T, bool WRITE, bool STREAM = false, typename F>
void for_rows(const CeGeometry& g, const T* x, const T* y, T* dx, F&& f) {
  using A = acc_t<T>;
  const int64_t C = g.classes;
  constexpr bool direct = std::is_same_v<T, A>;
  at::parallel_for(0, g.rows(), std::max<int64_t>(1, kRowGrain / std::max<int64_t>(C, 1)), [&](int64_t b, int64_t e) {
    std::unique_ptr<A[]> buf(direct ? nullptr : new A[2 * C]);
    for (int64_t r = b; r < e; ++r) {
      const int64_t base = r * C;
      if constexpr (direct) {
        f(r, x + base, y ? y + base : nullptr, WRITE ? dx + base : nullptr);
      } else {
        A *bx = buf.get(), *by = buf.get() + C;
        load_row(x + base, bx, C);
        if (y) load_row(y + base, by, C);
        f(r, bx, y ? by : nullptr, bx);
        if constexpr (WRITE) store_row(bx, dx + base, C);
      }
    }
    stream_fence<STREAM>();
  });
}

// ---- spatial inputs: a slab of positions, lane j holding position first + j ----
// Element (class c, lane j) of a slab lies at base + c * inner + j. The per-lane arrays hold kSlab values (whole
// vectors; lanes past w are computed and never read).

// Per lane: the max m and log of the sum of exp ls over the classes, and (when smoothing or probability targets
// need them) d = sum_c u_c (x_c - m) and u = sum_c u_c, u_c as in exp_and_dev_sums.
template <typename T, typename A = acc_t<T>>
void slab_stats(const T* x, const T* y, int64_t inner, int64_t w, const Smooth<A>& p, A* m, A* ls, A* d, A* u) {
  constexpr A ninf = -std::numeric_limits<A>::infinity();
  const A keep = A(1) - p.eps, add = p.eps / A(p.C);
  const bool dev = y || p.eps > 0;
  std::fill_n(m, kSlab, ninf);
  std::fill_n(ls, kSlab, A(0));
  std::fill_n(d, kSlab, A(0));
  std::fill_n(u, kSlab, A(0));
  alignas(64) A comp[kSlab] = {};
  for (int64_t c = 0; c < p.C; ++c)
    for_chunks<A>(w, [&](int64_t j, int64_t len) {
      store(m + j, vmax(load(m + j), load_as<A>(x + c * inner + j, len, ninf)));
    });
  for (int64_t c = 0; c < p.C; ++c) {
    const T* xc = x + c * inner;
    for_chunks<A>(w, [&](int64_t j, int64_t len) {
      const vec<A> v = load_as<A>(xc + j, len) - load(m + j);
      kahan_add(ls + j, comp + j, exp(v));  // the sum of exp, its log taken below
      if (dev) {
        vec<A> wu = y ? load_as<A>(y + c * inner + j, len) * keep + add : splat<A>(add);
        if (p.w) wu *= p.w[c];
        store(u + j, load(u + j) + wu);
        store(d + j, load(d + j) + wu * v);
      }
    });
  }
  for_chunks<A>(w, [&](int64_t j, int64_t) { store(ls + j, log(load(ls + j))); });
}

// The gradient of g[j] * loss of every lane into dx (which may be x itself: each element is read before it is
// written, and the target's entry is taken from x first). m, ls: the lanes' statistics; ti: the lanes' class
// indices, or null with probability targets y.
template <typename T, typename A = acc_t<T>>
void slab_grad(const T* x, const T* y, const int64_t* ti, int64_t ignore_index, int64_t inner, int64_t w,
               const Smooth<A>& p, const A* m, const A* ls, const A* g, T* dx) {
  const A keep = A(1) - p.eps, add = p.eps / A(p.C);
  alignas(64) A a[kSlab], b[kSlab], dt[kSlab];
  if (ti) {
    // Per lane: dx_c = g (k_t + add S) p_c - g add w_c with k_t = keep w_t, and the target's entry from
    // target_grad's formula, g k_t (p_t - 1) + g add (S p_t - w_t), all as vectors across lanes from the lanes'
    // target logit x_t and weight w_t (ignored lanes: g = 0, zeroed below).
    alignas(64) A xt[kSlab], wt[kSlab], gj[kSlab];
    for (int64_t j = 0; j < w; ++j) {
      const bool ignored = ti[j] == ignore_index;
      xt[j] = ignored ? A(0) : static_cast<A>(x[ti[j] * inner + j]);
      wt[j] = ignored || !p.w ? A(1) : p.w[ti[j]];
      gj[j] = ignored ? A(0) : g[j];
    }
    for_chunks<A>(w, [&](int64_t j, int64_t) {
      const vec<A> gv = load(gj + j), kt = load(wt + j) * keep, bv = gv * add;
      const vec<A> pt = exp((load(xt + j) - load(m + j)) - load(ls + j));
      store(a + j, gv * (kt + add * p.wsum));
      store(b + j, bv);
      store(dt + j, gv * kt * (pt - A(1)) + bv * (pt * p.wsum - load(wt + j)));
    });
  } else {  // dx_c = g u p_c - g u_c, u_c = (keep y_c + add) w_c and u their sum
    std::fill_n(a, kSlab, A(0));
    for (int64_t c = 0; c < p.C; ++c)
      for_chunks<A>(w, [&](int64_t j, int64_t len) {
        vec<A> wu = load_as<A>(y + c * inner + j, len) * keep + add;
        if (p.w) wu *= p.w[c];
        store(a + j, load(a + j) + wu);
      });
    for (int64_t j = 0; j < w; ++j) {
      a[j] *= g[j];
      b[j] = g[j];
    }
  }
  for (int64_t c = 0; c < p.C; ++c) {
    const T* xc = x + c * inner;
    const A wc = p.w ? p.w[c] : A(1);
    const T* yc = y ? y + c * inner : nullptr;
    const auto p_times_a = [&](int64_t j, int64_t len) {
      return exp((load_as<A>(xc + j, len) - load(m + j)) - load(ls + j)) * load(a + j);
    };
    if (ti) {
      for_chunks<A>(w, [&](int64_t j, int64_t len) {
        store_as<A>(dx + c * inner + j, p_times_a(j, len) - load(b + j) * wc, len);
      });
    } else {
      for_chunks<A>(w, [&](int64_t j, int64_t len) {
        const vec<A> u = (load_as<A>(yc + j, len) * keep + add) * wc;
        store_as<A>(dx + c * inner + j, p_times_a(j, len) - u * load(b + j), len);
      });
    }
  }
  if (!ti) return;
  for (int64_t j = 0; j < w; ++j) {
    if (ti[j] != ignore_index) {
      dx[ti[j] * inner + j] = static_cast<T>(dt[j]);
    } else {  // torch: a zero row, whatever x holds
      for (int64_t c = 0; c < p.C; ++c) dx[c * inner + j] = T(0);
    }
  }
}

// The lanes' losses from their statistics (ignored targets: 0, and statistics 0 as the rows store them).
template <typename T, typename A = acc_t<T>>
void slab_losses(const T* x, const int64_t* ti, int64_t ignore_index, int64_t inner, int64_t w, const Smooth<A>& p,
                 A* m, A* ls, const A* d, const A* u, A* loss) {
  for (int64_t j = 0; j < w; ++j) {
    if (!ti) {
      loss[j] = u[j] * ls[j] - d[j];
    } else if (ti[j] == ignore_index) {
      loss[j] = m[j] = ls[j] = 0;
    } else {
      loss[j] = index_loss(ls[j], static_cast<A>(x[ti[j] * inner + j]) - m[j], ti[j], d[j], p);
    }
  }
}

// Rows of few contiguous classes also run as slabs: kSlab rows at a time, transposed into a [classes][kSlab]
// buffer, where a row of its own is a single partial vector and its reductions are the work. The transposes cost
// about what that saves in the backward (one pass, no reductions) from 12-16 classes on, in the forward and
// backward together from 32-50, in the forward beyond 64 (docs/measurements.md, "Short rows and spatial inputs as
// slabs").
enum class CePass { kForward, kBackward, kBoth };
constexpr int64_t kShortRowMost = 64;  // the largest of the three: ce_slabs' buffer holds that many classes
inline bool ce_slab_form(const CeGeometry& g, CePass pass) {
  const int64_t most = pass == CePass::kForward ? kShortRowMost : pass == CePass::kBoth ? 32 : 8;
  return g.inner > 1 || g.classes <= most;
}

// The slabs of a spatial input, or (inner == 1) of kSlab short rows through a transposing buffer: with LOSS the
// losses, and the statistics into m_out / ls_out where given; with GRAD the gradient of grad * loss into dx, from
// the statistics just computed (LOSS) or the saved m_in / ls_in.
template <typename T, bool LOSS, bool GRAD>
void ce_slabs(const CeGeometry& g, const acc_t<T>* grad, const T* x, const int64_t* ti, const T* ty,
              const Smooth<acc_t<T>>& p, int64_t ignore_index, acc_t<T>* loss, acc_t<T>* m_out, acc_t<T>* ls_out,
              const acc_t<T>* m_in, const acc_t<T>* ls_in, T* dx) {
  using A = acc_t<T>;
  const int64_t C = g.classes;
  const bool rows = g.inner == 1;  // short rows: positions are rows, C apart
  // The slab's elements: in place (classes `stride` apart), or for short rows the transposed buffer (kSlab apart)
  // that the gradient overwrites before it is copied out.
  const auto slab = [&](auto* xs, auto* ys, int64_t stride, const int64_t first, int64_t w, auto* dxs) {
    using S = std::remove_const_t<std::remove_pointer_t<decltype(xs)>>;
    const int64_t* tj = ti ? ti + first : nullptr;
    alignas(64) A m[kSlab], ls[kSlab], d[kSlab], u[kSlab];  // whole vectors: the saved statistics are copied in
    if constexpr (LOSS) {
      slab_stats<S>(xs, ys, stride, w, p, m, ls, d, u);
      slab_losses<S>(xs, tj, ignore_index, stride, w, p, m, ls, d, u, loss + first);
      if (m_out) std::copy_n(m, w, m_out + first), std::copy_n(ls, w, ls_out + first);
    } else {
      std::copy_n(m_in + first, w, m);
      std::copy_n(ls_in + first, w, ls);
    }
    if constexpr (GRAD) slab_grad<S>(xs, ys, tj, ignore_index, stride, w, p, m, ls, grad + first, dxs);
  };
  if (!rows) {
    for_slabs(g.outer, C, g.inner, kRowGrain, [&](int64_t base, int64_t first, int64_t w) {
      slab(x + base, ty ? ty + base : nullptr, g.inner, first, w, GRAD ? dx + base : nullptr);
    });
    return;
  }
  // [1, C, rows] slabs of the row-major [rows, C]: first is the slab's first row, base unused.
  TORCH_CHECK(C <= kShortRowMost, "cross_entropy: ", C, " classes taken as short rows");
  for_slabs(1, C, g.rows(), kRowGrain, [&](int64_t, int64_t first, int64_t w) {
    alignas(64) A bx[kShortRowMost * kSlab], by[kShortRowMost * kSlab];
    rows_to_slab(x, C, first, w, bx);
    if (ty) rows_to_slab(ty, C, first, w, by);
    slab(static_cast<const A*>(bx), ty ? static_cast<const A*>(by) : nullptr, kSlab, first, w, bx);
    if constexpr (GRAD) slab_to_rows(bx, C, first, w, dx);
  });
}

// The fused rows over raw storage; shared by cross_entropy_* and linear_cross_entropy_*.
template <typename T>
void ce_fwd_rows(const CeGeometry& g, const T* x, const int64_t* ti, const T* ty, const Smooth<acc_t<T>>& p,
                 int64_t ignore_index, acc_t<T>* loss, acc_t<T>* m, acc_t<T>* ls) {
  using A = acc_t<T>;
  if (ce_slab_form(g, CePass::kForward)) {
    return ce_slabs<T, true, false>(g, nullptr, x, ti, ty, p, ignore_index, loss, m, ls, nullptr, nullptr, nullptr);
  }
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
  if (ce_slab_form(g, CePass::kBackward)) {
    return ce_slabs<T, false, true>(g, grad, x, ti, ty, p, ignore_index, nullptr, nullptr, nullptr, m, ls, dx);
  }
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
  if (ce_slab_form(g, CePass::kBoth)) {
    return ce_slabs<T, true, true>(g, grad, x, ti, ty, p, ignore_index, loss, nullptr, nullptr, nullptr, nullptr, dx);
  }
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
