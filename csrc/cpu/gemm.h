// A float32 GEMM against a packed B: the LSTM layer's recurrence (h W_hh^T forward, dG W_hh backward: B = 32 rows
// a step against the same W_hh for every step) and input product x W_ih^T, and linear + cross-entropy's four
// products per block of classes (logits, grad_weight, grad_input; csrc/cpu/linear_cross_entropy.cpp).
//
// Why not the BLAS: MKL repacks B on every call, and at M = 32 that copy is a large share of the work, where this
// kernel packs W_hh once per layer call and reuses it for every step (against MKL: docs/measurements.md, "LSTM").
// The packing is the usual one: panels of 16 columns stored k-major ([K][16]), so the micro-kernel streams panels
// (AVX-512: two at a time, one 512-bit load each per k; AVX2: one, two 256-bit loads) and broadcasts A, for up to
// 8 (AVX-512) or 6 (AVX2) rows at a time. A is read in place, row-major or (TA) transposed.
#pragma once
#include <algorithm>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FASTNN_PACKED_GEMM 1
#else
#define FASTNN_PACKED_GEMM 0
#endif

namespace fastnn::cpu::packed {

constexpr bool kAvailable = FASTNN_PACKED_GEMM;
constexpr int64_t kNR = 16;  // columns of a panel: two 8-float vectors

inline int64_t panels(int64_t ncols) { return (ncols + kNR - 1) / kNR; }
// Floats that pack() writes for a K x ncols matrix.
inline int64_t packed_size(int64_t K, int64_t ncols) { return panels(ncols) * K * kNR; }

// Packs the K x ncols matrix whose element (k, j) is src[k * sk + j * sj] into panels of 16 columns, each [K][16],
// the columns past ncols zero (so the last panel runs the full-width kernel).
inline void pack(const float* src, int64_t sk, int64_t sj, int64_t K, int64_t ncols, float* dst) {
  for (int64_t p = 0; p < panels(ncols); ++p, dst += K * kNR) {
    const int64_t j0 = p * kNR, nr = std::min(kNR, ncols - j0);
    if (nr < kNR) std::fill_n(dst, K * kNR, 0.0f);
    // Walk src along its contiguous direction: a panel is a 16-wide transpose when the columns are W's rows.
    if (sk == 1) {
      for (int64_t j = 0; j < nr; ++j)
        for (int64_t k = 0; k < K; ++k) dst[k * kNR + j] = src[k + (j0 + j) * sj];
    } else {
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < nr; ++j) dst[k * kNR + j] = src[k * sk + (j0 + j) * sj];
    }
  }
}

#if FASTNN_PACKED_GEMM
// Element (r, k) of A: rows lda apart, or with TA (A stored transposed) columns lda apart.
template <bool TA> inline const float* a_at(const float* a, int64_t lda, int64_t r, int64_t k) {
  return TA ? a + k * lda + r : a + r * lda + k;
}

// C[MR x 16 NP] = (C if accumulate) + A[MR x K] . [NP panels, K x 16 each, ps floats apart]; C rows ldc apart.
#if defined(__AVX512F__)
// One 16-float vector per row and panel, two panels at a time where there are two: 16 accumulators, so a k costs
// two panel loads and MR broadcasts for 2 MR FMAs. With one panel (MR accumulators, a broadcast per FMA) a core
// with two 512-bit FMA pipes ran at half its peak; two panels gained 15-25% there. Where a 512-bit FMA takes both
// 256-bit pipes (Zen 4), 8 accumulators already covered the latency and two panels only halve the panel loads
// (docs/measurements.md, "AVX-512 GEMM micro-kernel"). Not more than 8 rows: A's rows lie lda apart, and at
// lda = 2048 floats 12 of them fall into one 8-way L1 set (a third slower on Zen 4).
constexpr int kMaxMR = 8, kMaxNP = 2;
template <int MR, int NP, bool TA>
__attribute__((always_inline)) inline void micro(const float* __restrict a, int64_t lda, const float* __restrict bp,
                                                 int64_t ps, int64_t K, float* c, int64_t ldc, bool accumulate) {
  __m512 acc[MR][NP];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int q = 0; q < NP; ++q) acc[r][q] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[NP];
#pragma GCC unroll 2
    for (int q = 0; q < NP; ++q) b[q] = _mm512_loadu_ps(bp + q * ps + kNR * k);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 x = _mm512_set1_ps(*a_at<TA>(a, lda, r, k));
#pragma GCC unroll 2
      for (int q = 0; q < NP; ++q) acc[r][q] = _mm512_fmadd_ps(x, b[q], acc[r][q]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int q = 0; q < NP; ++q) {
      float* cr = c + r * ldc + q * kNR;
      if (accumulate) acc[r][q] = _mm512_add_ps(acc[r][q], _mm512_loadu_ps(cr));
      _mm512_storeu_ps(cr, acc[r][q]);
    }
}
#else
// Two 8-float vectors per row (one panel); 6 rows keep 12 accumulators in the 16 ymm registers.
constexpr int kMaxMR = 6, kMaxNP = 1;
template <int MR, int NP, bool TA>
__attribute__((always_inline)) inline void micro(const float* __restrict a, int64_t lda, const float* __restrict bp,
                                                 int64_t /*ps*/, int64_t K, float* c, int64_t ldc, bool accumulate) {
  static_assert(NP == 1, "the AVX2 kernel takes one panel at a time");
  __m256 lo[MR], hi[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(bp + kNR * k), b1 = _mm256_loadu_ps(bp + kNR * k + 8);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 x = _mm256_broadcast_ss(a_at<TA>(a, lda, r, k));
      lo[r] = _mm256_fmadd_ps(x, b0, lo[r]);
      hi[r] = _mm256_fmadd_ps(x, b1, hi[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    if (accumulate) {
      lo[r] = _mm256_add_ps(lo[r], _mm256_loadu_ps(c + r * ldc));
      hi[r] = _mm256_add_ps(hi[r], _mm256_loadu_ps(c + r * ldc + 8));
    }
    _mm256_storeu_ps(c + r * ldc, lo[r]);
    _mm256_storeu_ps(c + r * ldc + 8, hi[r]);
  }
}
#endif

// NP full panels' 16 NP columns of C, the panels ps floats apart, for rows [r, M) in blocks of MR.
template <int MR, int NP, bool TA>
inline void rows_of_panels(const float* a, int64_t lda, int64_t& r, int64_t M, const float* bp, int64_t ps,
                           int64_t K, float* c, int64_t ldc, bool accumulate) {
  for (; r + MR <= M; r += MR) micro<MR, NP, TA>(a_at<TA>(a, lda, r, 0), lda, bp, ps, K, c + r * ldc, ldc, accumulate);
}

// One panel's 16 (or, for the last, nr) columns of C for rows [0, M).
template <int MR, bool TA>
inline void rows_of_panel(const float* a, int64_t lda, int64_t& r, int64_t M, const float* bp, int64_t K, float* c,
                          int64_t ldc, int64_t nr, bool accumulate) {
  if (nr == kNR) return rows_of_panels<MR, 1, TA>(a, lda, r, M, bp, 0, K, c, ldc, accumulate);
  for (; r + MR <= M; r += MR) {  // a partial panel goes through a full-width tile, so no store crosses C's row end
    float tile[MR * kNR];
    for (int i = 0; i < MR; ++i) {
      std::fill_n(tile + i * kNR, kNR, 0.0f);
      if (accumulate) std::copy_n(c + (r + i) * ldc, nr, tile + i * kNR);
    }
    micro<MR, 1, TA>(a_at<TA>(a, lda, r, 0), lda, bp, 0, K, tile, kNR, accumulate);
    for (int i = 0; i < MR; ++i) std::copy_n(tile + i * kNR, nr, c + (r + i) * ldc);
  }
}
#endif

// C[M x ncols] = (C if accumulate) + A[M x K] . B, B packed by pack(); A rows lda apart (TA: A stored transposed,
// its columns lda apart), C rows ldc apart. The panels lie panel_stride floats apart (default K * 16, as pack()
// writes them; more for rows [k0, k0 + K) of a taller packed matrix, passed as bp + k0 * 16). Single-threaded:
// the callers split the work over their threads. Only with kAvailable.
template <bool TA = false>
inline void gemm(const float* a, int64_t lda, int64_t M, int64_t K, const float* bp, int64_t ncols, float* c,
                 int64_t ldc, bool accumulate, int64_t panel_stride = -1) {
#if FASTNN_PACKED_GEMM
  if (K == 0) {  // an empty sum: the blocks below would never store
    if (!accumulate)
      for (int64_t r = 0; r < M; ++r) std::fill_n(c + r * ldc, ncols, 0.0f);
    return;
  }
  // K in blocks of 512: a panel's block (32 KB) and the rows' A stay near L1 (512 against 256: docs/measurements.md,
  // "LSTM"). The first block stores, the rest accumulate.
  constexpr int64_t KC = 512;
  if (panel_stride < 0) panel_stride = K * kNR;
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = std::min(KC, K - k0);
    const bool acc = accumulate || k0 > 0;
    const float* ak = a_at<TA>(a, lda, 0, k0);
    int64_t p = 0;
    if constexpr (kMaxNP == 2) {  // pairs of full panels
      for (; (p + 2) * kNR <= ncols; p += 2) {
        const float* panel = bp + p * panel_stride + k0 * kNR;
        float* cp = c + p * kNR;
        int64_t r = 0;
        rows_of_panels<kMaxMR, 2, TA>(ak, lda, r, M, panel, panel_stride, kc, cp, ldc, acc);
        rows_of_panels<4, 2, TA>(ak, lda, r, M, panel, panel_stride, kc, cp, ldc, acc);
        rows_of_panels<1, 2, TA>(ak, lda, r, M, panel, panel_stride, kc, cp, ldc, acc);
      }
    }
    for (; p < panels(ncols); ++p) {  // the rest one panel at a time, the last perhaps partial
      const int64_t nr = std::min(kNR, ncols - p * kNR);
      const float* panel = bp + p * panel_stride + k0 * kNR;
      float* cp = c + p * kNR;
      int64_t r = 0;
      rows_of_panel<kMaxMR, TA>(ak, lda, r, M, panel, kc, cp, ldc, nr, acc);
      rows_of_panel<4, TA>(ak, lda, r, M, panel, kc, cp, ldc, nr, acc);
      rows_of_panel<2, TA>(ak, lda, r, M, panel, kc, cp, ldc, nr, acc);
      rows_of_panel<1, TA>(ak, lda, r, M, panel, kc, cp, ldc, nr, acc);
    }
  }
#else
  (void)a, (void)lda, (void)M, (void)K, (void)bp, (void)ncols, (void)c, (void)ldc, (void)accumulate, (void)panel_stride;
#endif
}

}  // namespace fastnn::cpu::packed
