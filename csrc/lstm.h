// LSTM pieces shared by the CPU and CUDA kernels (csrc/{cpu,cuda}/lstm.*): argument checks and layer geometry.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "common.h"

namespace fastnn {

// gates (or act) [B, 4H] and cx [B, H] of one dtype and device.
inline void check_lstm_cell(const at::Tensor& gates, const at::Tensor& cx, const char* gname) {
  check_floating(gates, gname);
  TORCH_CHECK(cx.dim() == 2 && gates.dim() == 2, gname, " and cx must be 2-d, got ", gates.sizes(), " and ",
              cx.sizes());
  TORCH_CHECK(gates.size(0) == cx.size(0) && gates.size(1) == 4 * cx.size(1), gname,
              " must be [B, 4H] for cx [B, H], got ", gates.sizes(), " and ", cx.sizes());
  TORCH_CHECK(gates.device() == cx.device() && gates.scalar_type() == cx.scalar_type(), gname,
              " and cx must have the same dtype and device, got ", gates.scalar_type(), " on ", gates.device(),
              " and ", cx.scalar_type(), " on ", cx.device());
}

// The optional bias as a contiguous [4H] tensor of gates' dtype and device, or an undefined tensor.
inline at::Tensor checked_lstm_bias(const std::optional<at::Tensor>& bias, const at::Tensor& gates, int64_t H) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == 4 * H, "bias must be [4H] = [", 4 * H, "], got ", bias->sizes());
  TORCH_CHECK(bias->scalar_type() == gates.scalar_type() && bias->device() == gates.device(),
              "bias must have gates' dtype and device (", gates.scalar_type(), " on ", gates.device(), "), got ",
              bias->scalar_type(), " on ", bias->device());
  return bias->contiguous();
}

struct LstmLayerGeometry {
  int64_t T, B, H;
  const int64_t* len = nullptr;  // host lengths [B]; null: every row runs all T steps
  bool active(int64_t t, int64_t b) const { return len == nullptr || t < len[b]; }
};

// seq [T, B, width] (the input x, or act with width 4H), w_hh [4H, H], c0 [B, H] of one dtype; lengths
// (optional) int64 [B] on the CPU, each in [0, T], kept alive by len_holder. width < 0 means 4H.
inline LstmLayerGeometry check_lstm_layer(const at::Tensor& seq, const char* sname, const at::Tensor& w_hh,
                                          const at::Tensor& c0, const std::optional<at::Tensor>& lengths,
                                          at::Tensor& len_holder, int64_t width = -1) {
  check_floating(seq, sname);
  TORCH_CHECK(seq.dim() == 3 && w_hh.dim() == 2 && c0.dim() == 2, sname, " must be [T, B, *], w_hh [4H, H] and ",
              "the states [B, H], got ", seq.sizes(), ", ", w_hh.sizes(), " and ", c0.sizes());
  const int64_t T = seq.size(0), B = seq.size(1), H = w_hh.size(1);
  if (width < 0) width = 4 * H;
  TORCH_CHECK(w_hh.size(0) == 4 * H && seq.size(2) == width && c0.size(0) == B && c0.size(1) == H, sname,
              " [T, B, ", width, "], w_hh [4H, H] and the states [B, H] disagree: ", seq.sizes(), ", ", w_hh.sizes(),
              ", ", c0.sizes());
  TORCH_CHECK(seq.scalar_type() == w_hh.scalar_type() && seq.scalar_type() == c0.scalar_type(), sname,
              ", w_hh and the states must share a dtype, got ", seq.scalar_type(), ", ", w_hh.scalar_type(), ", ",
              c0.scalar_type());
  TORCH_CHECK(seq.device() == w_hh.device() && seq.device() == c0.device(), sname,
              ", w_hh and the states must be on one device, got ", seq.device(), ", ", w_hh.device(), ", ",
              c0.device());
  LstmLayerGeometry g{T, B, H};
  if (lengths.has_value() && lengths->defined()) {
    TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == B && lengths->scalar_type() == at::kLong &&
                    lengths->device().is_cpu(),
                "lengths must be an int64 CPU tensor of shape [B] = [", B, "], got ", lengths->scalar_type(), " ",
                lengths->sizes(), " on ", lengths->device());
    len_holder = lengths->contiguous();
    g.len = len_holder.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(g.len[b] >= 0 && g.len[b] <= T, "lengths must lie in [0, T] = [0, ", T, "], got ", g.len[b]);
  }
  return g;
}

// The forward's input side: x [T, B, I], w_ih [4H, I] and the optional bias [4H] (b_ih + b_hh), one dtype and
// device. Returns the bias, contiguous, or an undefined tensor.
inline at::Tensor check_lstm_layer_input(const at::Tensor& x, const at::Tensor& w_ih,
                                         const std::optional<at::Tensor>& bias, const at::Tensor& w_hh) {
  TORCH_CHECK(x.dim() == 3 && w_ih.dim() == 2 && w_hh.dim() == 2 && w_ih.size(0) == w_hh.size(0) &&
                  w_ih.size(1) == x.size(2),
              "x [T, B, I], w_ih [4H, I] and w_hh [4H, H] disagree: ", x.sizes(), ", ", w_ih.sizes(), ", ",
              w_hh.sizes());
  TORCH_CHECK(w_ih.scalar_type() == x.scalar_type() && w_ih.device() == x.device(),
              "w_ih must have x's dtype and device (", x.scalar_type(), " on ", x.device(), "), got ",
              w_ih.scalar_type(), " on ", w_ih.device());
  return checked_lstm_bias(bias, x, w_hh.size(1));
}

// grad_cs may be undefined: no output used the cell states but through the final one's h (a zero gradient).
// Returns it contiguous, or undefined.
inline at::Tensor check_lstm_layer_grads(const LstmLayerGeometry& g, const at::Tensor& grad_hs,
                                         const std::optional<at::Tensor>& grad_cs_, const at::Tensor& cs,
                                         const at::Tensor& act) {
  const at::Tensor grad_cs = grad_cs_.has_value() ? *grad_cs_ : at::Tensor();
  TORCH_CHECK(grad_hs.sizes() == cs.sizes() && (!grad_cs.defined() || grad_cs.sizes() == cs.sizes()) &&
                  cs.sizes() == at::IntArrayRef({g.T, g.B, g.H}),
              "grad_hs, grad_cs and cs must be [T, B, H] = [", g.T, ", ", g.B, ", ", g.H, "], got ", grad_hs.sizes(),
              ", ", grad_cs.defined() ? grad_cs.sizes() : at::IntArrayRef(), ", ", cs.sizes());
  check_same(grad_hs, "grad_hs", cs, "cs");
  if (grad_cs.defined()) check_same(grad_cs, "grad_cs", cs, "cs");
  TORCH_CHECK(cs.scalar_type() == act.scalar_type() && cs.device() == act.device(),
              "cs and act must share a dtype and device");
  return grad_cs.defined() ? grad_cs.contiguous() : grad_cs;
}

}  // namespace fastnn
