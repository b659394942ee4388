// LSTM on the CPU: the fused cell (forward and backward) and the whole recurrence of one layer.
//
// The cell kernel is everything after the two matrix products: bias add, sigmoid / tanh of the four gates
// (i, f, g, o), c' = f c + i g and h' = o tanh(c'), one pass over a batch row. It writes the activated gates,
// which with c are all the backward needs: it recomputes c' (two multiply-adds) instead of saving it.
//
// The layer op runs the recurrence in C++ so a step costs one addmm (into the step's slice of the gate buffer,
// which the cell then activates in place) and one cell call: no Python, no per-step allocation. Rows past their
// length keep their state, so padded steps leave the final states alone; in the backward such a row passes its
// gradients straight through.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "common.h"
#include "cpu/vec.h"

namespace fastnn::cpu {
namespace {

constexpr int64_t kGrain = 16384;  // elements of a row block per parallel task: below that one core is faster

int64_t grain_rows(int64_t hidden) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(4 * hidden, 1)); }

// One batch row of the forward. pre: the 4H gate pre-activations (may alias act), bias: 4H or null,
// cp: the previous cell state. Writes act (4H), c and h (H each).
template <typename T> void cell_fwd_row(const T* pre, const T* bias, const T* cp, T* act, T* c, T* h, int64_t H) {
  using A = acc_t<T>;
  for_chunks<A>(H, [&](int64_t j, int64_t len) {
    vec<A> z[4];
    for (int k = 0; k < 4; ++k) {
      z[k] = load_as<A>(pre + k * H + j, len);
      if (bias) z[k] += load_as<A>(bias + k * H + j, len);
    }
    const vec<A> i = sigmoid(z[0]), f = sigmoid(z[1]), g = tanh(z[2]), o = sigmoid(z[3]);
    const vec<A> cn = f * load_as<A>(cp + j, len) + i * g;
    store_as<A>(act + j, i, len);
    store_as<A>(act + H + j, f, len);
    store_as<A>(act + 2 * H + j, g, len);
    store_as<A>(act + 3 * H + j, o, len);
    store_as<A>(c + j, cn, len);
    store_as<A>(h + j, o * tanh(cn), len);
  });
}

// One batch row of the backward. The incoming gradients are sums of two terms each (dh + dh2, dc + dc2; the
// second may be null) so the layer's recurrent and per-step gradients need no separate add. Writes the
// pre-activation gradients dgates (4H) and dcp, the gradient of the previous cell state (may alias dc2).
template <typename T> void cell_bwd_row(const T* dh, const T* dh2, const T* dc, const T* dc2, const T* act,
                                        const T* cp, T* dgates, T* dcp, int64_t H) {
  using A = acc_t<T>;
  for_chunks<A>(H, [&](int64_t j, int64_t len) {
    const vec<A> i = load_as<A>(act + j, len), f = load_as<A>(act + H + j, len);
    const vec<A> g = load_as<A>(act + 2 * H + j, len), o = load_as<A>(act + 3 * H + j, len);
    const vec<A> c0 = load_as<A>(cp + j, len);
    const vec<A> tc = tanh(f * c0 + i * g);
    vec<A> gh = load_as<A>(dh + j, len), gc = load_as<A>(dc + j, len);
    if (dh2) gh += load_as<A>(dh2 + j, len);
    if (dc2) gc += load_as<A>(dc2 + j, len);
    gc += gh * o * (A(1) - tc * tc);
    store_as<A>(dgates + j, gc * g * i * (A(1) - i), len);
    store_as<A>(dgates + H + j, gc * c0 * f * (A(1) - f), len);
    store_as<A>(dgates + 2 * H + j, gc * i * (A(1) - g * g), len);
    store_as<A>(dgates + 3 * H + j, gh * tc * o * (A(1) - o), len);
    store_as<A>(dcp + j, gc * f, len);
  });
}

void check_cell_args(const at::Tensor& gates, const at::Tensor& cx, const char* gname) {
  check_floating(gates, gname);
  TORCH_CHECK(cx.dim() == 2 && gates.dim() == 2, gname, " and cx must be 2-d, got ", gates.sizes(), " and ",
              cx.sizes());
  TORCH_CHECK(gates.size(0) == cx.size(0) && gates.size(1) == 4 * cx.size(1), gname,
              " must be [B, 4H] for cx [B, H], got ", gates.sizes(), " and ", cx.sizes());
  TORCH_CHECK(gates.device() == cx.device() && gates.scalar_type() == cx.scalar_type(), gname,
              " and cx must have the same dtype and device, got ", gates.scalar_type(), " on ", gates.device(),
              " and ", cx.scalar_type(), " on ", cx.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_fwd_cpu(const at::Tensor& gates_,
                                                                 const std::optional<at::Tensor>& bias_,
                                                                 const at::Tensor& cx_) {
  check_cell_args(gates_, cx_, "gates");
  const int64_t B = cx_.size(0), H = cx_.size(1);
  const at::Tensor gates = gates_.contiguous(), cx = cx_.contiguous();
  at::Tensor bias;
  if (bias_.has_value() && bias_->defined()) {
    TORCH_CHECK(bias_->dim() == 1 && bias_->size(0) == 4 * H, "bias must be [4H] = [", 4 * H, "], got ",
                bias_->sizes());
    TORCH_CHECK(bias_->scalar_type() == gates.scalar_type(), "bias must have gates' dtype ", gates.scalar_type(),
                ", got ", bias_->scalar_type());
    bias = bias_->contiguous();
  }
  at::Tensor hy = at::empty({B, H}, cx.options()), cy = at::empty({B, H}, cx.options());
  at::Tensor act = at::empty({B, 4 * H}, cx.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cx.scalar_type(), "lstm_cell_fwd_cpu", [&] {
    const scalar_t *g = gates.const_data_ptr<scalar_t>(), *c = cx.const_data_ptr<scalar_t>();
    const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t *a = act.mutable_data_ptr<scalar_t>(), *cn = cy.mutable_data_ptr<scalar_t>();
    scalar_t* hn = hy.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain_rows(H), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        cell_fwd_row(g + r * 4 * H, b, c + r * H, a + r * 4 * H, cn + r * H, hn + r * H, H);
    });
  });
  return {hy, cy, act};
}

std::tuple<at::Tensor, at::Tensor> lstm_cell_bwd_cpu(const at::Tensor& grad_hy_, const at::Tensor& grad_cy_,
                                                     const at::Tensor& act_, const at::Tensor& cx_) {
  check_cell_args(act_, cx_, "act");
  check_same(grad_hy_, "grad_hy", cx_, "cx");
  check_same(grad_cy_, "grad_cy", cx_, "cx");
  const int64_t B = cx_.size(0), H = cx_.size(1);
  const at::Tensor dh = grad_hy_.contiguous(), dc = grad_cy_.contiguous(), act = act_.contiguous();
  const at::Tensor cx = cx_.contiguous();
  at::Tensor dgates = at::empty({B, 4 * H}, cx.options()), dcx = at::empty({B, H}, cx.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cx.scalar_type(), "lstm_cell_bwd_cpu", [&] {
    const scalar_t *gh = dh.const_data_ptr<scalar_t>(), *gc = dc.const_data_ptr<scalar_t>();
    const scalar_t *a = act.const_data_ptr<scalar_t>(), *c = cx.const_data_ptr<scalar_t>();
    scalar_t *dg = dgates.mutable_data_ptr<scalar_t>(), *dcp = dcx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain_rows(H), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        cell_bwd_row<scalar_t>(gh + r * H, nullptr, gc + r * H, nullptr, a + r * 4 * H, c + r * H,
                               dg + r * 4 * H, dcp + r * H, H);
    });
  });
  return {dgates, dcx};
}

// ---- the layer ----

struct LayerGeometry {
  int64_t T, B, H;
  const int64_t* len = nullptr;  // null: every row runs all T steps
  bool active(int64_t t, int64_t b) const { return len == nullptr || t < len[b]; }
};

LayerGeometry check_layer_args(const at::Tensor& seq, const char* sname, const at::Tensor& w_hh,
                               const at::Tensor& c0, const std::optional<at::Tensor>& lengths,
                               at::Tensor& len_holder) {
  check_floating(seq, sname);
  TORCH_CHECK(seq.dim() == 3 && w_hh.dim() == 2 && c0.dim() == 2, sname, " must be [T, B, 4H], w_hh [4H, H] and ",
              "the states [B, H], got ", seq.sizes(), ", ", w_hh.sizes(), " and ", c0.sizes());
  const int64_t T = seq.size(0), B = seq.size(1), H = w_hh.size(1);
  TORCH_CHECK(w_hh.size(0) == 4 * H && seq.size(2) == 4 * H && c0.size(0) == B && c0.size(1) == H, sname,
              " [T, B, 4H], w_hh [4H, H] and the states [B, H] disagree: ", seq.sizes(), ", ", w_hh.sizes(), ", ",
              c0.sizes());
  TORCH_CHECK(seq.scalar_type() == w_hh.scalar_type() && seq.scalar_type() == c0.scalar_type(), sname,
              ", w_hh and the states must share a dtype, got ", seq.scalar_type(), ", ", w_hh.scalar_type(),
              ", ", c0.scalar_type());
  LayerGeometry g{T, B, H};
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_fwd_cpu(const at::Tensor& gx_, const at::Tensor& w_hh_,
                                                                  const at::Tensor& h0_, const at::Tensor& c0_,
                                                                  const std::optional<at::Tensor>& lengths,
                                                                  bool reverse) {
  at::Tensor len_holder;
  const LayerGeometry geo = check_layer_args(gx_, "gx", w_hh_, c0_, lengths, len_holder);
  check_same(h0_, "h0", c0_, "c0");
  const int64_t T = geo.T, B = geo.B, H = geo.H;
  const at::Tensor gx = gx_.contiguous(), w_hh_t = w_hh_.t(), h0 = h0_.contiguous(), c0 = c0_.contiguous();
  at::Tensor hs = at::empty({T, B, H}, gx.options()), cs = at::empty({T, B, H}, gx.options());
  at::Tensor act = at::empty({T, B, 4 * H}, gx.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gx.scalar_type(), "lstm_layer_fwd_cpu", [&] {
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = reverse ? T - 1 - s : s, tp = reverse ? t + 1 : t - 1;
      const at::Tensor h_prev = s == 0 ? h0 : hs.select(0, tp), c_prev = s == 0 ? c0 : cs.select(0, tp);
      at::Tensor act_t = act.select(0, t);
      at::addmm_out(act_t, gx.select(0, t), h_prev, w_hh_t);
      scalar_t* a = act_t.mutable_data_ptr<scalar_t>();
      const scalar_t *hp = h_prev.const_data_ptr<scalar_t>(), *cp = c_prev.const_data_ptr<scalar_t>();
      scalar_t *hn = hs.mutable_data_ptr<scalar_t>() + t * B * H, *cn = cs.mutable_data_ptr<scalar_t>() + t * B * H;
      at::parallel_for(0, B, grain_rows(H), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          if (geo.active(t, r)) {
            cell_fwd_row<scalar_t>(a + r * 4 * H, nullptr, cp + r * H, a + r * 4 * H, cn + r * H, hn + r * H, H);
          } else {
            std::copy(cp + r * H, cp + (r + 1) * H, cn + r * H);
            std::copy(hp + r * H, hp + (r + 1) * H, hn + r * H);
          }
        }
      });
    }
  });
  return {hs, cs, act};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd_cpu(
    const at::Tensor& grad_hs_, const at::Tensor& grad_cs_, const at::Tensor& w_hh_, const at::Tensor& c0_,
    const at::Tensor& cs_, const at::Tensor& act_, const std::optional<at::Tensor>& lengths, bool reverse) {
  at::Tensor len_holder;
  const LayerGeometry geo = check_layer_args(act_, "act", w_hh_, c0_, lengths, len_holder);
  const int64_t T = geo.T, B = geo.B, H = geo.H;
  TORCH_CHECK(grad_hs_.sizes() == cs_.sizes() && grad_cs_.sizes() == cs_.sizes() &&
                  cs_.sizes() == at::IntArrayRef({T, B, H}),
              "grad_hs, grad_cs and cs must be [T, B, H] = [", T, ", ", B, ", ", H, "], got ", grad_hs_.sizes(), ", ",
              grad_cs_.sizes(), ", ", cs_.sizes());
  check_same(grad_hs_, "grad_hs", cs_, "cs");
  check_same(grad_cs_, "grad_cs", cs_, "cs");
  TORCH_CHECK(cs_.scalar_type() == act_.scalar_type(), "cs and act must share a dtype");
  const at::Tensor dhs = grad_hs_.contiguous(), dcs = grad_cs_.contiguous(), w_hh = w_hh_.contiguous();
  const at::Tensor c0 = c0_.contiguous(), cs = cs_.contiguous(), act = act_.contiguous();
  at::Tensor dgx = at::empty({T, B, 4 * H}, act.options());
  // dh carries the recurrent gradient into the next (earlier) step, dc the cell-state gradient; both start at
  // zero for the last step. pass holds, for rows past their length, the h gradient they hand through.
  at::Tensor dh = at::zeros({B, H}, act.options()), dc = at::zeros({B, H}, act.options());
  at::Tensor pass = geo.len ? at::zeros({B, H}, act.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, act.scalar_type(), "lstm_layer_bwd_cpu", [&] {
    scalar_t *dhp = dh.mutable_data_ptr<scalar_t>(), *dcp = dc.mutable_data_ptr<scalar_t>();
    scalar_t* pp = pass.defined() ? pass.mutable_data_ptr<scalar_t>() : nullptr;
    for (int64_t s = T - 1; s >= 0; --s) {
      const int64_t t = reverse ? T - 1 - s : s, tp = reverse ? t + 1 : t - 1;
      const scalar_t* cp = s == 0 ? c0.const_data_ptr<scalar_t>() : cs.const_data_ptr<scalar_t>() + tp * B * H;
      const scalar_t *gh = dhs.const_data_ptr<scalar_t>() + t * B * H, *gc = dcs.const_data_ptr<scalar_t>() + t * B * H;
      const scalar_t* a = act.const_data_ptr<scalar_t>() + t * B * 4 * H;
      at::Tensor dg_t = dgx.select(0, t);
      scalar_t* dg = dg_t.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, B, grain_rows(H), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t o = r * H;
          if (geo.active(t, r)) {
            cell_bwd_row<scalar_t>(gh + o, dhp + o, gc + o, dcp + o, a + 4 * o, cp + o, dg + 4 * o, dcp + o, H);
            if (pp) std::fill(pp + o, pp + o + H, scalar_t(0));
          } else {
            std::fill(dg + 4 * o, dg + 4 * o + 4 * H, scalar_t(0));
            for (int64_t j = 0; j < H; ++j) {
              pp[o + j] = static_cast<scalar_t>(acc_t<scalar_t>(gh[o + j]) + acc_t<scalar_t>(dhp[o + j]));
              dcp[o + j] = static_cast<scalar_t>(acc_t<scalar_t>(gc[o + j]) + acc_t<scalar_t>(dcp[o + j]));
            }
          }
        }
      });
      // The h gradient of the previous step: through W_hh, plus what rows past their length hand through.
      if (pp) at::addmm_out(dh, pass, dg_t, w_hh);
      else at::mm_out(dh, dg_t, w_hh);
    }
  });
  return {dgx, dh, dc};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnn, CPU, m) {
  m.impl("lstm_cell_fwd", &lstm_cell_fwd_cpu);
  m.impl("lstm_cell_bwd", &lstm_cell_bwd_cpu);
  m.impl("lstm_layer_fwd", &lstm_layer_fwd_cpu);
  m.impl("lstm_layer_bwd", &lstm_layer_bwd_cpu);
}

}  // namespace fastnn::cpu
