// Fused softmax cross-entropy on the CPU: the ops around the rows of csrc/cpu/cross_entropy_rows.h (formulas in
// csrc/cross_entropy.h).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common.h"
#include "cpu/alloc.h"
#include "cpu/cross_entropy_rows.h"
#include "cross_entropy.h"

namespace fastnn::cpu {
namespace {

struct CeCall {
  CeGeometry g;
  bool prob;
  at::Tensor x, t;
  // The target as the rows take it: class indices, or probabilities of x's dtype T (the other one null).
  const int64_t* indices() const { return prob ? nullptr : t.const_data_ptr<int64_t>(); }
  template <typename T> const T* probabilities() const { return prob ? t.const_data_ptr<T>() : nullptr; }
};

CeCall prepare(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
               int64_t ignore_index, double label_smoothing) {
  CeCall c;
  c.g = check_ce_args(input, target, weight, label_smoothing, c.prob);
  c.x = input.contiguous();
  c.t = target.contiguous();
  if (!c.prob) check_targets(c.t.const_data_ptr<int64_t>(), c.t.numel(), c.g.classes, ignore_index);
  return c;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cpu(const at::Tensor& input, const at::Tensor& target,
                                                         const std::optional<at::Tensor>& weight,
                                                         int64_t ignore_index, double label_smoothing,
                                                         bool /*inplace_backward*/) {
  const CeCall c = prepare(input, target, weight, ignore_index, label_smoothing);
  at::Tensor loss, stats;
  std::tie(loss, stats) = ce_fwd_outputs(c.x, c.g);
  if (c.g.rows() == 0) return {loss, stats};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.x.scalar_type(), "cross_entropy_fwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    const Weights<scalar_t, A> w(weight, label_smoothing, c.g.classes);
    ce_fwd_rows<scalar_t>(c.g, c.x.const_data_ptr<scalar_t>(), c.indices(), c.probabilities<scalar_t>(), w.p,
                          ignore_index, loss.mutable_data_ptr<A>(), stat_plane<A>(stats, 0), stat_plane<A>(stats, 1));
  });
  return {loss, stats};
}

// Writes grad_input into `out` (a fresh tensor, or the contiguous input itself).
void cross_entropy_bwd_into(const at::Tensor& grad_loss, const CeCall& c, const std::optional<at::Tensor>& weight,
                            const at::Tensor& stats, int64_t ignore_index, double label_smoothing, at::Tensor& out) {
  check_ce_bwd_args(grad_loss, stats, c.g, c.x);
  if (c.g.rows() == 0 || c.g.classes == 0) return;
  const at::Tensor gl = grad_loss.contiguous(), st = stats.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.x.scalar_type(), "cross_entropy_bwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    const Weights<scalar_t, A> w(weight, label_smoothing, c.g.classes);
    with_stream(ce_streams<scalar_t>(c.g), [&](auto stream) {
      ce_bwd_rows<scalar_t, decltype(stream)::value>(
          c.g, gl.const_data_ptr<A>(), c.x.const_data_ptr<scalar_t>(), c.indices(), c.probabilities<scalar_t>(), w.p,
          ignore_index, stat_plane<const A>(st, 0), stat_plane<const A>(st, 1), out.mutable_data_ptr<scalar_t>());
    });
  });
}

at::Tensor cross_entropy_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                                 const std::optional<at::Tensor>& weight, const at::Tensor& stats,
                                 int64_t ignore_index, double label_smoothing) {
  const CeCall c = prepare(input, target, weight, ignore_index, label_smoothing);
  at::Tensor dx = cached_empty(c.x.sizes(), c.x.options());
  cross_entropy_bwd_into(grad_loss, c, weight, stats, ignore_index, label_smoothing, dx);
  return dx;
}

void cross_entropy_bwd_inplace_cpu(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                                   const std::optional<at::Tensor>& weight, const at::Tensor& stats,
                                   int64_t ignore_index, double label_smoothing) {
  TORCH_CHECK(input.is_contiguous(), "cross_entropy_bwd_inplace: input must be contiguous");
  const CeCall c = prepare(input, target, weight, ignore_index, label_smoothing);
  at::Tensor out = c.x;  // the same storage as input
  cross_entropy_bwd_into(grad_loss, c, weight, stats, ignore_index, label_smoothing, out);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_grad_cpu(const at::Tensor& input, const at::Tensor& target,
                                                              const std::optional<at::Tensor>& weight,
                                                              const at::Tensor& grad_loss, int64_t ignore_index,
                                                              double label_smoothing) {
  const CeCall c = prepare(input, target, weight, ignore_index, label_smoothing);
  check_ce_grad_loss(grad_loss, c.g, c.x);
  at::Tensor loss = std::get<0>(ce_fwd_outputs(c.x, c.g));
  at::Tensor dx = cached_empty(c.x.sizes(), c.x.options());
  if (c.g.rows() == 0) return {loss, dx};
  const at::Tensor gl = grad_loss.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.x.scalar_type(), "cross_entropy_fwd_grad_cpu", [&] {
    using A = acc_t<scalar_t>;
    const Weights<scalar_t, A> w(weight, label_smoothing, c.g.classes);
    with_stream(ce_streams<scalar_t>(c.g), [&](auto stream) {
      ce_fwd_grad_rows<scalar_t, decltype(stream)::value>(
          c.g, gl.const_data_ptr<A>(), c.x.const_data_ptr<scalar_t>(), c.indices(), c.probabilities<scalar_t>(), w.p,
          ignore_index, loss.mutable_data_ptr<A>(), dx.mutable_data_ptr<scalar_t>());
    });
  });
  return {loss, dx};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnn, CPU, m) {
  m.impl("cross_entropy_fwd_grad", &cross_entropy_fwd_grad_cpu);
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cpu);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cpu);
  m.impl("cross_entropy_bwd_inplace", &cross_entropy_bwd_inplace_cpu);
}

}  // namespace fastnn::cpu
