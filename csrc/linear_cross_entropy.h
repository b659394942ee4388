// Linear + cross-entropy, shared by the CPU and CUDA kernels: the argument checks and the chunk loop, ATen matmuls
// (device-agnostic) around a device's fused cross-entropy rows (csrc/cross_entropy.h has the formulas). The float32
// CPU kernel skips the loop for its own fused one (csrc/cpu/linear_cross_entropy.cpp).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cross_entropy.h"

namespace fastnn {

// The checks of linear_cross_entropy_fwd and _bwd.
inline void check_linear_ce_args(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& target,
                                 const std::optional<at::Tensor>& class_weight, int64_t chunk) {
  check_floating(input, "input");
  TORCH_CHECK(input.dim() == 2 && weight.dim() == 2 && input.size(1) == weight.size(1),
              "linear_cross_entropy: input must be (N, D) and weight (V, D), got ", input.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type() && weight.device() == input.device(),
              "linear_cross_entropy: weight must have input's dtype and device");
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == input.scalar_type(),
                "linear_cross_entropy: bias must be (V,) of input's dtype, got ", bias->sizes());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == input.size(0) && target.scalar_type() == at::kLong,
              "linear_cross_entropy: target must be (N,) int64, got ", target.sizes(), " ", target.scalar_type());
  if (class_weight.has_value())
    TORCH_CHECK(class_weight->dim() == 1 && class_weight->size(0) == weight.size(0) &&
                    class_weight->scalar_type() == input.scalar_type() && class_weight->device() == input.device(),
                "linear_cross_entropy: class_weight must be (V,) of input's dtype and device, got ",
                class_weight->sizes());
  TORCH_CHECK(chunk > 0, "linear_cross_entropy: chunk must be positive, got ", chunk);
}

// Checks linear_cross_entropy_fwd's arguments; returns V, the number of classes.
inline int64_t check_linear_ce_fwd_args(const at::Tensor& input, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, const at::Tensor& target,
                                        const std::optional<at::Tensor>& class_weight, int64_t chunk) {
  check_linear_ce_args(input, weight, bias, target, class_weight, chunk);
  TORCH_CHECK(weight.size(0) > 0, "linear_cross_entropy: weight has no rows (V = 0)");
  return weight.size(0);
}

// Checks linear_cross_entropy_fwd_grad's arguments; returns V.
inline int64_t check_linear_ce_fwd_grad_args(const at::Tensor& input, const at::Tensor& weight,
                                             const std::optional<at::Tensor>& bias, const at::Tensor& target,
                                             const std::optional<at::Tensor>& class_weight,
                                             const at::Tensor& grad_loss, int64_t chunk) {
  const int64_t V = check_linear_ce_fwd_args(input, weight, bias, target, class_weight, chunk);
  const auto acc = ce_acc_type(input.scalar_type());
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == input.size(0) && grad_loss.scalar_type() == acc &&
                  grad_loss.device() == input.device(),
              "linear_cross_entropy: grad_loss must be (N,) = (", input.size(0), ",) of ", acc,
              " on input's device, got ", grad_loss.sizes(), " ", grad_loss.scalar_type());
  return V;
}

// Checks linear_cross_entropy_bwd's arguments; returns V.
inline int64_t check_linear_ce_bwd_args(const at::Tensor& grad_loss, const at::Tensor& input,
                                        const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                        const at::Tensor& target, const std::optional<at::Tensor>& class_weight,
                                        const at::Tensor& stats, int64_t chunk) {
  check_linear_ce_args(input, weight, bias, target, class_weight, chunk);
  check_ce_bwd_args(grad_loss, stats, CeGeometry{input.size(0), weight.size(0), 1}, input);
  return weight.size(0);
}

// logits of rows [s, s + n) into the front of the reused buffer.
inline at::Tensor chunk_logits(at::Tensor& buf, const at::Tensor& x, const at::Tensor& w,
                               const std::optional<at::Tensor>& bias, int64_t s, int64_t n) {
  at::Tensor logits = buf.narrow(0, 0, n);
  const at::Tensor xs = x.narrow(0, s, n);
  if (bias.has_value()) at::addmm_out(logits, *bias, xs, w.t());
  else at::mm_out(logits, xs, w.t());
  return logits;
}

// ce_fwd(logits, target, loss, stats) and ce_bwd(grad_loss, logits, target, stats) run a device's fused rows on one
// (n, V) chunk; ce_bwd overwrites the logits with their gradient. alloc(sizes, options) -> an uninitialized tensor
// (the CPU passes its huge-page allocator: faulting in 4 KiB pages costs more than the work on them).
template <typename Fwd, typename Alloc>
std::tuple<at::Tensor, at::Tensor> linear_ce_forward(const at::Tensor& input, const at::Tensor& weight,
                                                     const std::optional<at::Tensor>& bias, const at::Tensor& target,
                                                     int64_t chunk, Fwd&& ce_fwd, Alloc&& alloc) {
  const at::Tensor x = input.contiguous(), w = weight.contiguous(), t = target.contiguous();
  const int64_t N = x.size(0), V = w.size(0);
  const auto acc = x.options().dtype(ce_acc_type(x.scalar_type()));
  at::Tensor loss = at::empty({N}, acc), stats = at::empty({2, N}, acc);
  if (N == 0) return {loss, stats};
  at::Tensor buf = alloc({std::min(chunk, N), V}, x.options());
  for (int64_t s = 0; s < N; s += chunk) {
    const int64_t n = std::min(chunk, N - s);
    ce_fwd(chunk_logits(buf, x, w, bias, s, n), t.narrow(0, s, n), loss.narrow(0, s, n), stats.narrow(1, s, n));
  }
  return {loss, stats};
}

// linear_cross_entropy_bwd's outputs: grad_input and grad_weight (acc: the accumulation type's options)
// uninitialized, grad_bias zeros (summed into; and the answer without a bias). One that mask leaves out is an
// empty (0,) tensor, and its product is skipped.
template <typename Alloc>
std::array<at::Tensor, 3> linear_ce_grads(const at::Tensor& x, const at::Tensor& w, std::array<bool, 3> mask,
                                          const at::TensorOptions& acc, Alloc&& alloc) {
  auto sized = [](bool wanted, at::IntArrayRef sizes) { return wanted ? sizes.vec() : std::vector<int64_t>{0}; };
  return {alloc(sized(mask[0], x.sizes()), x.options()), alloc(sized(mask[1], w.sizes()), acc),
          at::zeros(sized(mask[2], {w.size(0)}), acc)};
}

// grad_weight (+)= dlogits^T x_chunk for one chunk (first: store, else accumulate), in grad_weight's type: the
// inputs' for float32 / float64, float32 for the half types, whose products here run on float32 copies (no
// mixed-precision GEMM on the CPU). CUDA passes its own, on the tensor cores (csrc/cuda/linear_cross_entropy.cu).
inline void grad_weight_product(at::Tensor& grad_weight, const at::Tensor& dlogits, const at::Tensor& xs, bool first) {
  const bool half = grad_weight.scalar_type() != xs.scalar_type();
  const at::Tensor dt = half ? dlogits.t().to(at::kFloat) : dlogits.t();
  const at::Tensor xf = half ? xs.to(at::kFloat) : xs;
  if (first) at::mm_out(grad_weight, dt, xf);
  else grad_weight.addmm_(dt, xf);
}

// A chunk loop with no forward in it (linear_ce_backward's default `fwd`).
struct NoForward {
  void operator()(const at::Tensor&, int64_t, int64_t) const {}
};

// gw_product(grad_weight, dlogits, x_chunk, first): grad_weight_product's contract. fwd(logits, s, n), when given,
// runs on each chunk's logits before ce_bwd overwrites them (linear_ce_forward_grad's forward).
template <typename Bwd, typename Alloc, typename GwProduct = decltype(grad_weight_product)&, typename Fwd = NoForward>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ce_backward(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& target, const at::Tensor& stats, int64_t chunk,
    std::array<bool, 3> mask, Bwd&& ce_bwd, Alloc&& alloc, GwProduct&& gw_product = grad_weight_product,
    Fwd&& fwd = NoForward{}) {
  const at::Tensor x = input.contiguous(), w = weight.contiguous(), t = target.contiguous();
  const at::Tensor g = grad_loss.contiguous(), st = stats.contiguous();
  const int64_t N = x.size(0), V = w.size(0);
  // Half types accumulate grad_weight / grad_bias over the chunks in float32 (one rounding at the end).
  const bool half = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  const auto acc = half ? x.options().dtype(at::kFloat) : x.options();
  // grad_weight is written by the first chunk's GEMM (no zero fill); grad_bias is only summed when there is a bias.
  auto [grad_input, grad_weight, grad_bias] = linear_ce_grads(x, w, mask, acc, alloc);
  if (N == 0) grad_weight.zero_();
  else if (mask[0] || mask[1] || (mask[2] && bias.has_value()) || !std::is_same_v<std::decay_t<Fwd>, NoForward>) {
    at::Tensor buf = alloc({std::min(chunk, N), V}, x.options());
    for (int64_t s = 0; s < N; s += chunk) {
      const int64_t n = std::min(chunk, N - s);
      at::Tensor dlogits = chunk_logits(buf, x, w, bias, s, n);
      fwd(dlogits, s, n);
      ce_bwd(g.narrow(0, s, n), dlogits, t.narrow(0, s, n), st.narrow(1, s, n));
      if (mask[0]) {
        at::Tensor gi = grad_input.narrow(0, s, n);
        at::mm_out(gi, dlogits, w);
      }
      if (mask[1]) gw_product(grad_weight, dlogits, x.narrow(0, s, n), s == 0);
      if (mask[2] && bias.has_value()) grad_bias.add_(dlogits.sum(0, false, acc.dtype().toScalarType()));
    }
  }
  if (half) return {grad_input, grad_weight.to(x.scalar_type()), grad_bias.to(x.scalar_type())};
  return {grad_input, grad_weight, grad_bias};
}

// linear_cross_entropy_fwd_grad: the backward's chunk loop with the forward rows (ce_fwd, as linear_ce_forward's)
// run on each chunk's logits first, so the logits are made once. Returns (loss, grad_input, grad_weight, grad_bias).
template <typename Fwd, typename Bwd, typename Alloc, typename GwProduct = decltype(grad_weight_product)&>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ce_forward_grad(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& target, int64_t chunk, std::array<bool, 3> mask,
    Fwd&& ce_fwd, Bwd&& ce_bwd, Alloc&& alloc, GwProduct&& gw_product = grad_weight_product) {
  const int64_t N = input.size(0);
  const auto acc = input.options().dtype(ce_acc_type(input.scalar_type()));
  at::Tensor loss = at::empty({N}, acc), stats = at::empty({2, N}, acc);
  const at::Tensor t = target.contiguous();
  auto [gi, gw, gb] = linear_ce_backward(
      grad_loss, input, weight, bias, t, stats, chunk, mask, ce_bwd, alloc, gw_product,
      [&](const at::Tensor& logits, int64_t s, int64_t n) {
        ce_fwd(logits, t.narrow(0, s, n), loss.narrow(0, s, n), stats.narrow(1, s, n));
      });
  return {loss, gi, gw, gb};
}

}  // namespace fastnn
