// Cross-entropy pieces shared by the CPU and CUDA kernels, and by linear + cross-entropy's
// (csrc/linear_cross_entropy.h): the argument checks, the loss geometry, the per-row statistics and the outputs.
//
// Per row (logits x, max m, lse = m + log(s), p = exp((x - m) - log(s)), smoothing eps over C classes, class
// weights w, W = sum(w)):
//   class index t:  loss = (1 - eps) w_t (lse - x_t) + eps/C (W lse - sum_c w_c x_c)
//                   dx_c = g [((1 - eps) w_t + eps/C W) p_c - eps/C w_c - (1 - eps) w_t [c == t]]
//   probabilities:  y'_c = (1 - eps) y_c + eps/C,  S = sum_c w_c y'_c
//                   loss = S lse - sum_c w_c y'_c x_c,   dx_c = g (S p_c - w_c y'_c)
// exactly torch's cross_entropy before its reduction (an ignored row: loss 0, gradient 0).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common.h"

namespace fastnn {

// input viewed as [outer = N, C, inner = d1 * d2 ...]; a "row" is one (n, d) position, rows = outer * inner.
struct CeGeometry {
  int64_t outer = 1, classes = 1, inner = 1;
  int64_t rows() const { return outer * inner; }
};

inline at::ScalarType ce_acc_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

// The per-row statistics cross_entropy_fwd saves for the backward ("stats"): shape (2, rows...) in the accumulation
// dtype, stats[0] the row's max m and stats[1] = log(sum(exp(x - m))); the backward computes
// p = exp((x - m) - stats[1]), as torch's log_softmax does. Not the logsumexp m + log(s) in one number: rounded, it
// is off by up to ulp(m) / 2 (5e-4 in float32 at |x| ~ 1e4; all of log(s) at |x| ~ 3e38, even in float64), which
// exp(x - lse) turns into a softmax error.
template <typename A> A* stat_plane(const at::Tensor& stats, int64_t i) {
  return static_cast<A*>(stats.select(0, i).data_ptr());
}

// Checks the arguments of cross_entropy_fwd/bwd; returns the geometry and whether target holds probabilities.
inline CeGeometry check_ce_args(const at::Tensor& input, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, double label_smoothing, bool& prob) {
  check_floating(input, "input");
  TORCH_CHECK(input.dim() >= 2, "cross_entropy: input must be (N, C, ...), got shape ", input.sizes());
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0,
              "cross_entropy: label_smoothing must be in [0, 1], got ", label_smoothing);
  CeGeometry g;
  g.outer = input.size(0);
  g.classes = input.size(1);
  for (int64_t i = 2; i < input.dim(); ++i) g.inner *= input.size(i);
  prob = target.is_floating_point();
  TORCH_CHECK(target.device() == input.device(), "cross_entropy: target must be on input's device ", input.device(),
              ", got ", target.device());
  if (prob) {
    check_same(target, "target", input, "input");
  } else {
    TORCH_CHECK(target.scalar_type() == at::kLong, "cross_entropy: target must be int64 class indices or ",
                "probabilities of input's dtype, got ", target.scalar_type());
    std::vector<int64_t> expect{input.size(0)};
    for (int64_t i = 2; i < input.dim(); ++i) expect.push_back(input.size(i));
    TORCH_CHECK(target.sizes() == at::IntArrayRef(expect), "cross_entropy: target of class indices must have shape ",
                at::IntArrayRef(expect), " for input of shape ", input.sizes(), ", got ", target.sizes());
  }
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == g.classes, "cross_entropy: weight must be (C,) = (",
                g.classes, ",), got ", weight->sizes());
    TORCH_CHECK(weight->scalar_type() == input.scalar_type() && weight->device() == input.device(),
                "cross_entropy: weight must have input's dtype and device");
  }
  return g;
}

// grad_loss: one value per row, in the accumulation dtype (cross_entropy_bwd and _fwd_grad).
inline void check_ce_grad_loss(const at::Tensor& grad_loss, const CeGeometry& g, const at::Tensor& input) {
  const auto acc = ce_acc_type(input.scalar_type());
  TORCH_CHECK(grad_loss.numel() == g.rows() && grad_loss.scalar_type() == acc, "cross_entropy: grad_loss must have ",
              "one value per row (", g.rows(), ") in ", acc, ", got ", grad_loss.numel(), " of ",
              grad_loss.scalar_type());
  TORCH_CHECK(grad_loss.device() == input.device(), "cross_entropy: grad_loss must be on input's device ",
              input.device(), ", got ", grad_loss.device());
}

inline void check_ce_bwd_args(const at::Tensor& grad_loss, const at::Tensor& stats, const CeGeometry& g,
                              const at::Tensor& input) {
  check_ce_grad_loss(grad_loss, g, input);
  const auto acc = ce_acc_type(input.scalar_type());
  TORCH_CHECK(stats.dim() >= 1 && stats.size(0) == 2 && stats.numel() == 2 * g.rows() && stats.scalar_type() == acc,
              "cross_entropy_bwd: stats must be (2, rows...) of ", acc, " with two values per row (", g.rows(),
              "), got ", stats.sizes(), " of ", stats.scalar_type());
}

// The outputs (loss, stats) of cross_entropy_fwd, uninitialized, in the accumulation dtype: loss of input's shape
// without the class dim, stats (2, that shape) (stat_plane).
inline std::tuple<at::Tensor, at::Tensor> ce_fwd_outputs(const at::Tensor& input, const CeGeometry& g) {
  TORCH_CHECK(g.rows() == 0 || g.classes > 0, "cross_entropy: input has no classes (C = 0)");
  std::vector<int64_t> shape{input.size(0)};
  for (int64_t i = 2; i < input.dim(); ++i) shape.push_back(input.size(i));
  const auto opts = input.options().dtype(ce_acc_type(input.scalar_type()));
  std::vector<int64_t> stats{2};
  stats.insert(stats.end(), shape.begin(), shape.end());
  return {at::empty(shape, opts), at::empty(stats, opts)};
}

}  // namespace fastnn
