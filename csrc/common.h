// Helpers shared by the CPU and CUDA kernels of every op.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>

namespace fastnn {

// A tensor seen as [outer, size, inner] around one dimension: rows are the `size` elements that a reduction
// over `dim` visits, `inner` apart. Last-dim reductions have inner == 1.
struct DimGeometry {
  int64_t outer = 1, size = 1, inner = 1;
  DimGeometry(const at::Tensor& t, int64_t dim) {
    const int64_t nd = t.dim();
    for (int64_t i = 0; i < nd; ++i) {
      if (i < dim) outer *= t.size(i);
      else if (i == dim) size = t.size(i);
      else inner *= t.size(i);
    }
  }
};

// Wraps a possibly negative dim the way torch does (a 0-d tensor accepts dim 0 and -1).
inline int64_t wrap_dim(int64_t dim, int64_t ndim, const char* arg = "dim") {
  const int64_t n = ndim == 0 ? 1 : ndim;
  TORCH_CHECK_INDEX(dim >= -n && dim < n, arg, " out of range: expected a value in [", -n, ", ", n - 1,
                    "] for a ", ndim, "-d tensor, got ", dim);
  return dim < 0 ? dim + n : dim;
}

inline void check_floating(const at::Tensor& t, const char* arg) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, arg,
              " must be float32, float64, float16 or bfloat16, got ", s);
}

inline void check_same(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), an, " and ", bn, " must be on the same device, got ", a.device(), " and ",
              b.device());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), an, " and ", bn, " must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.sizes() == b.sizes(), an, " and ", bn, " must have the same shape, got ", a.sizes(), " and ",
              b.sizes());
}


#ifdef __CUDACC__
#define FASTNN_HOST_DEVICE __host__ __device__
#define FASTNN_UNROLL _Pragma("unroll")
#else
#define FASTNN_HOST_DEVICE
#define FASTNN_UNROLL _Pragma("GCC unroll 4")
#endif

// A small operand broadcast over a big contiguous tensor (a loss's weight, pos_weight or grad_output), read in
// place rather than expanded: its expanded strides with size-1 dims dropped and mergeable dims coalesced, indexed
// by the big tensor's flat index. The ndim dims sit right-aligned in size/stride (innermost last, so every index
// is a compile-time constant once the loops unroll: no local memory on the GPU). Runs of size[kMaxDims - 1]
// consecutive flat indices are contiguous (stride 1) or one repeated value (stride 0), so a CPU kernel can
// vectorize inside a run.
struct Broadcast {
  static constexpr int kMaxDims = 4;
  int ndim = 1;
  int64_t size[kMaxDims] = {1, 1, 1, 1};
  int64_t stride[kMaxDims] = {0, 0, 0, 0};

  // Element offset of flat index i. The outermost used dim needs no modulo (i < numel), so the common layouts
  // (full, scalar: no division; a (C,) vector along the last dim: one) stay cheap.
  FASTNN_HOST_DEVICE int64_t offset(int64_t i) const {
    int64_t off = 0;
    FASTNN_UNROLL
    for (int d = kMaxDims - 1; d >= 0; --d) {
      if (d > kMaxDims - ndim) {
        off += (i % size[d]) * stride[d];
        i /= size[d];
      } else if (d == kMaxDims - ndim) {
        off += i * stride[d];
      }
    }
    return off;
  }
  // Flat indices from i to the end of its innermost run.
  FASTNN_HOST_DEVICE int64_t run(int64_t i) const { return size[kMaxDims - 1] - i % size[kMaxDims - 1]; }
  FASTNN_HOST_DEVICE int64_t inner_stride() const { return stride[kMaxDims - 1]; }

  // Describes `expanded` (a view with the big tensor's shape); false when it needs more than kMaxDims dims or
  // its innermost stride is neither 0 nor 1.
  bool describe(const at::Tensor& expanded) {
    int n = 0;
    int64_t sz[kMaxDims], st[kMaxDims];
    for (int64_t d = 0; d < expanded.dim(); ++d) {
      const int64_t s = expanded.size(d), t = expanded.stride(d);
      if (s == 1) continue;
      if (n > 0 && st[n - 1] == s * t) {
        sz[n - 1] *= s;
        st[n - 1] = t;
      } else {
        if (n == kMaxDims) return false;
        sz[n] = s;
        st[n] = t;
        ++n;
      }
    }
    if (n == 0) {  // a single element: one stride-0 run over everything
      sz[0] = expanded.numel();
      st[0] = 0;
      n = 1;
    }
    if (st[n - 1] != 0 && st[n - 1] != 1) return false;
    ndim = n;
    for (int d = 0; d < kMaxDims; ++d) {
      const int k = d - (kMaxDims - n);  // right-align
      size[d] = k >= 0 ? sz[k] : 1;
      stride[d] = k >= 0 ? st[k] : 0;
    }
    return true;
  }
};

// `t` broadcast to `shape` as a Broadcast `b`; the returned tensor owns the data b points into. A layout that
// cannot be described as is is made contiguous in t's own shape first, and only if that is not enough expanded
// into a full copy.
inline at::Tensor broadcast_operand(const at::Tensor& t, at::IntArrayRef shape, Broadcast& b) {
  at::Tensor e = t.expand(shape);
  if (b.describe(e)) return e;
  e = t.contiguous().expand(shape);
  if (b.describe(e)) return e;
  e = t.expand(shape).contiguous();
  TORCH_INTERNAL_ASSERT(b.describe(e));
  return e;
}

}  // namespace fastnn
