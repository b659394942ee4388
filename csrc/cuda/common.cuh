// Device helpers shared by every fastnn CUDA kernel: accumulation types, 16-byte vector loads/stores of a row,
// warp / block reductions, and an online log-sum-exp accumulator (softmax, cross-entropy, attention).
//
// Reductions assume the layout the kernels use: a row (or column) is handled by the blockDim.x threads of one
// threadIdx.y, which is either at most one warp (a power of two, several rows per block) or the whole block
// (blockDim.x a multiple of 32, blockDim.y == 1).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

namespace fastnn::cuda {

// Half types compute in float; float64 in float64 (as on the CPU).
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

template <typename A> __host__ __device__ constexpr A neg_inf() { return -std::numeric_limits<A>::infinity(); }

// exp/log in the accumulation type: the hardware approximations for float (memory-bound kernels cannot afford
// the accurate ones' instruction count; the error stays well under the float32 test tolerance), libdevice for
// double.
__device__ __forceinline__ float exp_(float x) { return __expf(x); }
__device__ __forceinline__ double exp_(double x) { return ::exp(x); }
__device__ __forceinline__ float log_(float x) { return __logf(x); }
__device__ __forceinline__ double log_(double x) { return ::log(x); }

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// ---- 16-byte vectors: a row is read as "slots" of kVec<T> elements.
template <typename T> constexpr int kVec = 16 / sizeof(T);
template <typename T, int N = kVec<T>> struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Elements [slot*N, slot*N + N) of a row of n elements. `vec`: the row starts 16-byte aligned and n % N == 0, so
// the slot is one 16-byte load; otherwise element by element, `fill` past the end of the row.
template <typename T, int N = kVec<T>>
__device__ __forceinline__ Vec<T, N> load_slot(const T* row, int64_t slot, int64_t n, bool vec, T fill) {
  if (vec) return reinterpret_cast<const Vec<T, N>*>(row)[slot];
  Vec<T, N> r;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const int64_t i = slot * N + j;
    r.v[j] = i < n ? row[i] : fill;
  }
  return r;
}

template <typename T, int N = kVec<T>>
__device__ __forceinline__ void store_slot(T* row, int64_t slot, int64_t n, bool vec, const Vec<T, N>& r) {
  if (vec) {
    reinterpret_cast<Vec<T, N>*>(row)[slot] = r;
    return;
  }
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const int64_t i = slot * N + j;
    if (i < n) row[i] = r.v[j];
  }
}

// ---- online log-sum-exp: running max m and s = sum(exp(x - m)), mergeable in any order.
// IEEE cases follow torch: a row of all -inf ends with m = -inf, s = 0 (so softmax gives 0/0 = NaN); a NaN or
// a +inf anywhere makes s NaN. fmax ignores NaN, so m itself is never NaN and the NaN travels in s.
template <typename A> struct LogSumExp {
  A m, s;

  __device__ static LogSumExp empty() { return {neg_inf<A>(), A(0)}; }

  // s rescaled from max m to max mn >= m; m == mn also covers -inf == -inf, whose exp(m - mn) would be NaN.
  __device__ static A rescale(A s, A m, A mn) { return m == mn ? s : s * exp_(m - mn); }

  // Adds k values (-inf entries, such as padding, contribute nothing): one exp per value, plus one per call
  // when the max grows.
  template <int K> __device__ void add(const A (&x)[K]) {
    A mb = x[0];
#pragma unroll
    for (int j = 1; j < K; ++j) mb = fmax(mb, x[j]);
    const A mn = fmax(m, mb);
    A acc = rescale(s, m, mn);
#pragma unroll
    for (int j = 0; j < K; ++j) acc += x[j] == neg_inf<A>() ? A(0) : exp_(x[j] - mn);
    m = mn;
    s = acc;
  }

  __device__ static LogSumExp merge(const LogSumExp& a, const LogSumExp& b) {
    const A mn = fmax(a.m, b.m);
    return {mn, rescale(a.s, a.m, mn) + rescale(b.s, b.m, mn)};
  }

  __device__ A value() const { return m + log_(s); }  // log(sum(exp(x)))
};

// ---- reductions
struct SumOp {
  template <typename A> __device__ A operator()(A a, A b) const { return a + b; }
};
struct MaxOp {
  template <typename A> __device__ A operator()(A a, A b) const { return fmax(a, b); }
};
struct MergeOp {
  template <typename A> __device__ LogSumExp<A> operator()(const LogSumExp<A>& a, const LogSumExp<A>& b) const {
    return LogSumExp<A>::merge(a, b);
  }
};

template <typename A> __device__ __forceinline__ A shfl_xor(A v, int lane_mask, int width) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask, width);
}
template <typename A>
__device__ __forceinline__ LogSumExp<A> shfl_xor(const LogSumExp<A>& v, int lane_mask, int width) {
  return {shfl_xor(v.m, lane_mask, width), shfl_xor(v.s, lane_mask, width)};
}

// Reduces over aligned groups of `width` lanes (a power of two <= 32); every lane gets the result. All 32 lanes
// of the warp must call it.
template <typename V, typename Op> __device__ __forceinline__ V warp_reduce(V v, Op op, int width = 32) {
  for (int o = width >> 1; o > 0; o >>= 1) v = op(v, shfl_xor(v, o, width));
  return v;
}

// Reduces over a 1-D block (blockDim.x a multiple of 32, at most 1024); every thread gets the result. Every
// thread must call it; it synchronizes twice so the shared scratch is free again on return.
template <typename V, typename Op> __device__ __forceinline__ V block_reduce(V v, Op op) {
  __shared__ __align__(16) unsigned char raw[32 * sizeof(V)];
  V* scratch = reinterpret_cast<V*>(raw);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_reduce(v, op);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  V r = scratch[0];
  for (int w = 1; w < warps; ++w) r = op(r, scratch[w]);
  __syncthreads();
  return r;
}

// Reduces over the blockDim.x threads sharing a threadIdx.y (see the layout note at the top).
template <typename V, typename Op> __device__ __forceinline__ V row_reduce(V v, Op op) {
  return blockDim.x <= 32 ? warp_reduce(v, op, blockDim.x) : block_reduce(v, op);
}

// A slot widened to the accumulation type.
template <typename T, int N = kVec<T>, typename A = acc_t<T>>
__device__ __forceinline__ void widen(const Vec<T, N>& in, A (&out)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = static_cast<A>(in.v[j]);
}

}  // namespace fastnn::cuda
