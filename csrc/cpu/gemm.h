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

#if defined(__AVX512F__)
// r[i] holds row i of a 16 x 16 block; afterwards column i.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  // Now 128-bit lane L of r[4 i + q] holds column 4 L + q of rows 4 i .. 4 i + 3: regroup the lanes.
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0xDD);
    t[8 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD);
    r[4 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0x88);
    r[12 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0xDD);
  }
}
inline __mmask16 first_lanes(int64_t n) { return static_cast<__mmask16>(n >= 16 ? 0xffff : (1u << n) - 1); }
#endif

// Packs the K x ncols matrix whose element (k, j) is src[k * sk + j * sj] into panels of 16 columns, each [K][16],
// the columns past ncols zero (so the last panel runs the full-width kernel).
inline void pack(const float* src, int64_t sk, int64_t sj, int64_t K, int64_t ncols, float* dst) {
  for (int64_t p = 0; p < panels(ncols); ++p, dst += K * kNR) {
    const int64_t j0 = p * kNR, nr = std::min(kNR, ncols - j0);
    if (nr < kNR) std::fill_n(dst, K * kNR, 0.0f);
    // Walk src along its contiguous direction: a panel is a 16-wide transpose when the columns are W's rows
    // (with AVX-512 16 x 16 blocks of it through registers).
    if (sk == 1) {
#if defined(__AVX512F__)
      for (int64_t k0 = 0; k0 < K; k0 += 16) {
        const int64_t nk = std::min<int64_t>(16, K - k0);
        const __mmask16 km = first_lanes(nk);
        __m512 v[16];
        for (int64_t j = 0; j < 16; ++j)
          v[j] = j < nr ? _mm512_maskz_loadu_ps(km, src + k0 + (j0 + j) * sj) : _mm512_setzero_ps();
        transpose16(v);  // v[i]: the panel's 16 columns at k0 + i
        for (int64_t i = 0; i < nk; ++i) _mm512_storeu_ps(dst + (k0 + i) * kNR, v[i]);
      }
#else
      for (int64_t j = 0; j < nr; ++j)
        for (int64_t k = 0; k < K; ++k) dst[k * kNR + j] = src[k + (j0 + j) * sj];
#endif
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

// ---- The column form, for an A of nearly 32 rows: C^T = (A . W)^T with W the broadcast operand ----
// At 32 rows (an LSTM step) the kernel above reads each packed panel of W once per 8-row block of A, four times,
// and its k costs two panel loads and eight broadcasts for 16 FMAs. Here A is stored transposed (at: [K][32],
// the rows past M zero), so two 16-row vectors of A per k meet the broadcast elements of 12 columns of W: 24 FMAs
// for 14 loads, W read once, so a core runs close to its FMA ceiling where the kernel above stays near two thirds
// of it. Every row counts 32 though: below 27 rows the kernel above, whose cost follows the rows, is as fast or
// faster (a 16-row form, 24 columns a group, was slower still: one vector of A per k makes it load-bound;
// docs/measurements.md, "LSTM recurrence in the column form" and the section after it). AVX-512 only (24
// accumulators need its 32 vector registers).
#if defined(__AVX512F__)
constexpr bool kColsAvailable = true;
#else
constexpr bool kColsAvailable = false;
#endif
constexpr int64_t kColsRows = 32;     // R: at's and ct's padded row count, the most rows the form takes
constexpr int64_t kColsMinRows = 27;  // the fewest rows it pays for
constexpr int64_t kColsGroup = 12;  // NC: columns per group
inline int64_t cols_groups(int64_t ncols) { return (ncols + kColsGroup - 1) / kColsGroup; }
// Floats that pack_cols writes for K x ncols; a ct for ncols columns holds cols_groups * NC * R floats.
inline int64_t cols_packed_size(int64_t K, int64_t ncols) { return cols_groups(ncols) * kColsGroup * K; }

#if defined(__AVX512F__)
template <int MV, int NC>
inline void micro_cols(const float* at, int64_t K, const float* wp, float* ct) {
  constexpr int R = 16 * MV;
  __m512 acc[NC][MV];
  for (int c = 0; c < NC; ++c)
    for (int v = 0; v < MV; ++v) acc[c][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 a[MV];
    for (int v = 0; v < MV; ++v) a[v] = _mm512_loadu_ps(at + k * R + 16 * v);
    for (int c = 0; c < NC; ++c) {
      const __m512 w = _mm512_set1_ps(wp[k * NC + c]);
      for (int v = 0; v < MV; ++v) acc[c][v] = _mm512_fmadd_ps(w, a[v], acc[c][v]);
    }
  }
  for (int c = 0; c < NC; ++c)
    for (int v = 0; v < MV; ++v) _mm512_storeu_ps(ct + c * R + 16 * v, acc[c][v]);
}
#endif

// ct[c * R + r] = sum_k at[k * R + r] W(k, c) for every column c < ncols (rounded up to a group) and r < R =
// kColsRows, W packed by pack_cols. Single-threaded. Only with kColsAvailable.
inline void gemm_cols(const float* at, int64_t K, const float* wp, int64_t ncols, float* ct) {
#if defined(__AVX512F__)
  constexpr int64_t nc = kColsGroup, R = kColsRows;
  for (int64_t g = 0; g < cols_groups(ncols); ++g) micro_cols<R / 16, nc>(at, K, wp + g * K * nc, ct + g * nc * R);
#else
  (void)at, (void)K, (void)wp, (void)ncols, (void)ct;
#endif
}

// Packs W (K x ncols, element (k, c) at col[c][k * sk]): groups of NC columns, each [K][NC], the
// columns past ncols zero. With AVX-512 (the only kind of build that uses it) a group whose columns lie side by
// side (the backward's W_hh[:, j0 + u]) copies a run of floats a k, and columns of contiguous k (the forward's
// rows of W_hh) go 16 x 16 through registers; else one float at a time.
inline void pack_cols(const float* const* col, int64_t sk, int64_t K, int64_t ncols, float* dst) {
  constexpr int64_t nc = kColsGroup;
  for (int64_t g = 0; g < cols_groups(ncols); ++g, dst += K * nc) {
    const float* const* gc = col + g * nc;
    const int64_t w = std::min(nc, ncols - g * nc);
#if defined(__AVX512F__)
    static_assert(nc <= 16, "a group's columns are one vector");
    const __mmask16 cm = first_lanes(nc), live = first_lanes(w);
    bool adjacent = true;
    for (int64_t c = 1; c < w; ++c) adjacent = adjacent && gc[c] == gc[0] + c;
    if (adjacent) {
      for (int64_t k = 0; k < K; ++k)
        _mm512_mask_storeu_ps(dst + k * nc, cm, _mm512_maskz_loadu_ps(live, gc[0] + k * sk));
      continue;
    }
    if (sk == 1) {
      for (int64_t k0 = 0; k0 < K; k0 += 16) {
        const int64_t nk = std::min<int64_t>(16, K - k0);
        const __mmask16 km = first_lanes(nk);
        __m512 v[16];
        for (int64_t i = 0; i < 16; ++i) v[i] = i < w ? _mm512_maskz_loadu_ps(km, gc[i] + k0) : _mm512_setzero_ps();
        transpose16(v);  // v[i]: the group's columns at k0 + i
        for (int64_t i = 0; i < nk; ++i) _mm512_mask_storeu_ps(dst + (k0 + i) * nc, cm, v[i]);
      }
      continue;
    }
#endif
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t c = 0; c < w; ++c) dst[k * nc + c] = gc[c][k * sk];
      for (int64_t c = w; c < nc; ++c) dst[k * nc + c] = 0.0f;
    }
  }
}

// c[r * ldc + j] (+)= ct[j * R + r] for r < rows, j < ncols: the column form's result into a row-major C, in
// 16 x 16 blocks transposed in registers.
inline void add_cols_to_rows(const float* ct, int64_t R, int64_t ncols, int64_t rows, float* c, int64_t ldc,
                             bool accumulate = true) {
#if defined(__AVX512F__)
  for (int64_t j0 = 0; j0 < ncols; j0 += 16) {
    const int64_t nj = std::min<int64_t>(16, ncols - j0);
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
      __m512 v[16];
      for (int64_t i = 0; i < 16; ++i)
        v[i] = i < nj ? _mm512_loadu_ps(ct + (j0 + i) * R + r0) : _mm512_setzero_ps();
      transpose16(v);
      const __mmask16 m = first_lanes(nj);
      for (int64_t i = 0; i < std::min<int64_t>(16, rows - r0); ++i) {
        float* row = c + (r0 + i) * ldc + j0;
        _mm512_mask_storeu_ps(row, m, accumulate ? _mm512_add_ps(_mm512_maskz_loadu_ps(m, row), v[i]) : v[i]);
      }
    }
  }
#else
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < ncols; ++j) c[r * ldc + j] = (accumulate ? c[r * ldc + j] : 0.0f) + ct[j * R + r];
#endif
}

// dt[j * R + r] = a[r * lda + j] for j < ncols and r < R, rows past `rows` zero: a row-major A into the column
// form's transposed layout.
inline void rows_to_cols(const float* a, int64_t lda, int64_t rows, int64_t ncols, float* dt, int64_t R) {
#if defined(__AVX512F__)
  for (int64_t j0 = 0; j0 < ncols; j0 += 16) {
    const int64_t nj = std::min<int64_t>(16, ncols - j0);
    const __mmask16 m = first_lanes(nj);
    for (int64_t r0 = 0; r0 < R; r0 += 16) {
      __m512 v[16];
      for (int64_t i = 0; i < 16; ++i)
        v[i] = r0 + i < rows ? _mm512_maskz_loadu_ps(m, a + (r0 + i) * lda + j0) : _mm512_setzero_ps();
      transpose16(v);
      for (int64_t i = 0; i < nj; ++i) _mm512_storeu_ps(dt + (j0 + i) * R + r0, v[i]);
    }
  }
#else
  for (int64_t j = 0; j < ncols; ++j)
    for (int64_t r = 0; r < R; ++r) dt[j * R + r] = r < rows ? a[r * lda + j] : 0.0f;
#endif
}

}  // namespace fastnn::cpu::packed
