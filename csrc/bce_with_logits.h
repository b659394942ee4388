// Pieces of binary cross-entropy with logits shared by the CPU and CUDA kernels: argument checks and the
// in-place broadcast operands (weight, pos_weight, grad_output).
#pragma once
#include <ATen/ExpandUtils.h>
#include <ATen/core/Reduction.h>
#include <ATen/core/Tensor.h>

#include <optional>
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

inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input, int64_t reduction) {
  TORCH_CHECK(grad_output.device() == input.device() && grad_output.scalar_type() == input.scalar_type(),
              "grad_output must have input's dtype and device, got ", grad_output.scalar_type(), " on ",
              grad_output.device());
  TORCH_CHECK(reduction == at::Reduction::None ? grad_output.sizes() == input.sizes() : grad_output.dim() == 0,
              "grad_output must have shape ", reduction == at::Reduction::None ? input.sizes() : at::IntArrayRef{},
              " for reduction ", reduction, ", got ", grad_output.sizes());
}

}  // namespace fastnn::bce
