// Flash-style scaled dot-product attention on the CPU, forward and backward.
//
// Forward: one task per (batch*head, block of kBQ queries), spread over cores with at::parallel_for. A task walks
// the keys kBK at a time: S = Q K^T (one BLAS gemm on the tile), scale + masks row by row, online softmax (running
// max m and sum l; the accumulator is rescaled when the max grows), then acc += P V (a second gemm). Memory per
// task is O(kBQ * kBK + kBQ * D), whatever L is; the output is acc / l, and the row's m and log l are saved as the
// two planes of `stats` (their sum would lose log l to ulp(m) at scores of 1e4 and more).
//
// Backward: one task per (batch, kv head), walking key chunks (outer), then the query heads that share the kv head
// (grouped-query attention) and their query blocks (inner). It recomputes P = exp((S - m) - log l) and, with
// delta = rowsum(dO * O), accumulates dV += Pd^T dO, dK += dS^T Q and dQ += dS K, where dS = P * (dP * Z - delta),
// dP = dO V^T and Z the dropout mask (regenerated from the seed). Owning whole heads lets dQ accumulate, and dK /
// dV sum over the group, without atomics or a second recomputing pass. d(attn_mask) = dS, summed over the mask's
// broadcast dims: added in that pass when each task owns its part of the mask, else (a mask shared by the batch
// or by kv heads) in a pass of its own over the mask's rows (mask_grad_pass).
// q, k, v are read through batch / head strides (0 along broadcast dims: an expanded key is not copied); the
// value head dim Dv may differ from the query/key one D.
//
// The tile products go to the BLAS sgemm_/dgemm_ that libtorch exports (MKL in the x86-64 wheels), on raw
// pointers - no tensor objects per tile: at 64 x 256 x 64 a tile is big enough for BLAS to run near peak. Inside
// at::parallel_for's OpenMP region MKL runs single-threaded, as ATen's own flash kernel relies on.
// float16 / bfloat16 inputs are converted to float32 once (O(L * D) memory) and computed in float32.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "attention.h"
#include "cpu/alloc.h"
#include "common.h"
#include "cpu/vec.h"

namespace fastnn::cpu {
namespace {

using attention::Geometry;
using attention::Params;

constexpr int64_t kBQ = 64;   // queries per tile
constexpr int64_t kBK = 256;  // keys per tile

}  // namespace
}  // namespace fastnn::cpu

// Fortran BLAS, which libtorch exports (MKL on x86-64 wheels; ATen's cpublas::gemm wrapper is not exported).
// Weak, so a torch without them still loads and takes the plain loop below.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace fastnn::cpu {
namespace {

template <typename A>
void gemm_fallback(bool ta, bool tb, int64_t M, int64_t N, int64_t K, A alpha, const A* a, int64_t lda,
                   const A* b, int64_t ldb, A beta, A* c, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    A* cr = c + i * ldc;
    for (int64_t j = 0; j < N; ++j) cr[j] = beta == A(0) ? A(0) : cr[j] * beta;
    for (int64_t kk = 0; kk < K; ++kk) {
      const A aik = alpha * (ta ? a[kk * lda + i] : a[i * lda + kk]);
      if (tb) {
        for (int64_t j = 0; j < N; ++j) cr[j] += aik * b[j * ldb + kk];
      } else {
        const A* br = b + kk * ldb;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) cr[j] += aik * br[j];
      }
    }
  }
}

// Row-major C (M x N) = alpha * op(A) op(B) + beta * C, through column-major BLAS: C^T = op(B)^T op(A)^T.
template <typename A>
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, A alpha, const A* a, int64_t lda, const A* b,
          int64_t ldb, A beta, A* c, int64_t ldc) {
  if (M == 0 || N == 0) return;
  const char tA = ta ? 'T' : 'N', tB = tb ? 'T' : 'N';
  const int m = int(N), n = int(M), k = int(K), la = int(ldb), lb = int(lda), lc = int(ldc);
  if constexpr (std::is_same_v<A, float>) {
    if (sgemm_) return sgemm_(&tB, &tA, &m, &n, &k, &alpha, b, &la, a, &lb, &beta, c, &lc);
  } else {
    if (dgemm_) return dgemm_(&tB, &tA, &m, &n, &k, &alpha, b, &la, a, &lb, &beta, c, &lc);
  }
  gemm_fallback(ta, tb, M, N, K, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Scores of query i against keys j0..j0+n (s holds q.k): scale, add the mask, -inf for padded and future keys.
template <typename A>
void finish_scores(const Params<A>& p, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n, A* s) {
  constexpr A ninf = -std::numeric_limits<A>::infinity();
  const A sc = p.scale;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] *= sc;
  if (p.mask) {  // a -inf entry masks the key whatever its score (an overflowed +inf would give NaN)
    const A* mr = p.mask + b * p.smb + h * p.smh + i * p.smm + j0 * p.smn;
    if (p.smn == 1) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) s[j] = mr[j] == ninf ? ninf : s[j] + mr[j];
    } else {
      for (int64_t j = 0; j < n; ++j) s[j] = mr[j * p.smn] == ninf ? ninf : s[j] + mr[j * p.smn];
    }
  }
  if (p.kpm) {
    const bool* pr = p.kpm + b * p.Lk + j0;
    for (int64_t j = 0; j < n; ++j) s[j] = pr[j] ? ninf : s[j];
  }
  if (p.causal) {
    for (int64_t j = std::max<int64_t>(0, i - j0 + 1); j < n; ++j) s[j] = ninf;
  }
}

template <typename A>
void attention_fwd_impl(const Params<A>& p, const A* q, const A* k, const A* v, A* o, A* stats) {
  const Geometry& g = p;
  A *row_max = stats, *logl = stats + g.query_rows();  // the two planes of stats
  const int64_t D = g.D, Dv = g.Dv, nqb = (g.Lq + kBQ - 1) / kBQ;
  at::parallel_for(0, g.B * g.H * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> S(kBQ * kBK), acc(kBQ * Dv), m(kBQ), l(kBQ);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / nqb, i0 = (t % nqb) * kBQ, mq = std::min(kBQ, g.Lq - i0);
      const int64_t b = bh / g.H, h = bh % g.H, hk = h / g.group();
      const A* Q = q + b * p.qsb + h * p.qsh + i0 * D;
      const A *K = k + b * p.ksb + hk * p.ksh, *V = v + b * p.vsb + hk * p.vsh;
      std::fill(m.begin(), m.end(), -std::numeric_limits<A>::infinity());
      std::fill(l.begin(), l.end(), A(0));
      std::fill(acc.begin(), acc.end(), A(0));
      const int64_t kend = p.causal ? std::min(g.Lk, i0 + mq) : g.Lk;
      for (int64_t j0 = 0; j0 < kend; j0 += kBK) {
        const int64_t n = std::min(kBK, kend - j0);
        gemm<A>(false, true, mq, n, D, A(1), Q, D, K + j0 * D, D, A(0), S.data(), n);
        for (int64_t r = 0; r < mq; ++r) {
          A* s = S.data() + r * n;
          const int64_t i = i0 + r;
          finish_scores(p, b, h, i, j0, n, s);
          const A mnew = std::max(m[r], max_of(s, n));
          const A msafe = mnew == -std::numeric_limits<A>::infinity() ? A(0) : mnew;  // nothing unmasked yet
          const A alpha = exp(m[r] - msafe);
          l[r] = l[r] * alpha + sum_exp<A, true>(s, msafe, s, n);
          m[r] = mnew;
          if (alpha != A(1)) {
            A* ar = acc.data() + r * Dv;
#pragma omp simd
            for (int64_t d = 0; d < Dv; ++d) ar[d] *= alpha;
          }
          if (p.dropout) {
            const int64_t row = bh * g.Lq + i;
            for (int64_t j = 0; j < n; ++j)
              s[j] = attention::dropout_keep(p.seed, row, j0 + j, p.thresh) ? s[j] * p.drop_scale : A(0);
          }
        }
        gemm<A>(false, false, mq, Dv, n, A(1), S.data(), n, V + j0 * Dv, Dv, A(1), acc.data(), Dv);
      }
      for (int64_t r = 0; r < mq; ++r) {
        A* orow = o + (bh * g.Lq + i0 + r) * Dv;
        const A* ar = acc.data() + r * Dv;
        const int64_t row = bh * g.Lq + i0 + r;
        if (l[r] == A(0)) {  // every key masked: zeros, and m = +inf makes the backward's P zero
          std::fill(orow, orow + Dv, A(0));
          row_max[row] = std::numeric_limits<A>::infinity();
          logl[row] = A(0);
        } else {
          const A inv = A(1) / l[r];
#pragma omp simd
          for (int64_t d = 0; d < Dv; ++d) orow[d] = ar[d] * inv;
          row_max[row] = m[r];
          logl[row] = std::log(l[r]);
        }
      }
    }
  });
}

// What the backward reads of one query head (b, h): its q, dO, o rows, its kv head's k, v and its statistics.
template <typename A> struct Head {
  int64_t b, h, bh;
  const A *Q, *dO, *O, *K, *V, *m, *logl;
};

template <typename A>
Head<A> head(const Params<A>& p, const A* q, const A* k, const A* v, const A* o, const A* dO, const A* stats,
             int64_t b, int64_t h) {
  const Geometry& g = p;
  const int64_t bh = b * g.H + h, hk = h / g.group();
  return {b, h, bh, q + b * p.qsb + h * p.qsh, dO + bh * g.Lq * g.Dv, o + bh * g.Lq * g.Dv,
          k + b * p.ksb + hk * p.ksh, v + b * p.vsb + hk * p.vsh, stats + bh * g.Lq,
          stats + g.query_rows() + bh * g.Lq};
}

// One tile of the backward: queries i0..i0+mq of head hd against keys j0..j0+n. P becomes the dropped
// probabilities Pd (for dV), dS the score gradient P * (dP * Z - delta) (for dQ, dK and the mask), both (mq, n);
// delta holds rowsum(dO * O) of the tile's rows.
template <typename A>
void probs_and_dscores(const Params<A>& p, const Head<A>& hd, const A* delta, int64_t i0, int64_t mq, int64_t j0,
                       int64_t n, A* P, A* dS) {
  const Geometry& g = p;
  const int64_t D = g.D, Dv = g.Dv;
  gemm<A>(false, true, mq, n, D, A(1), hd.Q + i0 * D, D, hd.K + j0 * D, D, A(0), P, n);
  gemm<A>(false, true, mq, n, Dv, A(1), hd.dO + i0 * Dv, Dv, hd.V + j0 * Dv, Dv, A(0), dS, n);
  for (int64_t r = 0; r < mq; ++r) {
    const int64_t i = i0 + r;
    A *pr = P + r * n, *dr = dS + r * n;
    if (hd.m[i] == std::numeric_limits<A>::infinity()) {  // every key masked: P = dS = 0 (0 * dP is NaN
      std::fill(pr, pr + n, A(0));                         // where dO V overflows)
      std::fill(dr, dr + n, A(0));
      continue;
    }
    finish_scores(p, hd.b, hd.h, i, j0, n, pr);
    const vec<A> mi = splat(hd.m[i]), li = splat(hd.logl[i]), di = splat(delta[r]);
    if (!p.dropout) {
      for_chunks<A>(n, [&](int64_t j, int64_t len) {
        const vec<A> pv = exp((load(pr + j, len) - mi) - li);
        store(pr + j, pv, len);
        store(dr + j, pv * (load(dr + j, len) - di), len);
      });
    } else {
      const int64_t row = hd.bh * g.Lq + i;
      for (int64_t j = 0; j < n; ++j) {
        const A pv = exp((pr[j] - hd.m[i]) - hd.logl[i]);
        const bool keep = attention::dropout_keep(p.seed, row, j0 + j, p.thresh);
        pr[j] = keep ? pv * p.drop_scale : A(0);
        dr[j] = pv * ((keep ? dr[j] * p.drop_scale : A(0)) - delta[r]);
      }
    }
  }
}

// rowsum(dO * O) of rows i0..i0+mq of head hd into delta.
template <typename A> void row_deltas(const Geometry& g, const Head<A>& hd, int64_t i0, int64_t mq, A* delta) {
  for (int64_t r = 0; r < mq; ++r) delta[r] = dot(hd.dO + (i0 + r) * g.Dv, hd.O + (i0 + r) * g.Dv, g.Dv);
}

// dmask += dS of one tile, through the mask gradient's strides (0 along broadcast dims: summed there).
template <typename A>
void add_dmask(const Params<A>& p, const Head<A>& hd, int64_t i0, int64_t mq, int64_t j0, int64_t n, const A* dS) {
  A* base = p.dmask + hd.b * p.dmb + hd.h * p.dmh + j0 * p.dmn;
  for (int64_t r = 0; r < mq; ++r) {
    A* row = base + (i0 + r) * p.dmm;
    const A* dr = dS + r * n;
    if (p.dmn == 1) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) row[j] += dr[j];
    } else {
      A s = 0;
      for (int64_t j = 0; j < n; ++j) s += dr[j];
      row[0] += s;
    }
  }
}

// Whether two backward tasks (one per (b, kv head)) can reach one element of the mask gradient: then it is
// summed by mask_grad_pass instead, whose tasks own disjoint parts of it.
template <typename A> bool mask_grad_shared(const Params<A>& p) {
  const Geometry& g = p;
  return (p.dmb == 0 && g.B > 1) || (p.dmh == 0 && g.Hk > 1);
}

template <typename A>
void attention_bwd_impl(const Params<A>& p, const A* q, const A* k, const A* v, const A* o, const A* dO,
                        const A* stats, A* dq, A* dk, A* dv) {
  const Geometry& g = p;
  const int64_t D = g.D, Dv = g.Dv, G = g.group();
  const bool dmask_here = p.dmask && !mask_grad_shared(p);
  // One task per (batch, kv head): it owns dK / dV of that head and dQ of the G query heads that read it.
  at::parallel_for(0, g.B * g.Hk, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> P(kBQ * kBK), dS(kBQ * kBK), dKc(kBK * D), dVc(kBK * Dv), delta(G * g.Lq);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / g.Hk, hk = t % g.Hk;
      for (int64_t x = 0; x < G; ++x) {
        const Head<A> hd = head(p, q, k, v, o, dO, stats, b, hk * G + x);
        std::fill(dq + hd.bh * g.Lq * D, dq + (hd.bh + 1) * g.Lq * D, A(0));
        row_deltas(g, hd, 0, g.Lq, delta.data() + x * g.Lq);
      }
      for (int64_t j0 = 0; j0 < g.Lk; j0 += kBK) {
        const int64_t n = std::min(kBK, g.Lk - j0);
        std::fill(dKc.begin(), dKc.begin() + n * D, A(0));
        std::fill(dVc.begin(), dVc.begin() + n * Dv, A(0));
        for (int64_t x = 0; x < G; ++x) {
          const Head<A> hd = head(p, q, k, v, o, dO, stats, b, hk * G + x);
          A* dQh = dq + hd.bh * g.Lq * D;
          // Causal: queries before j0 see none of these keys.
          for (int64_t i0 = p.causal ? (j0 / kBQ) * kBQ : 0; i0 < g.Lq; i0 += kBQ) {
            const int64_t mq = std::min(kBQ, g.Lq - i0);
            probs_and_dscores(p, hd, delta.data() + x * g.Lq + i0, i0, mq, j0, n, P.data(), dS.data());
            if (dmask_here) add_dmask(p, hd, i0, mq, j0, n, dS.data());
            gemm<A>(true, false, n, Dv, mq, A(1), P.data(), n, hd.dO + i0 * Dv, Dv, A(1), dVc.data(), Dv);
            gemm<A>(true, false, n, D, mq, A(1), dS.data(), n, hd.Q + i0 * D, D, A(1), dKc.data(), D);
            gemm<A>(false, false, mq, D, n, p.scale, dS.data(), n, hd.K + j0 * D, D, A(1), dQh + i0 * D, D);
          }
        }
        A *dKh = dk + (t * g.Lk + j0) * D, *dVh = dv + (t * g.Lk + j0) * Dv;
        for (int64_t x = 0; x < n * D; ++x) dKh[x] = dKc[x] * p.scale;
        std::copy(dVc.begin(), dVc.begin() + n * Dv, dVh);
      }
    }
  });
}

// The mask gradient where backward tasks would share its elements (a mask broadcast over the batch or the kv
// heads): a pass of its own that recomputes dS, one task per block of rows of the mask's own shape, each summing
// every (b, h, query row) that maps there - deterministic, no atomics, no memory beyond the mask gradient.
template <typename A>
void mask_grad_pass(const Params<A>& p, const A* q, const A* k, const A* v, const A* o, const A* dO,
                    const A* stats) {
  const Geometry& g = p;
  const int64_t Bm = p.dmb ? g.B : 1, Hm = p.dmh ? g.H : 1, Lqm = p.dmm ? g.Lq : 1;
  const int64_t nrb = (Lqm + kBQ - 1) / kBQ;
  at::parallel_for(0, Bm * Hm * nrb, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> P(kBQ * kBK), dS(kBQ * kBK), delta(kBQ);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bm = t / (Hm * nrb), hm = (t / nrb) % Hm, rb = t % nrb;
      // query rows of this task: a block of kBQ, or all of them when the mask is broadcast over queries
      const int64_t ilo = p.dmm ? rb * kBQ : 0, ihi = p.dmm ? std::min(g.Lq, ilo + kBQ) : g.Lq;
      for (int64_t b = p.dmb ? bm : 0; b < (p.dmb ? bm + 1 : g.B); ++b) {
        for (int64_t h = p.dmh ? hm : 0; h < (p.dmh ? hm + 1 : g.H); ++h) {
          const Head<A> hd = head(p, q, k, v, o, dO, stats, b, h);
          for (int64_t i0 = ilo; i0 < ihi; i0 += kBQ) {
            const int64_t mq = std::min(kBQ, ihi - i0);
            row_deltas(g, hd, i0, mq, delta.data());
            const int64_t kend = p.causal ? std::min(g.Lk, i0 + mq) : g.Lk;
            for (int64_t j0 = 0; j0 < kend; j0 += kBK) {
              const int64_t n = std::min(kBK, kend - j0);
              probs_and_dscores(p, hd, delta.data(), i0, mq, j0, n, P.data(), dS.data());
              add_dmask(p, hd, i0, mq, j0, n, dS.data());
            }
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& query, const at::Tensor& key,
                                                     const at::Tensor& value,
                                                     const std::optional<at::Tensor>& attn_mask,
                                                     const std::optional<at::Tensor>& key_padding_mask,
                                                     double dropout_p, bool is_causal, double scale, int64_t seed) {
  const Geometry g = attention::check_args(query, key, value, attn_mask, key_padding_mask, dropout_p);
  const auto cdt = attention::acc_type(query.scalar_type());  // the compute dtype: float32 for half types
  const at::Tensor q = attention::kernel_operand(query, cdt), k = attention::kernel_operand(key, cdt),
                   v = attention::kernel_operand(value, cdt);
  const auto kpm = attention::contiguous_kpm(key_padding_mask);
  // Outputs from the caching allocator (cpu/alloc.h): a training loop's per-step buffers are faulted in once.
  at::Tensor out = cached_empty({g.B, g.H, g.Lq, g.Dv}, q.options());
  at::Tensor stats = cached_empty({2, g.B, g.H, g.Lq}, q.options());
  if (g.Lk == 0) {  // nothing to attend to anywhere
    out.zero_();
    attention::fill_no_keys_stats(stats);
  } else if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_fwd_cpu", [&] {
      const auto p =
          attention::make_params<scalar_t>(g, q, k, v, attn_mask, kpm, dropout_p, is_causal, scale, seed);
      attention_fwd_impl<scalar_t>(p, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                   v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                   stats.mutable_data_ptr<scalar_t>());
    });
  }
  return {out.to(query.scalar_type()), stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& stats, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& key_padding_mask, double dropout_p, bool is_causal, double scale,
    int64_t seed, bool mask_grad) {
  const Geometry g = attention::check_bwd_args(grad_out, query, key, value, out, stats, attn_mask,
                                               key_padding_mask, dropout_p, mask_grad);
  const auto cdt = attention::acc_type(query.scalar_type());
  const at::Tensor q = attention::kernel_operand(query, cdt), k = attention::kernel_operand(key, cdt),
                   v = attention::kernel_operand(value, cdt), o = out.to(cdt).contiguous(),
                   dO = grad_out.to(cdt).contiguous(), row_stats = stats.contiguous();
  const auto kpm = attention::contiguous_kpm(key_padding_mask);
  at::Tensor dq = cached_empty({g.B, g.H, g.Lq, g.D}, q.options());
  at::Tensor dk = cached_empty({g.B, g.Hk, g.Lk, g.D}, q.options()).zero_();
  at::Tensor dv = cached_empty({g.B, g.Hk, g.Lk, g.Dv}, q.options()).zero_();
  at::Tensor dmask = attention::mask_grad_buffer(attn_mask, mask_grad, q.options());
  if (dq.numel() == 0 || g.Lk == 0) {
    dq.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_bwd_cpu", [&] {
      const auto p = attention::make_params<scalar_t>(g, q, k, v, attn_mask, kpm, dropout_p, is_causal, scale,
                                                      seed, &dmask);
      const scalar_t *qp = q.const_data_ptr<scalar_t>(), *kp = k.const_data_ptr<scalar_t>(),
                     *vp = v.const_data_ptr<scalar_t>(), *op = o.const_data_ptr<scalar_t>(),
                     *gp = dO.const_data_ptr<scalar_t>(), *sp = row_stats.const_data_ptr<scalar_t>();
      attention_bwd_impl<scalar_t>(p, qp, kp, vp, op, gp, sp, dq.mutable_data_ptr<scalar_t>(),
                                   dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>());
      if (p.dmask && mask_grad_shared(p)) mask_grad_pass<scalar_t>(p, qp, kp, vp, op, gp, sp);
    });
  }
  const auto t = query.scalar_type();
  return {dq.to(t), dk.to(t), dv.to(t), dmask};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnn, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace fastnn::cpu
