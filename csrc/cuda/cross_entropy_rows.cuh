// The fused cross-entropy rows on CUDA, defined in csrc/cuda/cross_entropy.cu: cross_entropy's ops run them on the
// input, linear + cross-entropy's (csrc/cuda/linear_cross_entropy.cu) on each chunk's logits.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#include "cross_entropy.h"

namespace fastnn::cuda {

// The forward rows over (rows, C[, inner]) storage x (contiguous, geometry g): the loss and the statistics
// (stat_plane) of each row, on the current stream. t holds int64 class indices or probabilities of x's dtype; w
// the optional class weights. An out-of-range class index gives its row a NaN loss and lands in flag (new_flag),
// which report_bad_target checks.
void ce_fwd_rows(const at::Tensor& x, const at::Tensor& t, const std::optional<at::Tensor>& w, const CeGeometry& g,
                 int64_t ignore_index, double eps, at::Tensor& loss, at::Tensor& stats, at::Tensor& flag);

// The backward rows: dx from the per-row grad, x and the forward's stats. dx may be x itself (inplace).
void ce_bwd_rows(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t,
                 const std::optional<at::Tensor>& w, const at::Tensor& stats, const CeGeometry& g, int64_t ignore_index,
                 double eps, at::Tensor& dx);

// The device flag of an out-of-range class index: (found, index), zeros on x's device.
at::Tensor new_flag(const at::Tensor& x);

// Raises the IndexError for an out-of-range class index that ce_fwd_rows recorded in flag (one sync).
void report_bad_target(const at::Tensor& flag, int64_t classes, int64_t ignore_index);

}  // namespace fastnn::cuda
