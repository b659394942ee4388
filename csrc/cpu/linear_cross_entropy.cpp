// Linear + cross-entropy on the CPU: cross_entropy(x W^T + b, t) without the (N, V) logits.
//
// The general path is the chunk loop of csrc/linear_cross_entropy.h around the cross-entropy rows
// (csrc/cpu/cross_entropy_rows.h): four products per chunk on the BLAS - the logits x W^T twice (forward, and
// recomputed in the backward), grad_input dl W and grad_weight dl^T x - each through memory, since a chunk's
// logits (128 MiB) do not fit in cache. The products are nearly all of the op's time, so the fourth one, the
// recompute, costs about what keeping the logits out of memory saves against torch's three.
//
// float32 with AVX2 takes the fused kernel below instead (namespace fused), with no (rows, V) logits buffer at
// all. The threads take blocks of kClasses classes; a block's logits for a tile of rows (64 x 512 floats, 128 KiB)
// stay in L2 from the product that makes them to the products that consume their gradient, and every product runs
// on packed::gemm with the big operand (W) in place and only the tile of x packed: W_blk x^T, then the block's
// share of grad_weight (its own rows: no race) and of grad_input (a per-thread sum), each as fast as the BLAS on
// the chunk loop's operands or faster (docs/measurements.md). The forward keeps per-column online-softmax
// statistics per thread and merges them at the end of a tile.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common.h"
#include "cpu/alloc.h"
#include "cpu/cross_entropy_rows.h"
#include "cpu/gemm.h"
#include "cpu/vec.h"
#include "linear_cross_entropy.h"

namespace fastnn::cpu {
namespace {

namespace fused {

constexpr int64_t kClasses = 64;  // classes per block
// Rows per tile (fewer when the op's chunk is smaller). grad_input's product adds into a thread's (rows x D)
// partial once per block, so the partial should stay near the size of L2: with 1024 rows that product ran slower,
// and the other two products were no faster (docs/measurements.md).
constexpr int64_t kRows = 512;

// The row stride of a block's logits: padded past a multiple of 1024 bytes so that walking down a column (the
// transposed product's A) does not map every row to the same L1 set (docs/measurements.md).
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


// Runs lay(take) twice: first to count the floats it takes, then to hand out consecutive pieces of one huge-page
// buffer of that many floats, which it returns (the pieces live as long as the buffer).
template <typename F> at::Tensor carve(F&& lay) {
  int64_t total = 0;
  lay([&](int64_t n) -> float* {
    total += n;
    return nullptr;
  });
  at::Tensor buf = cached_empty({total}, at::TensorOptions(at::kFloat));
  float* next = buf.mutable_data_ptr<float>();
  lay([&](int64_t n) {
    float* piece = next;
    next += n;
    return piece;
  });
  return buf;
}

// The forward's scratch for tiles of up to nt rows.
struct ForwardScratch {
  float* xT;                // the tile's x packed as the logits' B (pack_tile)
  float* xt;                // each column's target logit
  std::vector<float*> blk;  // per part: a block's logits [kClasses][block_ld(nt)]
  std::vector<Stats> st;    // per part: its running statistics over its classes
  at::Tensor buf;
  ForwardScratch(int64_t nt, int64_t D, int64_t parts) : blk(parts), st(parts) {
    buf = carve([&](auto take) {
      xT = take(packed::packed_size(D, nt));
      xt = take(nt);
      for (int64_t q = 0; q < parts; ++q) {
        blk[q] = take(kClasses * block_ld(nt));
        st[q].m = take(nt);
        st[q].s = take(nt);
        st[q].d = take(nt);
      }
    });
  }
};

// The backward's scratch for tiles of up to nt rows.
struct BackwardScratch {
  float *xT, *xD;  // the tile's x packed as the logits' B and as grad_weight's B (pack_tile)
  // Per column of the tile: the row's max m and log-sum ls (stat_plane; an ignored column gets +inf and 0, so that
  // its p = exp(x - inf) = 0), the gradient's coefficients a (of p_c), b (of w_c) and k (the target's entry), and
  // the target's logit.
  float *m, *ls, *a, *b, *k, *xt;
  struct Part {
    float* blk;  // a block's logits, then their gradient [kClasses][block_ld(nt)]
    float* wp;   // the block's rows of W packed, grad_input's B
    float* dx;   // the part's grad_input partial sum [nt][D]
  };
  std::vector<Part> part;  // per part (thread)
  at::Tensor buf;
  BackwardScratch(int64_t nt, int64_t D, int64_t parts) : part(parts) {
    buf = carve([&](auto take) {
      xT = take(packed::packed_size(D, nt));
      xD = take(packed::packed_size(nt, D));
      for (float** column : {&m, &ls, &a, &b, &k, &xt}) *column = take(nt);
      for (Part& q : part) {
        q.blk = take(kClasses * block_ld(nt));
        q.wp = take(packed::packed_size(kClasses, D));
        q.dx = take(nt * D);
      }
    });
  }
};

void forward(const float* x, const float* w, const float* bias, const int64_t* t, int64_t N, int64_t D, int64_t V,
             const Smooth<float>& p, int64_t ignore_index, int64_t chunk, float* loss, float* m_out,
             float* ls_out) {
  const int64_t nt = std::min(chunk, kRows);
  const Parts parts(V);
  ForwardScratch sc(nt, D, parts.n);
  const float u = p.eps > 0 ? p.eps / float(V) : 0.0f;
  for (int64_t s0 = 0; s0 < N; s0 += nt) {
    const Tile tile{s0, std::min(nt, N - s0)};
    const int64_t n = tile.n, ld = block_ld(n);
    const int64_t* ts = t + s0;
    pack_tile(x, D, tile, sc.xT, nullptr);
    parts.run([&](int64_t q) {
      float* blk = sc.blk[q];
      sc.st[q].reset(n);
      for (int64_t b = parts.first(q); b < parts.first(q + 1); ++b) {
        const int64_t v0 = b * kClasses, mc = std::min(kClasses, V - v0);
        block_logits(w, bias, D, v0, mc, sc.xT, n, blk, ld);
        targets_in(ts, n, ignore_index, v0, mc, [&](int64_t j, int64_t r) { sc.xt[j] = blk[r * ld + j]; });
        sc.st[q].add(blk, ld, mc, n, u, p.w ? p.w + v0 : nullptr);
      }
    });
    for (int64_t j = 0; j < n; ++j) {  // merge the parts' statistics; then the row's loss
      const int64_t r = s0 + j;
      if (ts[j] == ignore_index) {
        loss[r] = m_out[r] = ls_out[r] = 0;
        continue;
      }
      float M = -std::numeric_limits<float>::infinity(), S = 0, Dv = 0;
      for (const Stats& a : sc.st) M = std::max(M, a.m[j]);
      for (const Stats& a : sc.st) {
        S += a.s[j] * std::exp(a.m[j] - M);
        if (u != 0) Dv += a.d[j] + (a.U != 0 ? (a.m[j] - M) * a.U : 0.0f);
      }
      const float ls = std::log(S);
      loss[r] = index_loss(ls, sc.xt[j] - M, ts[j], Dv, p);
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
  BackwardScratch sc(nt, D, parts.n);
  const float keep = 1.0f - p.eps, add = p.eps / float(V), inf = std::numeric_limits<float>::infinity();
  for (int64_t s0 = 0; s0 < N; s0 += nt) {
    const Tile tile{s0, std::min(nt, N - s0)};
    const int64_t n = tile.n, ld = block_ld(n);
    const int64_t* ts = t + s0;
    for (int64_t j = 0; j < n; ++j) {  // bwd_index_row's coefficients; an ignored column gets exactly 0
      const bool ign = ts[j] == ignore_index;
      const float kw = ign ? 0.0f : keep * (p.w ? p.w[ts[j]] : 1.0f), gj = ign ? 0.0f : g[s0 + j];
      sc.m[j] = ign ? inf : m[s0 + j];
      sc.ls[j] = ign ? 0.0f : ls[s0 + j];
      sc.a[j] = gj * (kw + add * p.wsum);
      sc.b[j] = gj * add;
      sc.k[j] = gj * kw;
    }
    pack_tile(x, D, tile, sc.xT, dw ? sc.xD : nullptr);
    parts.run([&](int64_t q) {
      const BackwardScratch::Part& part = sc.part[q];
      float* blk = part.blk;
      for (int64_t b = parts.first(q); b < parts.first(q + 1); ++b) {
        const int64_t v0 = b * kClasses, mc = std::min(kClasses, V - v0);
        block_logits(w, bias, D, v0, mc, sc.xT, n, blk, ld);
        targets_in(ts, n, ignore_index, v0, mc, [&](int64_t j, int64_t r) { sc.xt[j] = blk[r * ld + j]; });
        for (int64_t r = 0; r < mc; ++r) {  // dl = g (a p - b w_c), in place
          float* row = blk + r * ld;
          // The block's grad_weight rows come from memory next: start them now, under this compute-bound pass
          // (docs/measurements.md).
          if (dw && s0 > 0)
            for (int64_t f = 0; f < D; f += 16) __builtin_prefetch(dw + (v0 + r) * D + f, 1);
          const float wc = p.w ? p.w[v0 + r] : 1.0f;
          for_chunks<float>(n, [&](int64_t j, int64_t len) {
            const Vf e = exp((load(row + j, len) - load(sc.m + j, len)) - load(sc.ls + j, len));
            store(row + j, e * load(sc.a + j, len) - load(sc.b + j, len) * wc, len);
          });
        }
        targets_in(ts, n, ignore_index, v0, mc, [&](int64_t j, int64_t r) {
          blk[r * ld + j] = target_grad(exp((sc.xt[j] - sc.m[j]) - sc.ls[j]), sc.k[j], sc.b[j], ts[j], p);
        });
        // This block's rows of grad_weight (the first tile stores, later ones add) and grad_bias.
        if (dw) packed::gemm(blk, ld, mc, n, sc.xD, D, dw + v0 * D, D, /*accumulate=*/s0 > 0);
        if (db)
          for (int64_t r = 0; r < mc; ++r) db[v0 + r] = (s0 > 0 ? db[v0 + r] : 0.0f) + sum(blk + r * ld, n);
        // This part's share of grad_input: dl_blk^T . W_blk (the part's first block stores). In slabs of 12 rows,
        // each across all of D: the slab's A (12 x 64) stays in L1 and its C rows stream in order, where the
        // gemm's own order (a panel down all rows) revisits the whole 1 MiB partial per panel
        // (docs/measurements.md).
        if (!dx) continue;
        packed::pack(w + v0 * D, D, 1, mc, D, part.wp);
        for (int64_t r0 = 0; r0 < n; r0 += 12)
          packed::gemm<true>(blk + r0, ld, std::min<int64_t>(12, n - r0), mc, part.wp, D, part.dx + r0 * D, D,
                             /*accumulate=*/b > parts.first(q));
      }
    });
    if (dx) at::parallel_for(0, n, 16, [&](int64_t j0, int64_t j1) {  // grad_input rows = the parts' sum
      for (int64_t j = j0; j < j1; ++j) {
        float* out = dx + (s0 + j) * D;
        std::copy_n(sc.part[0].dx + j * D, D, out);
        for (int64_t q = 1; q < parts.n; ++q) {
          const float* in = sc.part[q].dx + j * D;
          for (int64_t f = 0; f < D; ++f) out[f] += in[f];
        }
      }
    });
  }
}

}  // namespace fused

// The cross-entropy rows on one chunk's logits, as csrc/linear_cross_entropy.h's chunk loops call them: fwd writes
// the chunk's loss and statistics, bwd overwrites the logits with their gradient.
template <typename scalar_t> struct ChunkRows {
  using A = acc_t<scalar_t>;
  Weights<scalar_t, A> w;
  int64_t V, ignore_index;
  ChunkRows(const std::optional<at::Tensor>& class_weight, double label_smoothing, int64_t V, int64_t ignore_index)
      : w(class_weight, label_smoothing, V), V(V), ignore_index(ignore_index) {}
  void fwd(const at::Tensor& logits, const at::Tensor& ts, at::Tensor loss, at::Tensor stats) const {
    ce_fwd_rows<scalar_t>(CeGeometry{logits.size(0), V, 1}, logits.const_data_ptr<scalar_t>(),
                          ts.const_data_ptr<int64_t>(), nullptr, w.p, ignore_index, loss.mutable_data_ptr<A>(),
                          stat_plane<A>(stats, 0), stat_plane<A>(stats, 1));
  }
  void bwd(const at::Tensor& gs, at::Tensor& logits, const at::Tensor& ts, const at::Tensor& st) const {
    auto* p = logits.mutable_data_ptr<scalar_t>();
    ce_bwd_rows<scalar_t>(CeGeometry{logits.size(0), V, 1}, gs.const_data_ptr<A>(), p, ts.const_data_ptr<int64_t>(),
                          nullptr, w.p, ignore_index, stat_plane<const A>(st, 0), stat_plane<const A>(st, 1), p);
  }
};

// The ops: the fused kernel where fused::wanted, else csrc/linear_cross_entropy.h's chunk loop around the
// cross-entropy rows.

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
    const ChunkRows<scalar_t> rows(class_weight, label_smoothing, V, ignore_index);
    out = linear_ce_forward(input, weight, bias, t, chunk, [&](auto&&... a) { rows.fwd(a...); }, cached_empty);
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
                     st = stats.contiguous();
    const std::optional<at::Tensor> b = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : bias;
    const int64_t N = x.size(0), D = x.size(1);
    auto [dx, dw, db] = linear_ce_grads(x, w, mask, x.options(), cached_empty);
    const bool bias_grad = mask[2] && b.has_value();
    if (N == 0) dw.zero_();
    if (N == 0 || (!mask[0] && !mask[1] && !bias_grad)) return {dx, dw, db};
    const Weights<float, float> cw(class_weight, label_smoothing, V);
    fused::backward(g.const_data_ptr<float>(), x.const_data_ptr<float>(), w.const_data_ptr<float>(),
                    b ? b->const_data_ptr<float>() : nullptr, t.const_data_ptr<int64_t>(),
                    stat_plane<const float>(st, 0), stat_plane<const float>(st, 1), N, D, V, cw.p, ignore_index,
                    chunk, mask[0] ? dx.mutable_data_ptr<float>() : nullptr,
                    mask[1] ? dw.mutable_data_ptr<float>() : nullptr,
                    bias_grad ? db.mutable_data_ptr<float>() : nullptr);
    return {dx, dw, db};
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "linear_cross_entropy_bwd_cpu", [&] {
    const ChunkRows<scalar_t> rows(class_weight, label_smoothing, V, ignore_index);
    out = linear_ce_backward(grad_loss, input, weight, bias, t, stats, chunk, mask,
                             [&](auto&&... a) { rows.bwd(a...); }, cached_empty);
  });
  return out;
}

// Always the chunk loop: the fused kernel splits a row's classes over the threads, so no thread has a row's
// statistics before the row's last product, which the gradient needs.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd_grad_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const std::optional<at::Tensor>& class_weight, const at::Tensor& grad_loss,
    int64_t ignore_index, double label_smoothing, int64_t chunk, std::array<bool, 3> mask) {
  const int64_t V = check_linear_ce_fwd_grad_args(input, weight, bias, target, class_weight, grad_loss, chunk);
  const at::Tensor t = target.contiguous();
  check_targets(t.const_data_ptr<int64_t>(), t.numel(), V, ignore_index);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "linear_cross_entropy_fwd_grad_cpu",
                                  [&] {
    const ChunkRows<scalar_t> rows(class_weight, label_smoothing, V, ignore_index);
    out = linear_ce_forward_grad(grad_loss, input, weight, bias, t, chunk, mask, [&](auto&&... a) { rows.fwd(a...); },
                                 [&](auto&&... a) { rows.bwd(a...); }, cached_empty);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnn, CPU, m) {
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd_cpu);
  m.impl("linear_cross_entropy_bwd", &linear_cross_entropy_bwd_cpu);
  m.impl("linear_cross_entropy_fwd_grad", &linear_cross_entropy_fwd_grad_cpu);
}

}  // namespace fastnn::cpu
