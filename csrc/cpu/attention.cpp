// Flash-style scaled dot-product attention on the CPU, forward and backward.
//
// Forward: one task per (batch*head, block of kBQ queries), spread over cores with at::parallel_for. A task walks
// the keys kBK at a time: S = Q K^T (one BLAS gemm on the tile), scale + masks row by row, online softmax (running
// max m and sum l; the accumulator is rescaled when the max grows), then acc += P V (a second gemm). Memory per
// task is O(kBQ * kBK + kBQ * D), whatever L is; the output is acc / l, and the row's m and log l are saved as the
// two planes of `stats` (their sum would lose log l to ulp(m) at scores of 1e4 and more).
//
// Backward: one task per batch*head, walking key chunks (outer) and query blocks (inner). It recomputes
// P = exp((S - m) - log l) and, with delta = rowsum(dO * O), accumulates dV += Pd^T dO, dK += dS^T Q and dQ += dS K,
// where dS = P * (dP * Z - delta), dP = dO V^T and Z the dropout mask (regenerated from the seed). Owning a whole
// head lets dQ accumulate without atomics or a second recomputing pass.
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
  const int64_t D = g.D, nqb = (g.Lq + kBQ - 1) / kBQ;
  at::parallel_for(0, g.B * g.H * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> S(kBQ * kBK), acc(kBQ * D), m(kBQ), l(kBQ);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / nqb, i0 = (t % nqb) * kBQ, mq = std::min(kBQ, g.Lq - i0);
      const int64_t b = bh / g.H, h = bh % g.H;
      const A* Q = q + (bh * g.Lq + i0) * D;
      const A *K = k + bh * g.Lk * D, *V = v + bh * g.Lk * D;
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
            A* ar = acc.data() + r * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) ar[d] *= alpha;
          }
          if (p.dropout) {
            const int64_t row = bh * g.Lq + i;
            for (int64_t j = 0; j < n; ++j)
              s[j] = attention::dropout_keep(p.seed, row, j0 + j, p.thresh) ? s[j] * p.drop_scale : A(0);
          }
        }
        gemm<A>(false, false, mq, D, n, A(1), S.data(), n, V + j0 * D, D, A(1), acc.data(), D);
      }
      for (int64_t r = 0; r < mq; ++r) {
        A* orow = o + (bh * g.Lq + i0 + r) * D;
        const A* ar = acc.data() + r * D;
        const int64_t row = bh * g.Lq + i0 + r;
        if (l[r] == A(0)) {  // every key masked: zeros, and m = +inf makes the backward's P zero
          std::fill(orow, orow + D, A(0));
          row_max[row] = std::numeric_limits<A>::infinity();
          logl[row] = A(0);
        } else {
          const A inv = A(1) / l[r];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) orow[d] = ar[d] * inv;
          row_max[row] = m[r];
          logl[row] = std::log(l[r]);
        }
      }
    }
  });
}

template <typename A>
void attention_bwd_impl(const Params<A>& p, const A* q, const A* k, const A* v, const A* o, const A* dO,
                        const A* stats, A* dq, A* dk, A* dv) {
  const Geometry& g = p;
  const int64_t D = g.D;
  at::parallel_for(0, g.B * g.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> P(kBQ * kBK), dS(kBQ * kBK), dKc(kBK * D), dVc(kBK * D), delta(g.Lq);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / g.H, h = bh % g.H;
      const A *Qh = q + bh * g.Lq * D, *dOh = dO + bh * g.Lq * D, *Oh = o + bh * g.Lq * D;
      const A *Kh = k + bh * g.Lk * D, *Vh = v + bh * g.Lk * D;
      const A *mh = stats + bh * g.Lq, *llh = stats + g.query_rows() + bh * g.Lq;
      A* dQh = dq + bh * g.Lq * D;
      std::fill(dQh, dQh + g.Lq * D, A(0));
      for (int64_t i = 0; i < g.Lq; ++i) delta[i] = dot(dOh + i * D, Oh + i * D, D);
      for (int64_t j0 = 0; j0 < g.Lk; j0 += kBK) {
        const int64_t n = std::min(kBK, g.Lk - j0);
        std::fill(dKc.begin(), dKc.begin() + n * D, A(0));
        std::fill(dVc.begin(), dVc.begin() + n * D, A(0));
        // Causal: queries before j0 see none of these keys.
        for (int64_t i0 = p.causal ? (j0 / kBQ) * kBQ : 0; i0 < g.Lq; i0 += kBQ) {
          const int64_t mq = std::min(kBQ, g.Lq - i0);
          gemm<A>(false, true, mq, n, D, A(1), Qh + i0 * D, D, Kh + j0 * D, D, A(0), P.data(), n);
          gemm<A>(false, true, mq, n, D, A(1), dOh + i0 * D, D, Vh + j0 * D, D, A(0), dS.data(), n);
          for (int64_t r = 0; r < mq; ++r) {
            const int64_t i = i0 + r;
            A *pr = P.data() + r * n, *dr = dS.data() + r * n;
            if (mh[i] == std::numeric_limits<A>::infinity()) {  // every key masked: P = dS = 0 (0 * dP is NaN
              std::fill(pr, pr + n, A(0));                       // where dO V overflows)
              std::fill(dr, dr + n, A(0));
              continue;
            }
            finish_scores(p, b, h, i, j0, n, pr);
            const vec<A> mi = splat(mh[i]), li = splat(llh[i]), di = splat(delta[i]);
            if (!p.dropout) {
              for_chunks<A>(n, [&](int64_t j, int64_t len) {
                const vec<A> pv = exp((load(pr + j, len) - mi) - li);
                store(pr + j, pv, len);
                store(dr + j, pv * (load(dr + j, len) - di), len);
              });
            } else {
              const int64_t row = bh * g.Lq + i;
              for (int64_t j = 0; j < n; ++j) {
                const A pv = exp((pr[j] - mh[i]) - llh[i]);
                const bool keep = attention::dropout_keep(p.seed, row, j0 + j, p.thresh);
                pr[j] = keep ? pv * p.drop_scale : A(0);
                dr[j] = pv * ((keep ? dr[j] * p.drop_scale : A(0)) - delta[i]);
              }
            }
          }
          gemm<A>(true, false, n, D, mq, A(1), P.data(), n, dOh + i0 * D, D, A(1), dVc.data(), D);
          gemm<A>(true, false, n, D, mq, A(1), dS.data(), n, Qh + i0 * D, D, A(1), dKc.data(), D);
          gemm<A>(false, false, mq, D, n, p.scale, dS.data(), n, Kh + j0 * D, D, A(1), dQh + i0 * D, D);
        }
        A *dKh = dk + (bh * g.Lk + j0) * D, *dVh = dv + (bh * g.Lk + j0) * D;
        for (int64_t x = 0; x < n * D; ++x) {
          dKh[x] = dKc[x] * p.scale;
          dVh[x] = dVc[x];
        }
      }
    }
  });
}

// Inputs in the compute dtype (float32 for half types), contiguous.
at::Tensor compute(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return (s == at::kHalf || s == at::kBFloat16) ? t.to(at::kFloat).contiguous() : t.contiguous();
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& query, const at::Tensor& key,
                                                     const at::Tensor& value,
                                                     const std::optional<at::Tensor>& attn_mask,
                                                     const std::optional<at::Tensor>& key_padding_mask,
                                                     double dropout_p, bool is_causal, double scale, int64_t seed) {
  const Geometry g = attention::check_args(query, key, value, attn_mask, key_padding_mask, dropout_p);
  const at::Tensor q = compute(query), k = compute(key), v = compute(value);
  const auto kpm = attention::contiguous_kpm(key_padding_mask);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor stats = at::empty({2, g.B, g.H, g.Lq}, q.options());
  if (g.Lk == 0) {  // nothing to attend to anywhere
    out.zero_();
    attention::fill_no_keys_stats(stats);
  } else if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_fwd_cpu", [&] {
      const auto p = attention::make_params<scalar_t>(g, attn_mask, kpm, dropout_p, is_causal, scale, seed);
      attention_fwd_impl<scalar_t>(p, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                   v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                   stats.mutable_data_ptr<scalar_t>());
    });
  }
  return {out.to(query.scalar_type()), stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& stats, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& key_padding_mask, double dropout_p, bool is_causal, double scale,
    int64_t seed) {
  const Geometry g =
      attention::check_bwd_args(grad_out, query, key, value, out, stats, attn_mask, key_padding_mask, dropout_p);
  const at::Tensor q = compute(query), k = compute(key), v = compute(value), o = compute(out),
                   dO = compute(grad_out), row_stats = stats.contiguous();
  const auto kpm = attention::contiguous_kpm(key_padding_mask);
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::zeros(k.sizes(), k.options()),
             dv = at::zeros(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0) {
    dq.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_bwd_cpu", [&] {
      const auto p = attention::make_params<scalar_t>(g, attn_mask, kpm, dropout_p, is_causal, scale, seed);
      attention_bwd_impl<scalar_t>(p, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                   v.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(),
                                   dO.const_data_ptr<scalar_t>(), row_stats.const_data_ptr<scalar_t>(),
                                   dq.mutable_data_ptr<scalar_t>(), dk.mutable_data_ptr<scalar_t>(),
                                   dv.mutable_data_ptr<scalar_t>());
    });
  }
  const auto t = query.scalar_type();
  return {dq.to(t), dk.to(t), dv.to(t)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnn, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace fastnn::cpu
