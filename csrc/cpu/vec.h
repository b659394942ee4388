// SIMD building blocks of the CPU kernels, on GCC/Clang vector extensions: explicit 512-bit vectors with AVX-512,
// 256-bit ones otherwise (AVX2 with -mavx2 -mfma, two SSE halves elsewhere; setup.py picks the ISA), without
// intrinsics (but for exp's AVX-512 scaling) or ATen's Vectorized<T>, which an extension sees
// only as its scalar fallback and whose exp calls SLEEF, hidden inside libtorch. The auto-vectorizer is no
// substitute: GCC 12 leaves an exp-and-sum loop scalar ("control flow in loop").
//
// Loops use for_chunks(n, f): f(i, len) gets full vectors (len == W) and one tail (len < W); load()/store()
// take len, so every loop is written once.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cstring>
#include <limits>
#include <type_traits>

namespace fastnn::cpu {

// The vector width follows the ISA the file is compiled for: 512 bits with AVX-512 (setup.py enables it when the
// build machine has it), 256 otherwise.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#else
constexpr int kVecBytes = 32;
#endif

template <typename A> struct VecTraits;
template <> struct VecTraits<float> {
  typedef float type __attribute__((vector_size(kVecBytes)));
  typedef int32_t mask __attribute__((vector_size(kVecBytes)));
  static constexpr int W = kVecBytes / 4;
};
template <> struct VecTraits<double> {
  typedef double type __attribute__((vector_size(kVecBytes)));
  typedef int64_t mask __attribute__((vector_size(kVecBytes)));
  static constexpr int W = kVecBytes / 8;
};
template <typename A> using vec = typename VecTraits<A>::type;
template <typename A> constexpr int kW = VecTraits<A>::W;

template <typename A> static inline vec<A> splat(A a) { return vec<A>{} + a; }

// len lanes from p, the rest `fill`. A tail (len < W) is one masked load with AVX-512; elsewhere lane by lane.
template <typename A> static inline vec<A> load(const A* p, int64_t len = kW<A>, A fill = A(0)) {
  vec<A> v;
  if (len == kW<A>) {
    std::memcpy(&v, p, sizeof v);
    return v;
  }
#if defined(__AVX512F__)
  const __mmask16 k = static_cast<__mmask16>((1u << len) - 1);
  if constexpr (std::is_same_v<A, float>)
    return __builtin_bit_cast(vec<A>, _mm512_mask_loadu_ps(__builtin_bit_cast(__m512, splat<A>(fill)), k, p));
  else
    return __builtin_bit_cast(vec<A>, _mm512_mask_loadu_pd(__builtin_bit_cast(__m512d, splat<A>(fill)),
                                                           static_cast<__mmask8>(k), p));
#else
  v = splat<A>(fill);
  for (int64_t i = 0; i < len; ++i) v[i] = p[i];
  return v;
#endif
}
template <typename A> static inline void store(A* p, vec<A> v, int64_t len = kW<A>) {
  if (len == kW<A>) {
    std::memcpy(p, &v, sizeof v);
    return;
  }
#if defined(__AVX512F__)
  const __mmask16 k = static_cast<__mmask16>((1u << len) - 1);
  if constexpr (std::is_same_v<A, float>) _mm512_mask_storeu_ps(p, k, __builtin_bit_cast(__m512, v));
  else _mm512_mask_storeu_pd(p, static_cast<__mmask8>(k), __builtin_bit_cast(__m512d, v));
#else
  for (int64_t i = 0; i < len; ++i) p[i] = v[i];
#endif
}

// v with the lanes from len on zeroed: a loop tail's unused lanes, before they are summed.
template <typename A> static inline vec<A> zero_tail(vec<A> v, int64_t len) {
  using M = typename VecTraits<A>::mask;
  M lane{};
  for (int k = 0; k < kW<A>; ++k) lane[k] = k;  // folded to a constant
  return lane < static_cast<std::conditional_t<sizeof(A) == 4, int32_t, int64_t>>(len) ? v : splat<A>(0);
}

template <typename A, typename F> static inline void for_chunks(int64_t n, F&& f) {
  int64_t i = 0;
  for (; i + kW<A> <= n; i += kW<A>) f(i, int64_t(kW<A>));
  if (i < n) f(i, n - i);
}

// Horizontal and lane-wise helpers, generic over the vector type V.
template <typename V> static inline V vmax(V a, V b) {  // a NaN in either sticks
  return (b > a) | (b != b) ? b : a;
}
// v folded to one lane by halving: op(low half, high half) until one lane is left. Vector instructions rather than
// a scalar chain through memory, which a short row (tens of classes) paid for once per reduction.
template <typename V, typename Op> static inline auto fold(V v, Op op) {
  using E = std::remove_cv_t<std::remove_reference_t<decltype(v[0])>>;
  if constexpr (sizeof(V) == sizeof(E)) {
    return v[0];
  } else {
    typedef E H __attribute__((vector_size(sizeof(V) / 2)));
    H lo, hi;
    std::memcpy(&lo, &v, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
    return fold(op(lo, hi), op);
  }
}
template <typename V> static inline auto hsum(V v) {  // pairwise: error grows with log2 of the width, not the width
  return fold(v, [](auto a, auto b) { return a + b; });
}
template <typename V> static inline auto hmax(V v) {  // NaN wins
  return fold(v, [](auto a, auto b) { return vmax(a, b); });
}

static inline vec<float> exp_mantissa(vec<float> n, vec<float> x) {  // exp(x - n*ln2), n = round(x / ln2)
  using V = vec<float>;
  V r = n * -0.693359375f + x;  // ln2 in two parts: n * 0.693359375 is exact
  r = n * 2.12194440e-4f + r;
  V p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * (r * r) + r + 1.0f;
}
// The float functions below are always inlined: GCC otherwise calls them out of line from the kernels' loops
// (they are long), a call per vector and no overlap between the calls' independent work.
//
// exp(x): x = n*ln2 + r with |r| <= ln2/2, exp(r) by Cephes' degree-6 minimax polynomial (about 1 ulp), then
// scaled by 2^n. NaN propagates.
// With AVX-512, vscalefps applies 2^n with IEEE overflow to inf and gradual underflow to 0, so after a clamp that
// keeps the reduction finite (+-inf included) nothing needs a select: about two thirds of the instructions of the
// form below, which matters because exp dominates softmax, cross-entropy and the LSTM cell on the CPU.
// Without it, 2^n is built in the exponent bits: x < -87.3 flushes to 0 (the result would be denormal) and
// x > 88.38 gives inf.
__attribute__((always_inline)) static inline vec<float> exp(vec<float> x) {
  using V = vec<float>;
#if defined(__AVX512F__)
  static_assert(kW<float> == 16, "the AVX-512 path works on __m512");
  // Clamped to [-104, 89]: exp(-104) rounds to 0 and exp(89) overflows, so the results at the ends are exact.
  // A NaN fails both comparisons and stays.
  V xc = x < -104.0f ? splat(-104.0f) : x;
  xc = xc > 89.0f ? splat(89.0f) : xc;
  // The masked intrinsics with every lane selected: GCC 12's unmasked ones warn about their undefined source.
  const __m512 t = __builtin_bit_cast(__m512, xc * 1.44269504088896341f);
  const __m512 n = _mm512_mask_roundscale_ps(t, 0xffff, t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 p = __builtin_bit_cast(__m512, exp_mantissa(__builtin_bit_cast(V, n), xc));
  return __builtin_bit_cast(V, _mm512_mask_scalef_ps(p, 0xffff, p, n));
#else
  using M = VecTraits<float>::mask;
  const float hi = 88.3762626647950f, lo = -87.3365447505531f;
  V xc = x > hi ? splat(hi) : x;
  xc = xc < lo ? splat(lo) : xc;
  const V magic = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to nearest
  V n = (xc * 1.44269504088896341f + magic) - magic;
  const V p = exp_mantissa(n, xc);
  const M bits = (__builtin_convertvector(n, M) + 127) << 23;
  V y = p * __builtin_bit_cast(V, bits);  // 2^n; a reinterpret_cast of the lvalue would break strict aliasing
  y = x < lo ? splat(0.0f) : y;
  y = x > hi ? splat(std::numeric_limits<float>::infinity()) : y;
  return y;
#endif
}
static inline vec<double> exp(vec<double> x) {  // float64 is for checking, not speed
  for (int i = 0; i < kW<double>; ++i) x[i] = std::exp(x[i]);
  return x;
}
static inline float exp(float x) { return exp(splat(x))[0]; }
static inline double exp(double x) { return std::exp(x); }

// log(2^fe (1 + t)) for t in [sqrt(1/2) - 1, sqrt(2) - 1] and an integer fe: Cephes' degree-9 polynomial in t
// (about 1 ulp), fe ln2 added in two parts.
__attribute__((always_inline)) static inline vec<float> log_reduced(vec<float> t, vec<float> fe) {
  using V = vec<float>;
  const V z = t * t;
  V p = splat(7.0376836292E-2f);
  p = p * t - 1.1514610310E-1f;
  p = p * t + 1.1676998740E-1f;
  p = p * t - 1.2420140846E-1f;
  p = p * t + 1.4249322787E-1f;
  p = p * t - 1.6668057665E-1f;
  p = p * t + 2.0000714765E-1f;
  p = p * t - 2.4999993993E-1f;
  p = p * t + 3.3333331174E-1f;
  return p * t * z + fe * -2.12194440e-4f - 0.5f * z + t + fe * 0.693359375f;
}

// log(x): x = m * 2^e with m in [sqrt(1/2), sqrt(2)), log(m) by Cephes' degree-9 polynomial in t = m - 1 (about
// 1 ulp), e*ln2 added in two parts. Denormals are scaled into the normal range first. log(0) = -inf,
// log(inf) = inf, x < 0 or NaN gives NaN.
__attribute__((always_inline)) static inline vec<float> log(vec<float> x) {
  using V = vec<float>;
  using M = VecTraits<float>::mask;
  const M tiny = x < 1.17549435e-38f;  // below FLT_MIN (0 included): scale by 2^23
  const V xs = tiny ? x * 8388608.0f : x;
  M bits = __builtin_bit_cast(M, xs);
  M e = ((bits >> 23) & 0xff) - 126;                 // xs = m * 2^e, m in [0.5, 1)
  bits = (bits & 0x807fffff) | 0x3f000000;
  V m = __builtin_bit_cast(V, bits);
  e = (tiny ? e - 23 : e);
  const M lo = m < 0.707106781186547524f;            // m in [sqrt(1/2), sqrt(2)): take 2m and e - 1
  e += lo;                                           // a true lane of a mask is -1
  const V t = (lo ? m + m : m) - 1.0f;
  V y = log_reduced(t, __builtin_convertvector(e, V));
  y = x == 0.0f ? splat(-std::numeric_limits<float>::infinity()) : y;
  y = x == std::numeric_limits<float>::infinity() ? x : y;
  y = (x < 0.0f) | (x != x) ? splat(std::numeric_limits<float>::quiet_NaN()) : y;
  return y;
}
static inline vec<double> log(vec<double> x) {
  for (int i = 0; i < kW<double>; ++i) x[i] = std::log(x[i]);
  return x;
}

// log(1 + e) for e in [0, 1] (NaN propagates): the stable softplus log1p(exp(-|x|)) of the losses. 1 + e is never
// rounded: below sqrt(2) - 1 it is 1 + t with t = e exactly, above it 2 (1 + t) with t = (e - 1) / 2, exact from
// e = 1/2 on (Sterbenz) and a single rounding of e / 2 - 1/2 below. No exponent split, no division and no special
// cases, against log1p's general form: about a third of its instructions.
__attribute__((always_inline)) static inline vec<float> log1p_unit(vec<float> e) {
  using V = vec<float>;
  const auto hi = e > 0.414213562373095f;
  return log_reduced(hi ? e * 0.5f - 0.5f : e, hi ? splat(1.0f) : splat(0.0f));
}
static inline vec<double> log1p_unit(vec<double> e) {
  for (int i = 0; i < kW<double>; ++i) e[i] = std::log1p(e[i]);
  return e;
}

template <typename V> static inline V vabs(V v) { return v < 0 ? -v : v; }

// sigmoid(x) = 1 / (1 + exp(-x)): exp(-x) overflows to inf for x < -88.7, giving exactly 0, and the result is
// within a few ulp of the exact value everywhere else (one exp, one division).
__attribute__((always_inline)) static inline vec<float> sigmoid(vec<float> x) { return 1.0f / (1.0f + exp(-x)); }
static inline vec<double> sigmoid(vec<double> x) {
  for (int i = 0; i < kW<double>; ++i) x[i] = 1.0 / (1.0 + std::exp(-x[i]));
  return x;
}

// tanh(x): |x| < 0.625 by Cephes' odd polynomial x + x^3 P(x^2) (1-2 ulp; the exp form would lose the
// relative precision of small x to cancellation), else sign(x) (1 - 2 / (exp(2|x|) + 1)), which saturates to
// +-1 once exp overflows. NaN propagates through both.
__attribute__((always_inline)) static inline vec<float> tanh(vec<float> x) {
  using V = vec<float>;
  const V z = x * x;
  V p = splat(-5.70498872745e-3f);
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const V small = p * z * x + x;
  const V ax = x < 0.0f ? -x : x;
  V big = 1.0f - 2.0f / (exp(ax + ax) + 1.0f);
  big = x < 0.0f ? -big : big;
  return ax < 0.625f ? small : big;
}
static inline vec<double> tanh(vec<double> x) {
  for (int i = 0; i < kW<double>; ++i) x[i] = std::tanh(x[i]);
  return x;
}

// Accumulation type: half types compute in float.
template <typename T> struct Acc { using type = T; };
template <> struct Acc<c10::Half> { using type = float; };
template <> struct Acc<c10::BFloat16> { using type = float; };
template <typename T> using acc_t = typename Acc<T>::type;

// ---- row reductions in the accumulation type (float or double) ----

template <typename A> static inline A max_of(const A* x, int64_t n) {  // NaN wins, as torch's softmax needs
  constexpr A ninf = -std::numeric_limits<A>::infinity();
  // Two accumulators, alternate vectors: the NaN-keeping max is a chain of three operations that one accumulator
  // waits on at every vector (a third of the softmax forward of 128-element rows; docs/measurements.md, "Short
  // rows and spatial inputs as slabs").
  vec<A> m0 = splat(ninf), m1 = m0;
  int64_t i = 0;
  for (; i + 2 * kW<A> <= n; i += 2 * kW<A>) {
    m0 = vmax(m0, load(x + i));
    m1 = vmax(m1, load(x + i + kW<A>));
  }
  for_chunks<A>(n - i, [&](int64_t j, int64_t len) { m0 = vmax(m0, load(x + i + j, len, ninf)); });
  return hmax(vmax(m0, m1));
}

// sum(exp(x - m)), storing exp(x - m) to y when STORE.
template <typename A, bool STORE> static inline A sum_exp(const A* x, A m, A* y, int64_t n) {
  vec<A> s{};
  for_chunks<A>(n, [&](int64_t i, int64_t len) {
    vec<A> e = exp(load(x + i, len) - m);
    if (len < kW<A>) e = zero_tail<A>(e, len);
    if constexpr (STORE) store(y + i, e, len);
    s += e;
  });
  return hsum(s);
}

template <typename A> static inline A dot(const A* a, const A* b, int64_t n) {
  vec<A> s{};
  for_chunks<A>(n, [&](int64_t i, int64_t len) { s += load(a + i, len) * load(b + i, len); });
  return hsum(s);
}

template <typename A> static inline A sum(const A* a, int64_t n) {
  vec<A> s{};
  for_chunks<A>(n, [&](int64_t i, int64_t len) { s += load(a + i, len); });
  return hsum(s);
}

// Outputs of at least this many bytes are written with streaming (non-temporal) stores where the kernels can:
// far larger than a core's L2, they would leave it before anyone read them back, and a plain store first reads
// each line it writes (read for ownership), a third more memory traffic for a row written once.
constexpr int64_t kStreamBytes = int64_t(64) << 20;

// out[0, n) = f(i, len) chunk by chunk, as for_chunks passes them, with streaming stores (AVX-512, float, when
// STREAM) for the 64-byte aligned full vectors and plain ones for the head before the first aligned line and the
// tail. A task that streamed ends with stream_fence() so that its writes are ordered before any later access.
template <bool STREAM, typename A, typename F> static inline void write_row(A* out, int64_t n, F&& f) {
#if defined(__AVX512F__)
  if constexpr (STREAM && std::is_same_v<A, float>) {
    const auto addr = reinterpret_cast<uintptr_t>(out);
    if (addr % sizeof(A) == 0) {
      const int64_t head = std::min<int64_t>(n, int64_t((64 - addr % 64) % 64 / sizeof(A)));
      if (head) store(out, f(int64_t(0), head), head);
      int64_t i = head;
      for (; i + kW<A> <= n; i += kW<A>) _mm512_stream_ps(out + i, __builtin_bit_cast(__m512, f(i, int64_t(kW<A>))));
      if (i < n) store(out + i, f(i, n - i), n - i);
      return;
    }
  }
#endif
  for_chunks<A>(n, [&](int64_t i, int64_t len) { store(out + i, f(i, len), len); });
}
template <bool STREAM> static inline void stream_fence() {
#if defined(__AVX512F__)
  if constexpr (STREAM) _mm_sfence();
#endif
}
// Whether an output of n elements of T is streamed (write_row): float32 (the type write_row streams) of at least
// kStreamBytes.
template <typename T> static inline bool streams(int64_t n) {
  return std::is_same_v<T, float> && n * int64_t(sizeof(T)) >= kStreamBytes;
}
// f(std::true_type{}) or f(std::false_type{}): a runtime choice of STREAM made a compile-time one.
template <typename F> static inline void with_stream(bool stream, F&& f) {
  if (stream) f(std::true_type{});
  else f(std::false_type{});
}

// Storage <-> accumulation type, a row at a time (half types go through a float buffer).
template <typename T, typename A> static inline void load_row(const T* src, A* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<A>(src[i]);
}
template <typename T, typename A> static inline void store_row(const A* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// One vector of storage type T as the accumulation type A and back (half types lane by lane, no row buffer):
// len lanes, the rest `fill`. A is explicit, T deduced: load_as<float>(p).
template <typename A, typename T> static inline vec<A> load_as(const T* p, int64_t len = kW<A>, A fill = A(0)) {
  if constexpr (std::is_same_v<T, A>) {
    return load(p, len, fill);
  } else {
    vec<A> v = splat<A>(fill);
    for (int64_t i = 0; i < len; ++i) v[i] = static_cast<A>(p[i]);
    return v;
  }
}
template <typename A, typename T> static inline void store_as(T* p, vec<A> v, int64_t len = kW<A>) {
  if constexpr (std::is_same_v<T, A>) {
    store(p, v, len);
  } else {
    for (int64_t i = 0; i < len; ++i) p[i] = static_cast<T>(v[i]);
  }
}

}  // namespace fastnn::cpu
