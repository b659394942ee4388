// Pieces of binary cross-entropy with logits shared by the CPU and CUDA kernels: argument checks, the outputs and
// the in-place broadcast operands (weight, pos_weight, grad_output).
#pragma once
#include <ATen/ExpandUtils.h>
#include <ATen/core/Reduction.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <utility>

#include "common.h"

namespace fastnn::bce {

// An operand seen through input's flat index; data == nullptr means absent (reads as 1).
template <typename T> struct Operand {
  const T* data = nullptr;
  Broadcast b;
};

// The operand and the tensor that keeps its data alive.
template <typename T>
at::Tensor make_operand(const std::optional<at::Tensor>& t, at::IntArrayRef shape, Operand<T>& o) {
  if (!t.has_value()) return {};
  at::Tensor keep = broadcast_operand(*t, shape, o.b);
  o.data = keep.const_data_ptr<T>();
  return keep;
}

// weight, pos_weight and (backward) grad_output as operands over x's flat index, and the tensors that keep them.
template <typename T> struct Operands {
  Operand<T> w, pw, g;
  bool has_pw;
  at::Tensor keep_w, keep_pw, keep_g;
  Operands(const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
           const std::optional<at::Tensor>& grad_output = std::nullopt)
      : has_pw(pos_weight.has_value()),
        keep_w(make_operand(weight, x.sizes(), w)),
        keep_pw(make_operand(pos_weight, x.sizes(), pw)),
        keep_g(make_operand(grad_output, x.sizes(), g)) {}
};

inline void check_args(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
  check_floating(input, "input");
  check_same(input, "input", target, "target");
  for (const auto& [t, name] : {std::make_pair(&weight, "weight"), std::make_pair(&pos_weight, "pos_weight")}) {
    if (!t->has_value()) continue;
    const at::Tensor& v = **t;
    TORCH_CHECK(v.device() == input.device(), name, " must be on input's device ", input.device(), ", got ",
                v.device());
    TORCH_CHECK(v.scalar_type() == input.scalar_type(), name, " must have input's dtype ", input.scalar_type(),
                ", got ", v.scalar_type());
    TORCH_CHECK(at::is_expandable_to(v.sizes(), input.sizes()), name, " of shape ", v.sizes(),
                " cannot be broadcast to input's shape ", input.sizes());
  }
  TORCH_CHECK(reduction >= at::Reduction::None && reduction <= at::Reduction::Sum,
              "reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

// The backward's arguments: the forward's, and grad_output shaped like the forward's output.
inline void check_bwd_args(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& target,
                           const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                           int64_t reduction) {
  check_args(input, target, weight, pos_weight, reduction);
  TORCH_CHECK(grad_output.device() == input.device() && grad_output.scalar_type() == input.scalar_type(),
              "grad_output must have input's dtype and device, got ", grad_output.scalar_type(), " on ",
              grad_output.device());
  TORCH_CHECK(reduction == at::Reduction::None ? grad_output.sizes() == input.sizes() : grad_output.dim() == 0,
              "grad_output must have shape ", reduction == at::Reduction::None ? input.sizes() : at::IntArrayRef{},
              " for reduction ", reduction, ", got ", grad_output.sizes());
}

// The forward's output: input's shape for reduction none, else a scalar, uninitialized unless x is empty (then a
// reduction is already final: NaN for mean, 0 for sum, as torch).
// `empty(sizes, options)` allocates the input-sized tensors (the CPU kernels pass their caching allocator's).
template <typename Empty> at::Tensor fwd_output(const at::Tensor& x, int64_t reduction, Empty&& empty) {
  if (reduction == at::Reduction::None) return empty(x.sizes(), x.options());
  if (x.numel() == 0) return at::full({}, reduction == at::Reduction::Mean ? NAN : 0.0, x.options());
  return at::empty({}, x.options());
}

// The backward's (grad_input, grad_target), uninitialized: input's shape where asked for, else empty.
template <typename Empty>
std::tuple<at::Tensor, at::Tensor> bwd_outputs(const at::Tensor& x, bool input_grad, bool target_grad, Empty&& empty) {
  return {input_grad ? empty(x.sizes(), x.options()) : at::empty({0}, x.options()),
          target_grad ? empty(x.sizes(), x.options()) : at::empty({0}, x.options())};
}

// The same with at::empty (the CUDA kernels: torch's caching allocator already reuses blocks).
inline at::Tensor torch_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}
inline at::Tensor fwd_output(const at::Tensor& x, int64_t reduction) { return fwd_output(x, reduction, torch_empty); }
inline std::tuple<at::Tensor, at::Tensor> bwd_outputs(const at::Tensor& x, bool input_grad, bool target_grad) {
  return bwd_outputs(x, input_grad, target_grad, torch_empty);
}

// d(loss)/d(element loss): 1 / n for the mean, else 1.
template <typename A> A grad_scale(int64_t reduction, int64_t n) {
  return reduction == at::Reduction::Mean ? A(1) / A(n) : A(1);
}

}  // namespace fastnn::bce
