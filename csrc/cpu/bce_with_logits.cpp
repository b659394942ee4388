// Binary cross-entropy with logits on the CPU: one fused pass forward (loss, or its sum), one fused pass backward
// (grad_input and grad_target together), both recomputing from input and target - nothing is saved.
//
//   loss = w * ((1 - y) * x + lw * sp),   sp = softplus(-x) = log1p(exp(-|x|)) + max(-x, 0),   lw = 1 + (pw - 1) * y
//   d/dx = w * g * (lw * sigmoid(x) - pw * y)
//   d/dy = w * g * ((pw - 1) * sp - x)
//
// exp(-|x|) <= 1 never overflows and log1p_unit keeps its accuracy near 0, so logits of +-1e4 are exact. weight,
// pos_weight and grad_output are Broadcast operands, read in place: a pos_weight of shape (C,) is one stride-1
// run per row, a per-row weight (N, 1) one stride-0 run. Reductions sum fixed 1024-element chunks into float64
// partials added in order, so the result does not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Reduction.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <vector>

#include "bce_with_logits.h"
#include "cpu/alloc.h"
#include "cpu/vec.h"

namespace fastnn::cpu {
namespace {

constexpr int64_t kChunk = 1024;   // elements per partial sum: each float lane adds at most 128 terms
constexpr int64_t kGrain = 32768;  // elements per parallel task, ATen's default grain

using bce::Operand;

// Splits [begin, end) into runs inside which every operand is contiguous or constant, and calls
// f(i, len, ptr, contiguous) with each operand's first element of the run.
template <typename T, size_t N, typename F>
void for_runs(int64_t begin, int64_t end, const std::array<const Operand<T>*, N>& ops, F&& f) {
  static const T one(1.0f);
  for (int64_t i = begin; i < end;) {
    int64_t len = end - i;
    std::array<const T*, N> p;
    std::array<bool, N> contiguous;
    for (size_t k = 0; k < N; ++k) {
      const Operand<T>& o = *ops[k];
      if (o.data == nullptr) {
        p[k] = &one;
        contiguous[k] = false;
      } else {
        len = std::min(len, o.b.run(i));
        p[k] = o.data + o.b.offset(i);
        contiguous[k] = o.b.inner_stride() == 1;
      }
    }
    f(i, len, p, contiguous);
    i += len;
  }
}

// The helpers below are always inlined: GCC may otherwise call them out of line from the element loops, a call per
// vector (as csrc/cpu/vec.h says of exp and log).
template <typename A, typename T>
__attribute__((always_inline)) static inline vec<A> read(const T* p, bool contiguous, int64_t j, int64_t len) {
  return contiguous ? load_as<A>(p + j, len) : splat(static_cast<A>(*p));
}

// softplus(-x) = -log(sigmoid(x)), from e = exp(-|x|).
template <typename A> __attribute__((always_inline)) static inline vec<A> softplus_neg(vec<A> x, vec<A> e) {
  return log1p_unit(e) + vmax(splat(A(0)), -x);
}

// lw = 1 + (pw - 1) * y; exactly 1 without pos_weight, as torch (an infinite target would give 0 * inf = NaN).
template <typename A>
__attribute__((always_inline)) static inline vec<A> log_weight(bool has_pw, vec<A> pw, vec<A> y) {
  return has_pw ? A(1) + (pw - A(1)) * y : splat(A(1));
}

template <typename T, bool REDUCE>
double fwd_range(const T* x, const T* y, const Operand<T>& w, const Operand<T>& pw, bool has_pw, T* out,
                 int64_t begin, int64_t end) {
  using A = acc_t<T>;
  vec<A> acc{};
  for_runs<T, 2>(begin, end, {&w, &pw}, [&](int64_t i, int64_t len, const auto& p, const auto& c) {
    for_chunks<A>(len, [&](int64_t j, int64_t l) {
      const vec<A> xv = load_as<A>(x + i + j, l), yv = load_as<A>(y + i + j, l);
      const vec<A> wv = read<A>(p[0], c[0], j, l), pwv = read<A>(p[1], c[1], j, l);
      vec<A> loss = ((A(1) - yv) * xv + log_weight<A>(has_pw, pwv, yv) * softplus_neg<A>(xv, exp(-vabs(xv)))) * wv;
      if constexpr (REDUCE) {
        if (l < kW<A>) loss = zero_tail<A>(loss, l);
        acc += loss;
      } else {
        store_as<A>(out + i + j, loss, l);
      }
    });
  });
  return REDUCE ? static_cast<double>(hsum(acc)) : 0.0;
}

template <typename T, bool DX, bool DY>
void bwd_range(const T* x, const T* y, const Operand<T>& w, const Operand<T>& pw, const Operand<T>& g,
               acc_t<T> scale, bool has_pw, T* dx, T* dy, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  for_runs<T, 3>(begin, end, {&w, &pw, &g}, [&](int64_t i, int64_t len, const auto& p, const auto& c) {
    for_chunks<A>(len, [&](int64_t j, int64_t l) {
      const vec<A> xv = load_as<A>(x + i + j, l), yv = load_as<A>(y + i + j, l);
      const vec<A> pwv = read<A>(p[1], c[1], j, l);
      const vec<A> wg = read<A>(p[0], c[0], j, l) * read<A>(p[2], c[2], j, l) * scale;
      const vec<A> e = exp(-vabs(xv));
      if constexpr (DX) {
        const vec<A> sig = (xv >= A(0) ? splat(A(1)) : e) / (A(1) + e);
        store_as<A>(dx + i + j, (log_weight<A>(has_pw, pwv, yv) * sig - pwv * yv) * wg, l);
      }
      if constexpr (DY) {
        // Without pos_weight d/dy is -x exactly (no 0 * inf at x = -inf).
        const vec<A> d = has_pw ? (pwv - A(1)) * softplus_neg<A>(xv, e) - xv : -xv;
        store_as<A>(dy + i + j, d * wg, l);
      }
    });
  });
}

at::Tensor bce_with_logits_fwd_cpu(const at::Tensor& input, const at::Tensor& target,
                                   const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
  bce::check_args(input, target, weight, pos_weight, reduction);
  const at::Tensor x = input.contiguous(), y = target.contiguous();
  const int64_t n = x.numel();
  at::Tensor out = bce::fwd_output(x, reduction, cached_empty);
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bce_with_logits_fwd_cpu", [&] {
    using T = scalar_t;
    const T *xp = x.const_data_ptr<T>(), *yp = y.const_data_ptr<T>();
    const bce::Operands<T> o(x, weight, pos_weight);
    if (reduction == at::Reduction::None) {
      T* op = out.mutable_data_ptr<T>();
      at::parallel_for(0, n, kGrain,
                       [&](int64_t b, int64_t e) { fwd_range<T, false>(xp, yp, o.w, o.pw, o.has_pw, op, b, e); });
      return;
    }
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    std::vector<double> partial(chunks);
    at::parallel_for(0, chunks, kGrain / kChunk, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c)
        partial[c] = fwd_range<T, true>(xp, yp, o.w, o.pw, o.has_pw, nullptr, c * kChunk,
                                        std::min(n, (c + 1) * kChunk));
    });
    double total = 0;
    for (double s : partial) total += s;
    out.mutable_data_ptr<T>()[0] = static_cast<T>(reduction == at::Reduction::Mean ? total / n : total);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> bce_with_logits_bwd_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                                           const at::Tensor& target,
                                                           const std::optional<at::Tensor>& weight,
                                                           const std::optional<at::Tensor>& pos_weight,
                                                           int64_t reduction, bool input_grad, bool target_grad) {
  bce::check_bwd_args(grad_output, input, target, weight, pos_weight, reduction);
  const at::Tensor x = input.contiguous(), y = target.contiguous();
  const int64_t n = x.numel();
  at::Tensor dx, dy;
  std::tie(dx, dy) = bce::bwd_outputs(x, input_grad, target_grad, cached_empty);
  if (n == 0 || !(input_grad || target_grad)) return {dx, dy};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bce_with_logits_bwd_cpu", [&] {
    using T = scalar_t;
    const T *xp = x.const_data_ptr<T>(), *yp = y.const_data_ptr<T>();
    const bce::Operands<T> o(x, weight, pos_weight, grad_output);
    const auto scale = bce::grad_scale<acc_t<T>>(reduction, n);
    T* dxp = input_grad ? dx.mutable_data_ptr<T>() : nullptr;
    T* dyp = target_grad ? dy.mutable_data_ptr<T>() : nullptr;
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      if (input_grad && target_grad)
        bwd_range<T, true, true>(xp, yp, o.w, o.pw, o.g, scale, o.has_pw, dxp, dyp, b, e);
      else if (input_grad)
        bwd_range<T, true, false>(xp, yp, o.w, o.pw, o.g, scale, o.has_pw, dxp, dyp, b, e);
      else
        bwd_range<T, false, true>(xp, yp, o.w, o.pw, o.g, scale, o.has_pw, dxp, dyp, b, e);
    });
  });
  return {dx, dy};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnn, CPU, m) {
  m.impl("bce_with_logits_fwd", &bce_with_logits_fwd_cpu);
  m.impl("bce_with_logits_bwd", &bce_with_logits_bwd_cpu);
}

}  // namespace fastnn::cpu
