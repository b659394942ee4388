// Linear + cross-entropy on CUDA: csrc/linear_cross_entropy.h's chunk loop (ATen matmuls) around the fused
// cross-entropy rows of csrc/cuda/cross_entropy.cu, run on each chunk's logits. An out-of-range class index is
// reported once, after the last chunk.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "cross_entropy.h"
#include "cuda/cross_entropy_rows.cuh"
#include "linear_cross_entropy.h"

namespace fastnn::cuda {
namespace {

at::Tensor device_empty(at::IntArrayRef sizes, const at::TensorOptions& options) { return at::empty(sizes, options); }

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_fwd_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const std::optional<at::Tensor>& class_weight, int64_t ignore_index,
    double label_smoothing, int64_t chunk) {
  const int64_t V = check_linear_ce_fwd_args(input, weight, bias, target, class_weight, chunk);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor flag = new_flag(input);
  auto out = linear_ce_forward(input, weight, bias, target, chunk,
                               [&](const at::Tensor& logits, const at::Tensor& ts, at::Tensor loss, at::Tensor stats) {
    ce_fwd_rows(logits, ts, class_weight, CeGeometry{logits.size(0), V, 1}, ignore_index, label_smoothing, loss,
                stats, flag);
  }, device_empty);
  report_bad_target(flag, V, ignore_index);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_bwd_cuda(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& target, const std::optional<at::Tensor>& class_weight,
    const at::Tensor& stats, int64_t ignore_index, double label_smoothing, int64_t chunk, std::array<bool, 3> mask) {
  const int64_t V = check_linear_ce_bwd_args(grad_loss, input, weight, bias, target, class_weight, stats, chunk);
  const c10::cuda::CUDAGuard guard(input.device());
  return linear_ce_backward(grad_loss, input, weight, bias, target, stats, chunk, mask,
                            [&](const at::Tensor& gs, at::Tensor& logits, const at::Tensor& ts, const at::Tensor& st) {
    ce_bwd_rows(gs, logits, ts, class_weight, st, CeGeometry{logits.size(0), V, 1}, ignore_index, label_smoothing,
                logits);
  }, device_empty);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnn, CUDA, m) {
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd_cuda);
  m.impl("linear_cross_entropy_bwd", &linear_cross_entropy_bwd_cuda);
}

}  // namespace fastnn::cuda
