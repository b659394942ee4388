// Reductions over a dimension that is not the last ([outer, size, inner] with inner > 1, common.h's DimGeometry):
// softmax over other dims, and cross-entropy over the classes of a spatial input (N, C, d...).
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "cpu/vec.h"

namespace fastnn::cpu {

// Positions of one slab: the reductions run along `size` with the slab's positions contiguous in every step, so
// their loops are vector operations across positions, with no transposing copy or gathered row.
constexpr int64_t kSlab = 64;

// f(base, first, w) for every slab, in parallel: w <= kSlab positions side by side of one outer index o, starting
// at position i0; base = o * size * inner + i0 is the offset of its first element and first = o * inner + i0 its
// first position counted over [outer, inner] (a row index of the reduced tensor). A task takes about `grain`
// elements.
template <typename F> void for_slabs(int64_t outer, int64_t size, int64_t inner, int64_t grain, F&& f) {
  const int64_t blocks = (inner + kSlab - 1) / kSlab;
  const int64_t slabs_per_task = std::max<int64_t>(1, grain / std::max<int64_t>(size * kSlab, 1));
  at::parallel_for(0, outer * blocks, slabs_per_task, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o = t / blocks, i0 = (t % blocks) * kSlab;
      f(o * size * inner + i0, o * inner + i0, std::min(kSlab, inner - i0));
    }
  });
}

// Rows [first, first + w) of a row-major [rows, n] into the slab layout buf[k * kSlab + j] (row first + j,
// element k), in the accumulation type A, and back: short rows run as a slab through such a buffer.
template <typename A, typename T> inline void rows_to_slab(const T* x, int64_t n, int64_t first, int64_t w, A* buf) {
  for (int64_t j = 0; j < w; ++j)
    for (int64_t k = 0; k < n; ++k) buf[k * kSlab + j] = static_cast<A>(x[(first + j) * n + k]);
}
template <typename A, typename T> inline void slab_to_rows(const A* buf, int64_t n, int64_t first, int64_t w, T* y) {
  for (int64_t j = 0; j < w; ++j)
    for (int64_t k = 0; k < n; ++k) y[(first + j) * n + k] = static_cast<T>(buf[k * kSlab + j]);
}

// sum[0, W) += v (W: a vector's lanes) with Kahan's compensation in comp: a slab sums each row's terms one after
// another, and a row like [x, 0, ..., 0] adds its many small terms to an accumulator near 1, each rounded to its
// ulp (float32: 17 ulp after 39 terms, where a row's own vector sum keeps the small terms in other lanes).
template <typename A> inline void kahan_add(A* sum, A* comp, vec<A> v) {
  const vec<A> y = v - load(comp), s = load(sum), t = s + y;
  store(comp, (t - s) - y);
  store(sum, t);
}

}  // namespace fastnn::cpu
