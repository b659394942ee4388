// Linear + cross-entropy on CUDA: csrc/linear_cross_entropy.h's chunk loop (ATen matmuls) around the fused
// cross-entropy rows of csrc/cuda/cross_entropy.cu, run on each chunk's logits. An out-of-range class index is
// reported once, after the last chunk.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <optional>
#include <tuple>

#include "cross_entropy.h"
#include "cuda/cross_entropy_rows.cuh"
#include "linear_cross_entropy.h"

namespace fastnn::cuda {
namespace {

at::Tensor device_empty(at::IntArrayRef sizes, const at::TensorOptions& options) { return at::empty(sizes, options); }

// The cross-entropy rows on one chunk's logits, as csrc/linear_cross_entropy.h's chunk loops call them: fwd writes
// the chunk's loss and statistics (an out-of-range class index into flag, reported after the last chunk), bwd
// overwrites the logits with their gradient.
struct ChunkRows {
  const std::optional<at::Tensor>& class_weight;
  int64_t V, ignore_index;
  double label_smoothing;
  at::Tensor flag;  // the forwards' only
  void fwd(const at::Tensor& logits, const at::Tensor& ts, at::Tensor loss, at::Tensor stats) {
    ce_fwd_rows(logits, ts, class_weight, CeGeometry{logits.size(0), V, 1}, ignore_index, label_smoothing, loss,
                stats, flag);
  }
  void bwd(const at::Tensor& gs, at::Tensor& logits, const at::Tensor& ts, const at::Tensor& st) const {
    ce_bwd_rows(gs, logits, ts, class_weight, st, CeGeometry{logits.size(0), V, 1}, ignore_index, label_smoothing,
                logits);
  }
};

// grad_weight (+)= dlogits^T x_chunk (csrc/linear_cross_entropy.h's grad_weight_product contract). For the half
// types grad_weight is float32 and the product runs on the tensor cores with a float32 C: cuBLAS reads the
// half-precision operands as they are, accumulates in float32 and adds into the float32 sum of the earlier chunks
// (beta = 1), so the sum over chunks is rounded once, at the end, as in torch's single product. (ATen's addmm with
// out_dtype would do the same, but some torch versions require `self` in the inputs' dtype.) cuBLAS is resolved
// through libtorch_cuda, which links it.
void grad_weight_product_cuda(at::Tensor& grad_weight, const at::Tensor& dlogits, const at::Tensor& xs, bool first) {
  const auto type = xs.scalar_type();
  if (grad_weight.scalar_type() != at::kFloat || (type != at::kHalf && type != at::kBFloat16)) {
    grad_weight_product(grad_weight, dlogits, xs, first);
    return;
  }
  if (grad_weight.numel() == 0) return;
  // Row-major grad_weight [V, D] is column-major [D, V] = x^T dlogits: A = x_chunk read as column-major [D, n]
  // (rows D apart), B = dlogits^T (dlogits read as column-major [V, n], rows stride(0) apart).
  const int64_t n = xs.size(0), D = xs.size(1), V = dlogits.size(1);
  TORCH_CHECK(xs.stride(1) == 1 && xs.stride(0) == D && dlogits.stride(1) == 1,
              "linear_cross_entropy: internal error, chunk operands must have unit column stride");
  TORCH_CHECK(std::max({n, D, V, dlogits.stride(0)}) <= std::numeric_limits<int>::max(),
              "linear_cross_entropy: a dimension past 2**31 - 1 for cuBLAS");
  const cudaDataType_t ab = type == at::kHalf ? CUDA_R_16F : CUDA_R_16BF;
  const float alpha = 1.0f, beta = first ? 0.0f : 1.0f;
  TORCH_CUDABLAS_CHECK(cublasGemmEx(at::cuda::getCurrentCUDABlasHandle(), CUBLAS_OP_N, CUBLAS_OP_T,
                                    static_cast<int>(D), static_cast<int>(V), static_cast<int>(n), &alpha,
                                    xs.const_data_ptr(), ab, static_cast<int>(D), dlogits.const_data_ptr(), ab,
                                    static_cast<int>(dlogits.stride(0)), &beta, grad_weight.mutable_data_ptr(),
                                    CUDA_R_32F, static_cast<int>(D), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_fwd_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const std::optional<at::Tensor>& class_weight, int64_t ignore_index,
    double label_smoothing, int64_t chunk) {
  const int64_t V = check_linear_ce_fwd_args(input, weight, bias, target, class_weight, chunk);
  const c10::cuda::CUDAGuard guard(input.device());
  ChunkRows rows{class_weight, V, ignore_index, label_smoothing, new_flag(input)};
  auto out = linear_ce_forward(input, weight, bias, target, chunk, [&](auto&&... a) { rows.fwd(a...); },
                               device_empty);
  report_bad_target(rows.flag, V, ignore_index);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_bwd_cuda(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& target, const std::optional<at::Tensor>& class_weight,
    const at::Tensor& stats, int64_t ignore_index, double label_smoothing, int64_t chunk, std::array<bool, 3> mask) {
  const int64_t V = check_linear_ce_bwd_args(grad_loss, input, weight, bias, target, class_weight, stats, chunk);
  const c10::cuda::CUDAGuard guard(input.device());
  const ChunkRows rows{class_weight, V, ignore_index, label_smoothing, at::Tensor()};
  return linear_ce_backward(grad_loss, input, weight, bias, target, stats, chunk, mask,
                            [&](auto&&... a) { rows.bwd(a...); }, device_empty, grad_weight_product_cuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd_grad_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const std::optional<at::Tensor>& class_weight, const at::Tensor& grad_loss,
    int64_t ignore_index, double label_smoothing, int64_t chunk, std::array<bool, 3> mask) {
  const int64_t V = check_linear_ce_fwd_grad_args(input, weight, bias, target, class_weight, grad_loss, chunk);
  const c10::cuda::CUDAGuard guard(input.device());
  ChunkRows rows{class_weight, V, ignore_index, label_smoothing, new_flag(input)};
  auto out = linear_ce_forward_grad(grad_loss, input, weight, bias, target, chunk, mask,
                                    [&](auto&&... a) { rows.fwd(a...); }, [&](auto&&... a) { rows.bwd(a...); },
                                    device_empty, grad_weight_product_cuda);
  report_bad_target(rows.flag, V, ignore_index);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnn, CUDA, m) {
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd_cuda);
  m.impl("linear_cross_entropy_bwd", &linear_cross_entropy_bwd_cuda);
  m.impl("linear_cross_entropy_fwd_grad", &linear_cross_entropy_fwd_grad_cuda);
}

}  // namespace fastnn::cuda
