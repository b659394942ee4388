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

}  // namespace fastnn
