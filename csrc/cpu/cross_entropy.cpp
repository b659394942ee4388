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

#include <limits>
#include <memory>
#include <optional>
#include <vector>

#include "common.h"
#include "cpu/alloc.h"
#include "cpu/gemm.h"
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

// Gradient of one row (dx may alias x).
template <typename A> void bwd_index_row(const A* x, int64_t t, A m, A ls, A g, const Smooth<A>& p, A* dx) {
  const A keep = (A(1) - p.eps) * (p.w ? p.w[t] : A(1)), add = p.eps / A(p.C);
  const A a = g * (keep + add * p.wsum), b = g * add;
  const A xt = x[t];
  for_chunks<A>(p.C, [&](int64_t i, int64_t len) {
    const vec<A> e = exp((load(x + i, len) - m) - ls) * a;
    store(dx + i, p.w ? e - load(p.w + i, len) * b : e - b, len);
  });
  dx[t] = target_grad(exp((xt - m) - ls), g * keep, b, t, p);
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
  at::Tensor loss, stats;
  std::tie(loss, stats) = ce_fwd_outputs(c.x, c.g);
  if (c.g.rows() == 0) return {loss, stats};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.x.scalar_type(), "cross_entropy_fwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    const Weights<scalar_t, A> w(weight, label_smoothing, c.g.classes);
    ce_fwd_rows<scalar_t>(c.g, c.x.const_data_ptr<scalar_t>(), c.prob ? nullptr : c.t.const_data_ptr<int64_t>(),
                          c.prob ? c.t.const_data_ptr<scalar_t>() : nullptr, w.p, ignore_index,
                          loss.mutable_data_ptr<A>(), stat_plane<A>(stats, 0), stat_plane<A>(stats, 1));
  });
  return {loss, stats};
}

// Writes grad_input into `out` (a fresh tensor, or the contiguous input itself).
void cross_entropy_bwd_into(const at::Tensor& grad_loss, const CeCall& c, const std::optional<at::Tensor>& weight,
                            const at::Tensor& stats, int64_t ignore_index, double label_smoothing, at::Tensor& out) {
  check_ce_bwd_args(grad_loss, stats, c.g, c.x);
  if (c.g.rows() == 0 || c.g.classes == 0) return;
  const at::Tensor gl = grad_loss.contiguous(), l = stats.contiguous();
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
                                 const std::optional<at::Tensor>& weight, const at::Tensor& stats,
                                 int64_t ignore_index, double label_smoothing) {
  const CeCall c = prepare(input, target, weight, ignore_index, label_smoothing);
  at::Tensor dx = hugepage_empty(c.x.sizes(), c.x.options());
  cross_entropy_bwd_into(grad_loss, c, weight, stats, ignore_index, label_smoothing, dx);
  return dx;
}

void cross_entropy_bwd_inplace_cpu(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                                   const std::optional<at::Tensor>& weight, const at::Tensor& stats,
                                   int64_t ignore_index, double label_smoothing) {
  TORCH_CHECK(input.is_contiguous(), "cross_entropy_bwd_inplace: input must be contiguous");
  const CeCall c = prepare(input, target, weight, ignore_index, label_smoothing);
  at::Tensor out = c.x;  // the same storage as input
  cross_entropy_bwd_into(grad_loss, c, weight, stats, ignore_index, label_smoothing, out);
}

// ---- linear + cross-entropy, fused on packed::gemm (float32 with AVX2): no (rows, V) logits buffer at all.
//
// The chunk loop below (csrc/cross_entropy.h) runs four products per chunk on the BLAS: the logits x W^T twice
// (forward, and recomputed in the backward), grad_input dl W and grad_weight dl^T x, each through memory, since a
// chunk's logits (128 MiB) do not fit in cache. At N = 8192, D = 512, V = 32000 on two Zen 3 cores MKL runs them at
// 158 (x W^T), 180 and 183 GF/s, and the four take 95% of the op's time, so the recompute alone put fastnn at
// 1.02x torch's three-product eager time. Here the threads take blocks of kClasses classes instead; a block's
// logits for a tile of rows (64 x 512 floats, 128 KiB) stay in L2 from the product that makes them to the
// products that consume their gradient, and every product runs on packed::gemm with the big operand (W) in place
// and only the tile of x packed: W_blk x^T at ~185 GF/s (MKL on a 1024-row chunk: 158 as x W^T, 176 as W x^T),
// then the block's share of grad_weight (its own rows: no race, ~190) and of grad_input (a per-thread sum, ~180).
// The forward keeps per-column online-softmax statistics per thread and merges them at the end of a tile.
// Measured on the whole op (bench_cross_entropy --goal): fwd+bwd 5.88 s against torch eager's 6.94 (0.85x).
namespace fused {

constexpr int64_t kClasses = 64;  // classes per block
// Rows per tile (fewer when the op's chunk is smaller). grad_input's product adds into a thread's (rows x D)
// partial once per block, so the partial should stay near L2 (Zen 3: 512 KiB per core): at D = 512 that product
// ran at 183 GF/s with 512 rows, 164 with 1024, and the other two products at ~190 either way.
constexpr int64_t kRows = 512;

// The row stride of a block's logits: padded past a multiple of 1024 bytes so that walking down a column (the
// transposed product's A) does not map every row to the same L1 set (measured with tiles of 1024 rows, before
// the slab order below: 107 GF/s unpadded, 126 padded).
inline int64_t block_ld(int64_t n) { return (n + 15) / 16 * 16 + 16; }

// float32 with AVX2, and a block of classes for every thread: the threads split classes, not rows, so a small
// vocabulary (V = 10 on 2 threads: one block) would run on one core where the BLAS and the row kernel use all.
bool wanted(const at::Tensor& input, int64_t V) {
  return packed::kAvailable && input.scalar_type() == at::kFloat &&
         (V + kClasses - 1) / kClasses >= at::get_num_threads();
}

// The threads' shares of the class blocks: part q takes blocks [first(q), first(q + 1)).
struct Parts {
  int64_t blocks, n;
  Parts(int64_t V) : blocks((V + kClasses - 1) / kClasses), n(std::min<int64_t>(at::get_num_threads(), blocks)) {}
  int64_t first(int64_t q) const { return blocks * q / n; }
  // f(part) on the intra-op threads.
  template <typename F> void run(F&& f) const {
    at::parallel_for(0, n, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) f(q);
    });
  }
};

// One tile: rows [s, s + n) of x.
struct Tile {
  int64_t s, n;
};

// blk [mc, n] (rows ld apart) = logits of classes [v0, v0 + mc) for the tile's rows: W_blk . x_tile^T (+ bias).
inline void block_logits(const float* w, const float* bias, int64_t D, int64_t v0, int64_t mc, const float* xT,
                         int64_t n, float* blk, int64_t ld) {
  if (bias)
    for (int64_t r = 0; r < mc; ++r) std::fill_n(blk + r * ld, n, bias[v0 + r]);
  packed::gemm(w + v0 * D, D, mc, D, xT, n, blk, ld, /*accumulate=*/bias != nullptr);
}

// The tile's targets that fall in classes [v0, v0 + mc): f(column j, row of the block).
template <typename F> inline void targets_in(const int64_t* t, int64_t n, int64_t ignore_index, int64_t v0,
                                             int64_t mc, F&& f) {
  for (int64_t j = 0; j < n; ++j)
    if (t[j] != ignore_index && t[j] >= v0 && t[j] < v0 + mc) f(j, t[j] - v0);
}

// A part's running statistics over its classes, per column of the tile: max m, sum of exp(x - m), and (smoothing)
// d = sum u_c (x_c - m) with u_c = w_c eps / C; U = sum of the u_c so far.
struct Stats {
  float *m, *s, *d;
  float U;
  void reset(int64_t n) {
    std::fill_n(m, n, -std::numeric_limits<float>::infinity());
    std::fill_n(s, n, 0.0f);
    std::fill_n(d, n, 0.0f);
    U = 0;
  }
  // Folds in a block's logits blk [mc, n] (rows ld apart); u = eps / C (0: no smoothing), w the block's class
  // weights or null.
  void add(const float* blk, int64_t ld, int64_t mc, int64_t n, float u, const float* w) {
    using V = vec<float>;
    const float inf = std::numeric_limits<float>::infinity();
    for_chunks<float>(n, [&](int64_t j, int64_t len) {
      V bm = splat(-inf);
      for (int64_t r = 0; r < mc; ++r) bm = vmax(bm, load(blk + r * ld + j, len, -inf));
      const V mo = load(m + j, len, 0.0f), mn = vmax(mo, bm);
      V es{}, ds{};
      for (int64_t r = 0; r < mc; ++r) {
        const V x = load(blk + r * ld + j, len, 0.0f) - mn;
        es += exp(x);
        if (u != 0) ds += x * (w ? u * w[r] : u);
      }
      // A column whose logits so far are all -inf (x - m is NaN there) has an empty sum, and deviations of -inf.
      const auto dead = mn == splat(-inf);
      const V sn = load(s + j, len) * exp(mo - mn) + es;
      store(s + j, dead ? splat(0.0f) : sn, len);
      if (u != 0) {  // the earlier classes' deviations move with the max; U == 0 before the first block
        const V dn = load(d + j, len) + (U != 0 ? (mo - mn) * U : splat(0.0f)) + ds;
        store(d + j, dead ? splat(-inf) : dn, len);
      }
      store(m + j, mn, len);
    });
    if (u != 0)
      for (int64_t r = 0; r < mc; ++r) U += w ? u * w[r] : u;
  }
};

// Floats of the per-thread scratch: a block's logits and either statistics (forward) or W_blk packed and a
// grad_input partial sum (backward).
inline int64_t part_floats(int64_t nt, int64_t D, bool backward) {
  return kClasses * block_ld(nt) + (backward ? packed::packed_size(kClasses, D) + nt * D : 3 * nt);
}

// The tile's x packed twice: as the logits' B into xT (panels of 16 rows of x, each [D][16]) and, for the
// backward's grad_weight, as its B into xD (panels of 16 features, each [n][16]; xD null: not needed).
void pack_tile(const float* x, int64_t D, const Tile& tile, float* xT, float* xD) {
  const float* xs = x + tile.s * D;
  at::parallel_for(0, packed::panels(tile.n), 1, [&](int64_t p0, int64_t p1) {
    const int64_t j0 = p0 * packed::kNR;
    packed::pack(xs + j0 * D, 1, D, D, std::min(tile.n, p1 * packed::kNR) - j0, xT + j0 * D);
  });
  if (xD)
    at::parallel_for(0, packed::panels(D), 1, [&](int64_t p0, int64_t p1) {
      const int64_t f0 = p0 * packed::kNR;
      packed::pack(xs + f0, D, 1, tile.n, std::min(D, p1 * packed::kNR) - f0, xD + f0 * tile.n);
    });
}

void forward(const float* x, const float* w, const float* bias, const int64_t* t, int64_t N, int64_t D, int64_t V,
             const Smooth<float>& p, int64_t ignore_index, int64_t chunk, float* loss, float* m_out,
             float* ls_out) {
  const int64_t nt = std::min(chunk, kRows);
  const Parts parts(V);
  const int64_t per = part_floats(nt, D, false);
  at::Tensor scratch = hugepage_empty({packed::packed_size(D, nt) + nt + parts.n * per}, at::TensorOptions(at::kFloat));
  float* xT = scratch.mutable_data_ptr<float>();
  float* xt = xT + packed::packed_size(D, nt);  // target logits of the tile
  std::vector<Stats> st(parts.n);
  for (int64_t q = 0; q < parts.n; ++q) {
    float* b = xt + nt + q * per + kClasses * block_ld(nt);
    st[q] = Stats{b, b + nt, b + 2 * nt, 0};
  }
  const float u = p.eps > 0 ? p.eps / float(V) : 0.0f;
  for (int64_t s0 = 0; s0 < N; s0 += nt) {
    const Tile tile{s0, std::min(nt, N - s0)};
    const int64_t n = tile.n, ld = block_ld(n);
    const int64_t* ts = t + s0;
    pack_tile(x, D, tile, xT, nullptr);
    parts.run([&](int64_t q) {
      float* blk = xt + nt + q * per;
      st[q].reset(n);
      for (int64_t b = parts.first(q); b < parts.first(q + 1); ++b) {
        const int64_t v0 = b * kClasses, mc = std::min(kClasses, V - v0);
        block_logits(w, bias, D, v0, mc, xT, n, blk, ld);
        targets_in(ts, n, ignore_index, v0, mc, [&](int64_t j, int64_t r) { xt[j] = blk[r * ld + j]; });
        st[q].add(blk, ld, mc, n, u, p.w ? p.w + v0 : nullptr);
      }
    });
    for (int64_t j = 0; j < n; ++j) {  // merge the parts' statistics; then the row's loss
      const int64_t r = s0 + j;
      if (ts[j] == ignore_index) {
        loss[r] = m_out[r] = ls_out[r] = 0;
        continue;
      }
      float M = -std::numeric_limits<float>::infinity(), S = 0, Dv = 0;
      for (const Stats& a : st) M = std::max(M, a.m[j]);
      for (const Stats& a : st) {
        S += a.s[j] * std::exp(a.m[j] - M);
        if (u != 0) Dv += a.d[j] + (a.U != 0 ? (a.m[j] - M) * a.U : 0.0f);
      }
      const float ls = std::log(S);
      loss[r] = index_loss(ls, xt[j] - M, ts[j], Dv, p);
      m_out[r] = M;
      ls_out[r] = ls;
    }
  }
}

// dx (N, D), dw (V, D), db (V,): each null when that gradient is not wanted, and its product is skipped.
void backward(const float* g, const float* x, const float* w, const float* bias, const int64_t* t, const float* m,
              const float* ls, int64_t N, int64_t D, int64_t V, const Smooth<float>& p, int64_t ignore_index,
              int64_t chunk, float* dx, float* dw, float* db) {
  using Vf = vec<float>;
  const int64_t nt = std::min(chunk, kRows);
  const Parts parts(V);
  const int64_t per = part_floats(nt, D, true);
  const int64_t packs = packed::packed_size(D, nt) + packed::packed_size(nt, D);
  // Per column of a tile: max, log-sum, and the gradient's coefficients a (of p_c), b (of w_c) and k (target).
  at::Tensor scratch = hugepage_empty({packs + 6 * nt + parts.n * per}, at::TensorOptions(at::kFloat));
  float* xT = scratch.mutable_data_ptr<float>();
  float* xD = xT + packed::packed_size(D, nt);
  float *cm = xD + packed::packed_size(nt, D), *cl = cm + nt, *ca = cl + nt, *cb = ca + nt, *ck = cb + nt,
        *xt = ck + nt;
  float* part0 = xt + nt;  // then each part's scratch: blk, W_blk packed, its grad_input partial
  auto dx_part = [&](int64_t q) { return part0 + (q + 1) * per - nt * D; };
  const float keep = 1.0f - p.eps, add = p.eps / float(V), inf = std::numeric_limits<float>::infinity();
  for (int64_t s0 = 0; s0 < N; s0 += nt) {
    const Tile tile{s0, std::min(nt, N - s0)};
    const int64_t n = tile.n, ld = block_ld(n);
    const int64_t* ts = t + s0;
    for (int64_t j = 0; j < n; ++j) {  // bwd_index_row's coefficients; an ignored column gets exactly 0
      const bool ign = ts[j] == ignore_index;
      const float kw = ign ? 0.0f : keep * (p.w ? p.w[ts[j]] : 1.0f), gj = ign ? 0.0f : g[s0 + j];
      cm[j] = ign ? inf : m[s0 + j];  // exp(x - inf) = 0
      cl[j] = ign ? 0.0f : ls[s0 + j];
      ca[j] = gj * (kw + add * p.wsum);
      cb[j] = gj * add;
      ck[j] = gj * kw;
    }
    pack_tile(x, D, tile, xT, dw ? xD : nullptr);
    parts.run([&](int64_t q) {
      float* blk = part0 + q * per;
      float* wp = blk + kClasses * block_ld(nt);
      float* dxq = dx_part(q);
      for (int64_t b = parts.first(q); b < parts.first(q + 1); ++b) {
        const int64_t v0 = b * kClasses, mc = std::min(kClasses, V - v0);
        block_logits(w, bias, D, v0, mc, xT, n, blk, ld);
        targets_in(ts, n, ignore_index, v0, mc, [&](int64_t j, int64_t r) { xt[j] = blk[r * ld + j]; });
        for (int64_t r = 0; r < mc; ++r) {  // dl = g (a p - b w_c), in place
          float* row = blk + r * ld;
          // The block's grad_weight rows come from memory next: start them now, under this compute-bound pass
          // (that product: 181 -> 194 GF/s).
          if (dw && s0 > 0)
            for (int64_t f = 0; f < D; f += 16) __builtin_prefetch(dw + (v0 + r) * D + f, 1);
          const float wc = p.w ? p.w[v0 + r] : 1.0f;
          for_chunks<float>(n, [&](int64_t j, int64_t len) {
            const Vf e = exp((load(row + j, len) - load(cm + j, len)) - load(cl + j, len));
            store(row + j, e * load(ca + j, len) - load(cb + j, len) * wc, len);
          });
        }
        targets_in(ts, n, ignore_index, v0, mc, [&](int64_t j, int64_t r) {
          blk[r * ld + j] = target_grad(exp((xt[j] - cm[j]) - cl[j]), ck[j], cb[j], ts[j], p);
        });
        // This block's rows of grad_weight (the first tile stores, later ones add) and grad_bias.
        if (dw) packed::gemm(blk, ld, mc, n, xD, D, dw + v0 * D, D, /*accumulate=*/s0 > 0);
        if (db)
          for (int64_t r = 0; r < mc; ++r) db[v0 + r] = (s0 > 0 ? db[v0 + r] : 0.0f) + sum(blk + r * ld, n);
        // This part's share of grad_input: dl_blk^T . W_blk (the part's first block stores). In slabs of 12 rows,
        // each across all of D: the slab's A (12 x 64) stays in L1 and its C rows stream in order, where the
        // gemm's own order (a panel down all rows) revisits the whole 1 MiB partial per panel (170 -> 183 GF/s).
        if (!dx) continue;
        packed::pack(w + v0 * D, D, 1, mc, D, wp);
        for (int64_t r0 = 0; r0 < n; r0 += 12)
          packed::gemm<true>(blk + r0, ld, std::min<int64_t>(12, n - r0), mc, wp, D, dxq + r0 * D, D,
                             /*accumulate=*/b > parts.first(q));
      }
    });
    if (dx) at::parallel_for(0, n, 16, [&](int64_t j0, int64_t j1) {  // grad_input rows = the parts' sum
      for (int64_t j = j0; j < j1; ++j) {
        float* out = dx + (s0 + j) * D;
        std::copy_n(dx_part(0) + j * D, D, out);
        for (int64_t q = 1; q < parts.n; ++q) {
          const float* in = dx_part(q) + j * D;
          for (int64_t f = 0; f < D; ++f) out[f] += in[f];
        }
      }
    });
  }
}

}  // namespace fused

// ---- linear + cross-entropy: csrc/cross_entropy.h's chunk loop around the rows above.

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_fwd_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const std::optional<at::Tensor>& class_weight, int64_t ignore_index,
    double label_smoothing, int64_t chunk) {
  const int64_t V = check_linear_ce_fwd_args(input, weight, bias, target, class_weight, chunk);
  const at::Tensor t = target.contiguous();
  check_targets(t.const_data_ptr<int64_t>(), t.numel(), V, ignore_index);
  if (fused::wanted(input, V)) {
    const at::Tensor x = input.contiguous(), w = weight.contiguous();
    const std::optional<at::Tensor> b = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : bias;
    const int64_t N = x.size(0);
    at::Tensor loss = at::empty({N}, x.options()), stats = at::empty({2, N}, x.options());
    const Weights<float, float> cw(class_weight, label_smoothing, V);
    fused::forward(x.const_data_ptr<float>(), w.const_data_ptr<float>(), b ? b->const_data_ptr<float>() : nullptr,
                   t.const_data_ptr<int64_t>(), N, x.size(1), V, cw.p, ignore_index, chunk,
                   loss.mutable_data_ptr<float>(), stat_plane<float>(stats, 0), stat_plane<float>(stats, 1));
    return {loss, stats};
  }
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "linear_cross_entropy_fwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    const Weights<scalar_t, A> w(class_weight, label_smoothing, V);
    out = linear_ce_forward(input, weight, bias, t, chunk,
                            [&](const at::Tensor& logits, const at::Tensor& ts, at::Tensor loss, at::Tensor stats) {
      const CeGeometry g{logits.size(0), V, 1};
      ce_fwd_rows<scalar_t>(g, logits.const_data_ptr<scalar_t>(), ts.const_data_ptr<int64_t>(), nullptr, w.p,
                            ignore_index, loss.mutable_data_ptr<A>(), stat_plane<A>(stats, 0), stat_plane<A>(stats, 1));
    }, hugepage_empty);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& target, const std::optional<at::Tensor>& class_weight,
    const at::Tensor& stats, int64_t ignore_index, double label_smoothing, int64_t chunk, std::array<bool, 3> mask) {
  const int64_t V = check_linear_ce_bwd_args(grad_loss, input, weight, bias, target, class_weight, stats, chunk);
  const at::Tensor t = target.contiguous();
  check_targets(t.const_data_ptr<int64_t>(), t.numel(), V, ignore_index);
  if (fused::wanted(input, V)) {
    const at::Tensor x = input.contiguous(), w = weight.contiguous(), g = grad_loss.contiguous(),
                     l = stats.contiguous();
    const std::optional<at::Tensor> b = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : bias;
    const int64_t N = x.size(0), D = x.size(1);
    auto [dx, dw, db] = linear_ce_grads(x, w, mask, x.options(), hugepage_empty);
    const bool bias_grad = mask[2] && b.has_value();
    if (N == 0) dw.zero_();
    if (N == 0 || (!mask[0] && !mask[1] && !bias_grad)) return {dx, dw, db};
    const Weights<float, float> cw(class_weight, label_smoothing, V);
    fused::backward(g.const_data_ptr<float>(), x.const_data_ptr<float>(), w.const_data_ptr<float>(),
                    b ? b->const_data_ptr<float>() : nullptr, t.const_data_ptr<int64_t>(),
                    stat_plane<const float>(l, 0), stat_plane<const float>(l, 1), N, D, V, cw.p, ignore_index,
                    chunk, mask[0] ? dx.mutable_data_ptr<float>() : nullptr,
                    mask[1] ? dw.mutable_data_ptr<float>() : nullptr, bias_grad ? db.mutable_data_ptr<float>() : nullptr);
    return {dx, dw, db};
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "linear_cross_entropy_bwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    const Weights<scalar_t, A> w(class_weight, label_smoothing, V);
    out = linear_ce_backward(grad_loss, input, weight, bias, t, stats, chunk, mask,
                             [&](const at::Tensor& gs, at::Tensor& logits, const at::Tensor& ts, const at::Tensor& ls) {
      const CeGeometry g{logits.size(0), V, 1};
      auto* p = logits.mutable_data_ptr<scalar_t>();
      ce_bwd_rows<scalar_t>(g, gs.const_data_ptr<A>(), p, ts.const_data_ptr<int64_t>(), nullptr, w.p, ignore_index,
                            stat_plane<const A>(ls, 0), stat_plane<const A>(ls, 1), p);
    }, hugepage_empty);
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
