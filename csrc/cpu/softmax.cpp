// Softmax and log-softmax on the CPU, forward and backward, over any dim.
//
// Last dim (inner == 1), rows parallel over cores. A row that fits in cache takes the classic passes: max (one
// read of x from memory), exp + sum storing exp (x from cache), then a scale in cache - one exp per element (an output
// written with streaming stores keeps the exp in a scratch row of the task instead).
// A row too long for the cache (> kOnlineRow) takes the online form instead: one read computes max and sum
// together block by block, a second writes the result - two reads of x rather than three plus a re-read of y.
// Other dims (inner > 1) run the same reductions across `inner`-contiguous slabs so they vectorize without a
// transposing copy.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include "cpu/alloc.h"
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "common.h"
#include "cpu/slabs.h"
#include "cpu/vec.h"

namespace fastnn::cpu {
namespace {

constexpr int64_t kOnlineRow = 1 << 16;  // elements; x and y rows together then exceed half the 1 MiB L2
constexpr int64_t kOnlineBlock = 2048;   // an L1-sized block of the online pass
constexpr int64_t kGrain = 32768;        // elements per parallel task, ATen's default grain

// One row, in the accumulation type. y may alias x. STREAM: y is written with streaming stores (write_row); a
// softmax row that fits in cache then keeps its exp in scratch (n elements, the task's own, so it stays in cache)
// and scales it from there into y, where a plain store of exp into y would first read y's lines from memory.
template <typename A, bool LOG, bool STREAM> void softmax_row(const A* x, A* y, int64_t n, A* scratch) {
  A m, s;
  if (n <= kOnlineRow) {
    m = max_of(x, n);
    if constexpr (LOG) {
      s = sum_exp<A, false>(x, m, nullptr, n);
    } else {
      A* e = STREAM ? scratch : y;
      s = sum_exp<A, true>(x, m, e, n);
      const A inv = A(1) / s;
      write_row<STREAM>(y, n, [&](int64_t i, int64_t len) { return load(e + i, len) * inv; });
      return;
    }
  } else {
    m = -std::numeric_limits<A>::infinity();
    s = 0;
    for (int64_t b = 0; b < n; b += kOnlineBlock) {
      const int64_t len = std::min(kOnlineBlock, n - b);
      const A mb = max_of(x + b, len);
      if (mb != mb) { m = mb; break; }  // a NaN makes the whole row NaN
      if (mb == -std::numeric_limits<A>::infinity()) continue;
      const A sb = sum_exp<A, false>(x + b, mb, nullptr, len);
      const A mn = std::max(m, mb);
      s = s * exp(m - mn) + sb * exp(mb - mn);  // m = -inf at first: exp(-inf) = 0
      m = mn;
    }
    if constexpr (!LOG) {
      const A inv = A(1) / s;
      write_row<STREAM>(y, n, [&](int64_t i, int64_t len) { return exp(load(x + i, len) - m) * inv; });
      return;
    }
  }
  // (x - m) - log(s), not x - (m + log(s)): with |x| ~ 1e4 the sum m + log(s) would round away log(s).
  const A ls = std::log(s);
  write_row<STREAM>(y, n, [&](int64_t i, int64_t len) { return (load(x + i, len) - m) - ls; });
}

// grad_input of one row: softmax  dx = y * (dy - sum(dy * y));  log_softmax  dx = dy - exp(y) * sum(dy).
template <typename A, bool LOG, bool STREAM> void softmax_bwd_row(const A* dy, const A* y, A* dx, int64_t n) {
  if constexpr (LOG) {
    const A s = sum(dy, n);
    write_row<STREAM>(dx, n, [&](int64_t i, int64_t len) { return load(dy + i, len) - exp(load(y + i, len)) * s; });
  } else {
    const A d = dot(dy, y, n);
    write_row<STREAM>(dx, n, [&](int64_t i, int64_t len) { return load(y + i, len) * (load(dy + i, len) - d); });
  }
}

int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(n, 1)); }

template <typename T, bool LOG> void fwd_lastdim(const T* x, T* y, int64_t rows, int64_t n) {
  using A = acc_t<T>;
  with_stream(streams<T>(rows * n), [&](auto stream) {
    constexpr bool S = decltype(stream)::value;
    at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
      if constexpr (std::is_same_v<T, A>) {
        // One scratch row per task, not per row (softmax_row).
        std::unique_ptr<A[]> scratch(S && !LOG && n <= kOnlineRow ? new A[n] : nullptr);
        for (int64_t r = begin; r < end; ++r) softmax_row<A, LOG, S>(x + r * n, y + r * n, n, scratch.get());
        stream_fence<S>();
      } else {
        std::unique_ptr<A[]> buf(new A[n]);  // one buffer per task, not per row
        for (int64_t r = begin; r < end; ++r) {
          load_row(x + r * n, buf.get(), n);
          softmax_row<A, LOG, false>(buf.get(), buf.get(), n, nullptr);
          store_row(buf.get(), y + r * n, n);
        }
      }
    });
  });
}

template <typename T, bool LOG> void bwd_lastdim(const T* dy, const T* y, T* dx, int64_t rows, int64_t n) {
  using A = acc_t<T>;
  with_stream(streams<T>(rows * n), [&](auto stream) {
    constexpr bool S = decltype(stream)::value;
    at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
      if constexpr (std::is_same_v<T, A>) {
        for (int64_t r = begin; r < end; ++r) softmax_bwd_row<A, LOG, S>(dy + r * n, y + r * n, dx + r * n, n);
        stream_fence<S>();
      } else {
        std::unique_ptr<A[]> buf(new A[2 * n]);
        A *bdy = buf.get(), *by = buf.get() + n;
        for (int64_t r = begin; r < end; ++r) {
          load_row(dy + r * n, bdy, n);
          load_row(y + r * n, by, n);
          softmax_bwd_row<A, LOG, false>(bdy, by, bdy, n);
          store_row(bdy, dx + r * n, n);
        }
      }
    });
  });
}

// One slab: w <= kSlab rows side by side, element k of row j at x[k * stride + j] (y likewise; y may be x). The
// reductions run along k as vector operations across the rows.
template <typename T, bool LOG> void fwd_slab(const T* x, T* y, int64_t n, int64_t stride, int64_t w) {
  using A = acc_t<T>;
  constexpr A ninf = -std::numeric_limits<A>::infinity();
  alignas(64) A m[kSlab], s[kSlab];
  std::fill(m, m + kSlab, ninf);
  std::fill(s, s + kSlab, A(0));
  for (int64_t k = 0; k < n; ++k) {
    const T* xr = x + k * stride;
    for_chunks<A>(w, [&](int64_t j, int64_t len) { store(m + j, vmax(load(m + j), load_as<A>(xr + j, len, ninf))); });
  }
  alignas(64) A comp[kSlab] = {};
  for (int64_t k = 0; k < n; ++k) {
    const T* xr = x + k * stride;
    for_chunks<A>(w, [&](int64_t j, int64_t len) {
      kahan_add(s + j, comp + j, exp(load_as<A>(xr + j, len) - load(m + j)));
    });
  }
  for_chunks<A>(w, [&](int64_t j, int64_t) { store(s + j, LOG ? log(load(s + j)) : A(1) / load(s + j)); });
  for (int64_t k = 0; k < n; ++k) {
    const T* xr = x + k * stride;
    T* yr = y + k * stride;
    for_chunks<A>(w, [&](int64_t j, int64_t len) {
      const vec<A> shifted = load_as<A>(xr + j, len) - load(m + j);
      store_as<A>(yr + j, LOG ? shifted - load(s + j) : exp(shifted) * load(s + j), len);
    });
  }
}

// Rows of at most this many elements take the slab form (fwd_slab) kSlab rows at a time, transposed into a
// [n][kSlab] buffer: on its own such a row is one or two vectors whose horizontal max and sum, and the scalar log
// or division, are most of its work. The transposes cost what that saves from about 24 elements on
// (docs/measurements.md, "Short rows and spatial inputs as slabs").
constexpr int64_t kShortRow = 24;

template <typename T, bool LOG> void fwd_short_rows(const T* x, T* y, int64_t rows, int64_t n) {
  using A = acc_t<T>;
  for_slabs(1, n, rows, kGrain, [&](int64_t, int64_t first, int64_t w) {
    alignas(64) A buf[kShortRow * kSlab];
    rows_to_slab(x, n, first, w, buf);
    fwd_slab<A, LOG>(buf, buf, n, kSlab, w);
    slab_to_rows(buf, n, first, w, y);
  });
}

template <typename T, bool LOG> void fwd_inner(const T* x, T* y, const DimGeometry& g) {
  for_slabs(g.outer, g.size, g.inner, kGrain, [&](int64_t base, int64_t, int64_t w) {
    fwd_slab<T, LOG>(x + base, y + base, g.size, g.inner, w);
  });
}

template <typename T, bool LOG> void bwd_inner(const T* dy, const T* y, T* dx, const DimGeometry& g) {
  using A = acc_t<T>;
  const int64_t n = g.size, stride = g.inner;
  for_slabs(g.outer, n, stride, kGrain, [&](int64_t base, int64_t, int64_t w) {
    alignas(64) A d[kSlab];
    std::fill(d, d + kSlab, A(0));
    for (int64_t k = 0; k < n; ++k) {
      const T *dyr = dy + base + k * stride, *yr = y + base + k * stride;
      for_chunks<A>(w, [&](int64_t j, int64_t len) {
        const vec<A> g_ = load_as<A>(dyr + j, len);
        store(d + j, load(d + j) + (LOG ? g_ : g_ * load_as<A>(yr + j, len)));
      });
    }
    for (int64_t k = 0; k < n; ++k) {
      const T *dyr = dy + base + k * stride, *yr = y + base + k * stride;
      T* dxr = dx + base + k * stride;
      for_chunks<A>(w, [&](int64_t j, int64_t len) {
        const vec<A> g_ = load_as<A>(dyr + j, len), v = load_as<A>(yr + j, len);
        store_as<A>(dxr + j, LOG ? g_ - exp(v) * load(d + j) : v * (g_ - load(d + j)), len);
      });
    }
  });
}

at::Tensor softmax_fwd_cpu(const at::Tensor& input, int64_t dim, bool log) {
  check_floating(input, "input");
  dim = wrap_dim(dim, input.dim());
  const at::Tensor x = input.contiguous();
  at::Tensor y = cached_empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  const DimGeometry g(x, dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "softmax_fwd_cpu", [&] {
    const auto* xp = x.const_data_ptr<scalar_t>();
    auto* yp = y.mutable_data_ptr<scalar_t>();
    if (g.inner == 1 && g.size <= kShortRow) {
      log ? fwd_short_rows<scalar_t, true>(xp, yp, g.outer, g.size)
          : fwd_short_rows<scalar_t, false>(xp, yp, g.outer, g.size);
    } else if (g.inner == 1) {
      log ? fwd_lastdim<scalar_t, true>(xp, yp, g.outer, g.size)
          : fwd_lastdim<scalar_t, false>(xp, yp, g.outer, g.size);
    } else {
      log ? fwd_inner<scalar_t, true>(xp, yp, g) : fwd_inner<scalar_t, false>(xp, yp, g);
    }
  });
  return y;
}

at::Tensor softmax_bwd_cpu(const at::Tensor& grad_output, const at::Tensor& output, int64_t dim, bool log) {
  check_floating(output, "output");
  check_same(grad_output, "grad_output", output, "output");
  dim = wrap_dim(dim, output.dim());
  const at::Tensor dy = grad_output.contiguous(), y = output.contiguous();
  at::Tensor dx = cached_empty(y.sizes(), y.options());
  if (y.numel() == 0) return dx;
  const DimGeometry g(y, dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "softmax_bwd_cpu", [&] {
    const auto *dyp = dy.const_data_ptr<scalar_t>(), *yp = y.const_data_ptr<scalar_t>();
    auto* dxp = dx.mutable_data_ptr<scalar_t>();
    if (g.inner == 1) {
      log ? bwd_lastdim<scalar_t, true>(dyp, yp, dxp, g.outer, g.size)
          : bwd_lastdim<scalar_t, false>(dyp, yp, dxp, g.outer, g.size);
    } else {
      log ? bwd_inner<scalar_t, true>(dyp, yp, dxp, g) : bwd_inner<scalar_t, false>(dyp, yp, dxp, g);
    }
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnn, CPU, m) {
  m.impl("softmax_fwd", &softmax_fwd_cpu);
  m.impl("softmax_bwd", &softmax_bwd_cpu);
}

}  // namespace fastnn::cpu
