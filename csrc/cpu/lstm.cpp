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
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <c10/util/ParallelGuard.h>

#include <algorithm>
#include <atomic>
#include <exception>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/alloc.h"
#include "cpu/gemm.h"
#include "cpu/vec.h"
#include "lstm.h"

namespace fastnn::cpu {
namespace {

constexpr int64_t kGrain = 16384;  // elements of a row block per parallel task: below that one core is faster

int64_t grain_rows(int64_t hidden) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(4 * hidden, 1)); }

// n hidden units of one batch row of the forward; the gates of a unit lie H apart. pre: the gate
// pre-activations (may alias act), bias: the same layout or null, cp: the previous cell state. Writes act (4
// gates), c and h.
template <typename T>
void cell_fwd_row(const T* pre, const T* bias, const T* cp, T* act, T* c, T* h, int64_t H, int64_t n) {
  using A = acc_t<T>;
  for_chunks<A>(n, [&](int64_t j, int64_t len) {
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

// n hidden units of one batch row of the backward (gates H apart, as above). The incoming gradients are sums of
// two terms each (dh + dh2, dc + dc2; the second may be null) so the layer's recurrent and per-step gradients
// need no separate add. Writes the pre-activation gradients dgates and dcp, the gradient of the previous cell
// state (may alias dc2); with dbias (gates H apart, as dgates) also adds dgates to it, the layer's bias gradient
// summed while the values are in registers rather than in a pass over all steps' gradients afterwards.
template <typename T>
void cell_bwd_row(const T* dh, const T* dh2, const T* dc, const T* dc2, const T* act, const T* cp, T* dgates, T* dcp,
                  int64_t H, int64_t n, acc_t<T>* dbias = nullptr) {
  using A = acc_t<T>;
  for_chunks<A>(n, [&](int64_t j, int64_t len) {
    const vec<A> i = load_as<A>(act + j, len), f = load_as<A>(act + H + j, len);
    const vec<A> g = load_as<A>(act + 2 * H + j, len), o = load_as<A>(act + 3 * H + j, len);
    const vec<A> c0 = load_as<A>(cp + j, len);
    const vec<A> tc = tanh(f * c0 + i * g);
    vec<A> gh = load_as<A>(dh + j, len), gc = load_as<A>(dc + j, len);
    if (dh2) gh += load_as<A>(dh2 + j, len);
    if (dc2) gc += load_as<A>(dc2 + j, len);
    gc += gh * o * (A(1) - tc * tc);
    const vec<A> d[4] = {gc * g * i * (A(1) - i), gc * c0 * f * (A(1) - f), gc * i * (A(1) - g * g),
                         gh * tc * o * (A(1) - o)};
    for (int k = 0; k < 4; ++k) {
      store_as<A>(dgates + k * H + j, d[k], len);
      if (dbias) store_as<A>(dbias + k * H + j, load_as<A>(dbias + k * H + j, len) + d[k], len);
    }
    store_as<A>(dcp + j, gc * f, len);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_fwd_cpu(const at::Tensor& gates_,
                                                                 const std::optional<at::Tensor>& bias_,
                                                                 const at::Tensor& cx_) {
  check_lstm_cell(gates_, cx_, "gates");
  const int64_t B = cx_.size(0), H = cx_.size(1);
  const at::Tensor gates = gates_.contiguous(), cx = cx_.contiguous();
  const at::Tensor bias = checked_lstm_bias(bias_, gates, H);
  at::Tensor hy = at::empty({B, H}, cx.options()), cy = at::empty({B, H}, cx.options());
  at::Tensor act = at::empty({B, 4 * H}, cx.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cx.scalar_type(), "lstm_cell_fwd_cpu", [&] {
    const scalar_t *g = gates.const_data_ptr<scalar_t>(), *c = cx.const_data_ptr<scalar_t>();
    const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t *a = act.mutable_data_ptr<scalar_t>(), *cn = cy.mutable_data_ptr<scalar_t>();
    scalar_t* hn = hy.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain_rows(H), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        cell_fwd_row(g + r * 4 * H, b, c + r * H, a + r * 4 * H, cn + r * H, hn + r * H, H, H);
    });
  });
  return {hy, cy, act};
}

std::tuple<at::Tensor, at::Tensor> lstm_cell_bwd_cpu(const at::Tensor& grad_hy_, const at::Tensor& grad_cy_,
                                                     const at::Tensor& act_, const at::Tensor& cx_) {
  check_lstm_cell(act_, cx_, "act");
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
                               dg + r * 4 * H, dcp + r * H, H, H);
    });
  });
  return {dgates, dcx};
}

// ---- the layer ----

// Whether a layer's recurrent products run on packed::gemm: float32 on a CPU build with AVX2 and FMA, and more
// than one step, since the packing (one pass over W_hh) pays off from the second step on.
bool packed_wanted(const at::Tensor& w_hh, int64_t T) {
  return packed::kAvailable && w_hh.scalar_type() == at::kFloat && T > 1;
}

// Whether the recurrent products run in packed::gemm_cols' column form: AVX-512 and 27 to 32 rows (the form
// computes 32 whatever B is; below 27 the row kernel is as fast or faster).
bool cols_wanted(const at::Tensor& w_hh, int64_t T, int64_t B) {
  return packed_wanted(w_hh, T) && packed::kColsAvailable && B >= packed::kColsMinRows && B <= packed::kColsRows;
}

// w [N, K] (contiguous float32) transposed into packed::gemm's panels at wp, the threads packing a share each.
void pack_input_weight(const at::Tensor& w, float* wp) {
  const int64_t N = w.size(0), K = w.size(1);
  const float* wd = w.const_data_ptr<float>();
  at::parallel_for(0, packed::panels(N), 1, [&](int64_t p0, int64_t p1) {
    const int64_t j0 = p0 * packed::kNR;
    packed::pack(wd + j0 * K, 1, K, K, std::min(N, p1 * packed::kNR) - j0, wp + j0 * K);
  });
}

// out [M, N] = x [M, K] . w^T with w packed by pack_input_weight; x contiguous float32. The threads take a share
// of the rows each (at least 48, so that a few hundred rows still split), in blocks of up to 128: a block's A
// (128 x 512 floats) stays in L2 while the packed weights stream past it, once a block, so the larger the block
// the fewer times a thread streams all of W (blocks of 48 against 128: docs/measurements.md, "LSTM recurrence in
// the column form").
void input_product_packed(const at::Tensor& x, const float* wp, int64_t N, at::Tensor& out) {
  constexpr int64_t kMinRows = 48, kRows = 128;
  const int64_t M = x.size(0), K = x.size(1);
  const float* xd = x.const_data_ptr<float>();
  float* od = out.mutable_data_ptr<float>();
  at::parallel_for(0, M, kMinRows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r += kRows)
      packed::gemm(xd + r * K, K, std::min(kRows, r1 - r), K, wp, N, od + r * N, N, /*accumulate=*/false);
  });
}

// c (+)= a . W for one slice on packed::gemm, W's slice packed at wp + offset; false, doing nothing, where the
// layer does not use the kernel (wp undefined) or T is not float.
template <typename T>
bool packed_product(const T* a, int64_t lda, int64_t M, int64_t K, const at::Tensor& wp, int64_t offset,
                    int64_t ncols, T* c, int64_t ldc, bool accumulate) {
  if constexpr (std::is_same_v<T, float>) {
    if (wp.defined()) {
      packed::gemm(a, lda, M, K, wp.const_data_ptr<float>() + offset, ncols, c, ldc, accumulate);
      return true;
    }
  }
  return false;
}

// The forward recurrence's product of one slice (units [j0, j0 + n)) in the column form: ct = the slice's gate
// columns of (h_{t-1} W_hh^T)^T, from ht = h_{t-1}^T ([H][R]) and the slice's pack_cols block wp; then each row's
// four gates of the slice (in a, the step's [B, 4H] gate rows) += its column of ct. float32 only (the layer uses
// it only then).
template <typename T>
void cols_product(const float* ht, int64_t B, int64_t H, const float* wp, int64_t j0, int64_t n, float* ct, T* a) {
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t R = packed::kColsRows;
    packed::gemm_cols(ht, H, wp, 4 * n, ct);
    for (int64_t k = 0; k < 4; ++k) packed::add_cols_to_rows(ct + k * n * R, R, n, B, a + k * H + j0, 4 * H);
  } else {
    TORCH_CHECK(false, "lstm_layer: the column form is float32 only");
  }
}

// n columns of B rows (ld apart) into the column form's transposed layout (float32 only): the forward's h_t for
// the next step, the backward's gate gradients for the step before.
template <typename T> void cols_store(const T* a, int64_t B, int64_t ld, int64_t n, float* at) {
  if constexpr (std::is_same_v<T, float>) packed::rows_to_cols(a, ld, B, n, at, packed::kColsRows);
  else TORCH_CHECK(false, "lstm_layer: the column form is float32 only");
}

// The backward's recurrent product of one slice (n units) in the column form: ct = the slice's columns of
// (dG W_hh)^T from gt = dG^T ([K][R], K = 4H) and the slice's pack_cols block wp, then dh's slice (rows ldh
// apart) (+)= its transpose (float32 only).
template <typename T>
void cols_hand_back(const float* gt, int64_t B, int64_t K, const float* wp, int64_t n, float* ct, T* dh, int64_t ldh,
                    bool accumulate) {
  if constexpr (std::is_same_v<T, float>) {
    packed::gemm_cols(gt, K, wp, n, ct);
    packed::add_cols_to_rows(ct, packed::kColsRows, n, B, dh, ldh, accumulate);
  } else {
    TORCH_CHECK(false, "lstm_layer: the column form is float32 only");
  }
}

// The recurrence splits hidden units, not batch rows, over the threads: a thread's slice of a step's GEMM (the
// four gate columns of its units, single-threaded inside the parallel region) feeds straight into its slice of
// the cell, and in the backward its slice of the h gradient is exactly what its cell reads next. A step is then
// one parallel region where a BLAS-threaded GEMM and a threaded cell take two, and the BLAS's own split of a
// GEMM of a few dozen rows loses much of the second thread to fork / join and imbalance (docs/measurements.md,
// "LSTM").
class UnitSlices {
  static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

 public:
  // B rows of a step whose GEMM has a reduction depth of K.
  UnitSlices(int64_t B, int64_t H, int64_t K) : H_(H) {  // also captures the caller's thread-local state
    constexpr int64_t kAlign = 16, kMinWork = int64_t(1) << 18;  // below ~256k multiply-adds a split costs more
    const int64_t want = std::clamp<int64_t>(B * 4 * H * K / kMinWork, 1, at::get_num_threads());
    width_ = ceil_div(ceil_div(H, std::min(want, ceil_div(H, kAlign))), kAlign) * kAlign;
    n = ceil_div(H, width_);
  }
  int64_t begin(int64_t p) const { return p * width_; }
  int64_t len(int64_t p) const { return std::min(width_, H_ - p * width_); }
  // f(slice, first unit, units) for every slice, on the intra-op threads. The workers get the constructing
  // thread's thread-local state (autograd exclusion, inference mode), since f runs at:: ops.
  template <typename F> void run(F&& f) const {
    if (n == 1) return f(0, 0, H_);
    at::parallel_for(0, n, 1, [&](int64_t p0, int64_t p1) {
      const at::ThreadLocalStateGuard guard(tls_);
#ifdef _OPENMP
      // This thread's BLAS calls single-threaded: torch's libgomp allows nested regions (max-active-levels is
      // unbounded), so a threaded BLAS could fork a team of its own from every worker. The setting belongs to
      // the worker's implicit task and ends with the region.
      omp_set_num_threads(1);
#endif
      for (int64_t p = p0; p < p1; ++p) f(p, begin(p), len(p));
    });
  }
  // f(step, slice, first unit, units) for steps [s0, s1) in order, every slice of a step done before the next step
  // starts. With OpenMP one parallel region holds all the steps, a barrier between two, where a region per step
  // (run) forks and joins the team each time and runs the caller's step setup on one thread while the others wait.
  template <typename F> void run_steps(int64_t s0, int64_t s1, F&& f) const {
#ifdef _OPENMP
    const int threads = static_cast<int>(std::min<int64_t>(n, at::get_num_threads()));
    if (threads > 1 && !at::in_parallel_region() && s1 - s0 > 1) {
      std::exception_ptr error;
      std::atomic<bool> failed{false};
#pragma omp parallel num_threads(threads)
      {
        const at::ThreadLocalStateGuard guard(tls_);
        const c10::ParallelGuard in_region(true);  // at:: ops inside run on this thread, as in at::parallel_for
        omp_set_num_threads(1);                    // and so does the BLAS (see run)
        const int64_t team = omp_get_num_threads(), per = ceil_div(n, team);
        const int64_t p0 = omp_get_thread_num() * per, p1 = std::min(n, p0 + per);
        for (int64_t s = s0; s < s1; ++s) {
          // A thread that threw keeps meeting the barriers (the others would wait for it forever) but does no
          // more work; the first exception is rethrown after the region.
          if (!failed.load(std::memory_order_relaxed)) {
            try {
              for (int64_t p = p0; p < p1; ++p) f(s, p, begin(p), len(p));
            } catch (...) {
#pragma omp critical(fastnn_lstm_run_steps)
              if (!error) error = std::current_exception();
              failed.store(true, std::memory_order_relaxed);
            }
          }
#pragma omp barrier
        }
      }
      if (error) std::rethrow_exception(error);
      return;
    }
#endif
    for (int64_t s = s0; s < s1; ++s) run([&](int64_t p, int64_t j0, int64_t len) { f(s, p, j0, len); });
  }
  int64_t n;

 private:
  int64_t H_, width_;
  at::ThreadLocalState tls_;  // once per layer call, not per step
};

// The forward recurrence of one layer, shared by the training op (keep: every step's activated gates and cell
// state, which the backward reads) and the no-grad op (!keep: the input product in blocks of steps into a small
// gate scratch, the cell state in two [B, H] buffers, so nothing of size T x 4H outlives a block). Returns hs
// [T, B, H] and, with keep, cs [T, B, H] and act [T, B, 4H]; without, c_n [B, H] and an undefined tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_forward(
    const at::Tensor& x_, const at::Tensor& w_ih, const std::optional<at::Tensor>& bias_, const at::Tensor& w_hh_,
    const at::Tensor& h0_, const at::Tensor& c0_, const std::optional<at::Tensor>& lengths, bool reverse, bool keep) {
  at::Tensor len_holder;
  const LstmLayerGeometry geo = check_lstm_layer(x_, "x", w_hh_, c0_, lengths, len_holder, x_.size(-1));
  const at::Tensor bias = check_lstm_layer_input(x_, w_ih, bias_, w_hh_);
  check_same(h0_, "h0", c0_, "c0");
  const int64_t T = geo.T, B = geo.B, H = geo.H, I = x_.size(2);
  const at::Tensor h0 = h0_.contiguous(), c0 = c0_.contiguous();
  // Steps per input product: all of them with keep (the gates stay for the backward); else enough for >= 256
  // rows, which keeps the GEMM efficient while its output (B = 32, H = 512: 8 steps, 512 KB) stays in cache.
  const int64_t block =
      keep ? T : std::clamp<int64_t>((256 + B - 1) / std::max<int64_t>(B, 1), 1, std::max<int64_t>(T, 1));
  // Big, freshly faulted buffers: the huge-page allocator (csrc/cpu/alloc.h).
  at::Tensor hs = cpu::cached_empty({T, B, H}, x_.options());
  at::Tensor cs = cpu::cached_empty({keep ? T : 2, B, H}, x_.options());  // !keep: two buffers, steps alternating
  at::Tensor act = cpu::cached_empty({block, B, 4 * H}, x_.options());
  if (T * B == 0) return keep ? std::make_tuple(hs, cs, act) : std::make_tuple(hs, c0.clone(), at::Tensor());
  const at::Tensor x2 = x_.reshape({T * B, I});
  const at::Tensor w_hh = w_hh_.contiguous();
  const UnitSlices sl(B, H, H);
  // Per slice and gate, the block of W_hh^T giving that gate's columns (gate k of slice p: the K = H by len(p)
  // matrix W_hh[kH + begin(p) + j, i] at (i, j)); made once, not per step. float32 packs these blocks and W_ih^T
  // once for packed::gemm, each thread its own slice (so it starts in that core's cache); with keep the input
  // product is done before the recurrence starts, so W_hh's blocks reuse W_ih's space. Elsewhere ATen multiplies
  // views.
  // With AVX-512 and 27 <= B <= 32 the recurrence runs in the column form (packed::gemm_cols): a slice's four gates
  // are one packed block of 4 len(p) columns, h_{t-1} is kept transposed (ht, two buffers, steps alternating) and
  // each step's product lands in the slice's scratch ct, which the rows then add into their gates.
  const bool cols = cols_wanted(w_hh, T, B);
  const int64_t R = packed::kColsRows, ct_size = packed::cols_groups(4 * sl.len(0)) * packed::kColsGroup * R;
  const int64_t blk = cols ? packed::cols_packed_size(H, 4 * sl.len(0)) : 4 * packed::packed_size(H, sl.len(0));
  const int64_t ih_size = packed::packed_size(I, 4 * H), hh_at = keep ? 0 : ih_size;
  at::Tensor wp, ht, ct;
  std::vector<at::Tensor> w_blk(4 * sl.n);
  if (packed_wanted(w_hh, T)) {
    wp = cpu::cached_empty({std::max(ih_size, hh_at + sl.n * blk)}, w_hh.options());
    pack_input_weight(w_ih.contiguous(), wp.mutable_data_ptr<float>());
  } else {
    for (int64_t p = 0; p < sl.n; ++p)
      for (int64_t k = 0; k < 4; ++k) w_blk[4 * p + k] = w_hh.narrow(0, k * H + sl.begin(p), sl.len(p)).t();
  }
  const at::Tensor xc = wp.defined() ? x2.contiguous() : x2;
  // The input product of steps [t0, t0 + n) into the gate buffer's first n steps, which each step then completes
  // in place (+ h W_hh^T) and activates: no separate input-gate tensor, no per-step copy. The bias joins in the
  // cell: an addmm would first copy it to every row.
  const auto input_product = [&](int64_t t0, int64_t n) {
    at::Tensor out = act.narrow(0, 0, n).view({n * B, 4 * H});
    if (wp.defined()) input_product_packed(xc.narrow(0, t0 * B, n * B), wp.const_data_ptr<float>(), 4 * H, out);
    else at::mm_out(out, x2.narrow(0, t0 * B, n * B), w_ih.t());
  };
  if (keep) input_product(0, T);
  if (cols) {
    ht = at::empty({2, H, R}, w_hh.options());
    ct = at::empty({sl.n, ct_size}, w_hh.options());
    packed::rows_to_cols(h0.const_data_ptr<float>(), H, B, H, ht.mutable_data_ptr<float>(), R);
    sl.run([&](int64_t p, int64_t j0, int64_t n) {
      std::vector<const float*> col(4 * n);  // gate column k n + u of the slice: row k H + j0 + u of W_hh
      for (int64_t k = 0; k < 4; ++k)
        for (int64_t u = 0; u < n; ++u) col[k * n + u] = w_hh.const_data_ptr<float>() + (k * H + j0 + u) * H;
      packed::pack_cols(col.data(), 1, H, 4 * n, wp.mutable_data_ptr<float>() + hh_at + p * blk);
    });
  } else if (wp.defined()) {
    sl.run([&](int64_t p, int64_t j0, int64_t n) {
      for (int64_t k = 0; k < 4; ++k)
        packed::pack(w_hh.const_data_ptr<float>() + (k * H + j0) * H, 1, H, H, n,
                     wp.mutable_data_ptr<float>() + hh_at + p * blk + k * packed::packed_size(H, n));
    });
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, act.scalar_type(), "lstm_layer_fwd_cpu", [&] {
    const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t *h0p = h0.const_data_ptr<scalar_t>(), *c0p = c0.const_data_ptr<scalar_t>();
    scalar_t *hsp = hs.mutable_data_ptr<scalar_t>(), *csp = cs.mutable_data_ptr<scalar_t>();
    scalar_t* actp = act.mutable_data_ptr<scalar_t>();
    int64_t t0 = 0;  // the first step in the gate buffer
    float* ctp = ct.defined() ? ct.mutable_data_ptr<float>() : nullptr;
    float* htp = ht.defined() ? ht.mutable_data_ptr<float>() : nullptr;
    // Step s's share of slice p (units [j0, j0 + n)): the gate products into the step's gate rows, then the cell.
    const auto step = [&](int64_t s, int64_t p, int64_t j0, int64_t n) {
      const int64_t t = reverse ? T - 1 - s : s, tp = reverse ? t + 1 : t - 1;
      // !keep: the slots alternate so that the last step writes slot 0, the tensor returned as c_n.
      const int64_t cur = keep ? t : (T - 1 - s) % 2, prev = keep ? tp : (T - s) % 2;
      scalar_t* a = actp + (t - t0) * B * 4 * H;
      const scalar_t *hp = s == 0 ? h0p : hsp + tp * B * H, *cp = s == 0 ? c0p : csp + prev * B * H;
      scalar_t *hn = hsp + t * B * H, *cn = csp + cur * B * H;
      if (cols) {
        cols_product(htp + (s % 2) * H * R, B, H, wp.const_data_ptr<float>() + hh_at + p * blk, j0, n,
                     ctp + p * ct_size, a);
      } else {
        for (int64_t k = 0; k < 4; ++k) {
          if (!packed_product(hp, H, B, H, wp, hh_at + p * blk + k * packed::packed_size(H, n), n, a + k * H + j0,
                              4 * H, /*accumulate=*/true))
            act.select(0, t - t0).narrow(1, k * H + j0, n).addmm_(s == 0 ? h0 : hs.select(0, tp), w_blk[4 * p + k]);
        }
      }
      for (int64_t r = 0; r < B; ++r) {
        const int64_t o = r * H + j0;
        if (geo.active(t, r)) {
          cell_fwd_row<scalar_t>(a + 4 * r * H + j0, b ? b + j0 : nullptr, cp + o, a + 4 * r * H + j0, cn + o,
                                 hn + o, H, n);
        } else {
          std::copy(cp + o, cp + o + n, cn + o);
          std::copy(hp + o, hp + o + n, hn + o);
        }
      }
      if (cols) {  // this slice's units of h_t, transposed, for the next step
        cols_store(hn + j0, B, H, n, htp + ((s + 1) % 2) * H * R + j0 * R);
      }
    };
    for (int64_t s0 = 0; s0 < T; s0 += block) {  // keep: one block of all steps, whose input product is done
      const int64_t n = std::min(block, T - s0);
      if (!keep) {
        t0 = reverse ? T - s0 - n : s0;
        input_product(t0, n);
      }
      sl.run_steps(s0, s0 + n, step);
    }
  });
  if (keep) return {hs, cs, act};
  return {hs, cs.select(0, 0), at::Tensor()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_fwd_cpu(
    const at::Tensor& x, const at::Tensor& w_ih, const std::optional<at::Tensor>& bias, const at::Tensor& w_hh,
    const at::Tensor& h0, const at::Tensor& c0, const std::optional<at::Tensor>& lengths, bool reverse) {
  return layer_forward(x, w_ih, bias, w_hh, h0, c0, lengths, reverse, /*keep=*/true);
}

// Without autograd: (hs, c_n).
std::tuple<at::Tensor, at::Tensor> lstm_layer_infer_fwd_cpu(
    const at::Tensor& x, const at::Tensor& w_ih, const std::optional<at::Tensor>& bias, const at::Tensor& w_hh,
    const at::Tensor& h0, const at::Tensor& c0, const std::optional<at::Tensor>& lengths, bool reverse) {
  auto [hs, cn, unused] = layer_forward(x, w_ih, bias, w_hh, h0, c0, lengths, reverse, /*keep=*/false);
  return {hs, cn};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd_cpu(
    const at::Tensor& grad_hs_, const std::optional<at::Tensor>& grad_cs, const at::Tensor& w_hh_,
    const at::Tensor& c0_, const at::Tensor& cs_, const at::Tensor& act_, const std::optional<at::Tensor>& lengths,
    bool reverse) {
  at::Tensor len_holder;
  const LstmLayerGeometry geo = check_lstm_layer(act_, "act", w_hh_, c0_, lengths, len_holder);
  const int64_t T = geo.T, B = geo.B, H = geo.H;
  const at::Tensor dcs = check_lstm_layer_grads(geo, grad_hs_, grad_cs, cs_, act_);  // undefined: zero
  // grad_hs is read in place wherever its units are contiguous: a batch_first model hands over the transpose of
  // its [B, T, H] gradient, which a copy to [T, B, H] would cost a pass over.
  const at::Tensor dhs = grad_hs_.stride(2) == 1 ? grad_hs_ : grad_hs_.contiguous(), w_hh = w_hh_.contiguous();
  const int64_t dhs_t = dhs.stride(0), dhs_r = dhs.stride(1);
  const at::Tensor c0 = c0_.contiguous(), cs = cs_.contiguous(), act = act_.contiguous();
  at::Tensor dgx = cpu::cached_empty({T, B, 4 * H}, act.options());
  // dh carries the recurrent gradient into the next (earlier) step, dc the cell-state gradient; both start at
  // zero for the last step. pass holds, for rows past their length, the h gradient they hand through.
  at::Tensor dh = at::zeros({B, H}, act.options()), dc = at::zeros({B, H}, act.options());
  at::Tensor pass = geo.len ? at::zeros({B, H}, act.options()) : at::Tensor();
  // The bias gradient, summed by the cell in the accumulation type; each thread adds only its own units' gates.
  const bool wide = act.scalar_type() == at::kDouble;
  at::Tensor dbias = at::zeros({4 * H}, act.options().dtype(wide ? at::kDouble : at::kFloat));
  if (T * B * H == 0) return {dgx.zero_(), dh, dc, dbias.to(act.scalar_type())};  // h0, c0, bias reach nothing
  const UnitSlices sl(B, H, 4 * H);
  // Each slice's block of W_hh (K = 4H by len(p), at (i, j) W_hh[i, begin(p) + j]): float32 packs it for
  // packed::gemm (or, with cols, gemm_cols: the previous step's gate gradients kept transposed in gt, two
  // buffers, iterations alternating, and the product landing in the slice's ct), by the thread that uses it;
  // elsewhere ATen multiplies views (of dh and pass too).
  const bool cols = cols_wanted(w_hh, T, B);
  const int64_t R = packed::kColsRows, ct_size = packed::cols_groups(sl.len(0)) * packed::kColsGroup * R;
  const int64_t blk = cols ? packed::cols_packed_size(4 * H, sl.len(0)) : packed::packed_size(4 * H, sl.len(0));
  at::Tensor wp, gt, ct;
  std::vector<at::Tensor> w_blk(sl.n), dh_blk(sl.n), pass_blk(sl.n);
  if (packed_wanted(w_hh, T)) {
    wp = cpu::cached_empty({sl.n * blk}, w_hh.options());
    if (cols) {
      gt = at::empty({2, 4 * H, R}, w_hh.options());
      ct = at::empty({sl.n, ct_size}, w_hh.options());
    }
    sl.run([&](int64_t p, int64_t j0, int64_t n) {
      float* dst = wp.mutable_data_ptr<float>() + p * blk;
      if (cols) {
        std::vector<const float*> col(n);  // column u of the slice: W_hh[:, j0 + u]
        for (int64_t u = 0; u < n; ++u) col[u] = w_hh.const_data_ptr<float>() + j0 + u;
        packed::pack_cols(col.data(), H, 4 * H, n, dst);
      } else {
        packed::pack(w_hh.const_data_ptr<float>() + j0, H, 1, 4 * H, n, dst);
      }
    });
  } else {
    for (int64_t p = 0; p < sl.n; ++p) {
      w_blk[p] = w_hh.narrow(1, sl.begin(p), sl.len(p));
      dh_blk[p] = dh.narrow(1, sl.begin(p), sl.len(p));
      if (pass.defined()) pass_blk[p] = pass.narrow(1, sl.begin(p), sl.len(p));
    }
  }
  // The h gradient a step hands to the one before (a slice of it, or all): through W_hh, plus what rows past
  // their length hand through (`passed`, undefined without lengths).
  const auto hand_back = [](at::Tensor& out, const at::Tensor& passed, const at::Tensor& dg, const at::Tensor& w) {
    if (passed.defined()) at::addmm_out(out, passed, dg, w);
    else at::mm_out(out, dg, w);
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, act.scalar_type(), "lstm_layer_bwd_cpu", [&] {
    scalar_t *dhp = dh.mutable_data_ptr<scalar_t>(), *dcp = dc.mutable_data_ptr<scalar_t>();
    scalar_t* pp = pass.defined() ? pass.mutable_data_ptr<scalar_t>() : nullptr;
    float* ctp = ct.defined() ? ct.mutable_data_ptr<float>() : nullptr;
    float* gtp = gt.defined() ? gt.mutable_data_ptr<float>() : nullptr;
    acc_t<scalar_t>* dbp = dbias.mutable_data_ptr<acc_t<scalar_t>>();
    // Step s's share of slice p (units [j0, j0 + n)), the steps running from the last to the first.
    const auto step = [&](int64_t i, int64_t p, int64_t j0, int64_t n) {
      const int64_t s = T - 1 - i;
      const int64_t t = reverse ? T - 1 - s : s, tp = reverse ? t + 1 : t - 1, tn = reverse ? t - 1 : t + 1;
      const scalar_t* cp = s == 0 ? c0.const_data_ptr<scalar_t>() : cs.const_data_ptr<scalar_t>() + tp * B * H;
      const scalar_t* gh = dhs.const_data_ptr<scalar_t>() + t * dhs_t;
      const scalar_t* gc = dcs.defined() ? dcs.const_data_ptr<scalar_t>() + t * B * H : nullptr;
      const scalar_t* a = act.const_data_ptr<scalar_t>() + t * B * 4 * H;
      scalar_t* dg = dgx.mutable_data_ptr<scalar_t>() + t * B * 4 * H;
      // A slice's share of the previous step's GEMM gives exactly the dh units its cell needs next, so one
      // step holds both.
      if (s != T - 1) {
        const scalar_t* dg_next = dgx.const_data_ptr<scalar_t>() + tn * B * 4 * H;
        if (wp.defined() && pp) {  // the rows past their length hand their gradient through: dh = pass + dG W_hh
          for (int64_t r = 0; r < B; ++r) std::copy_n(pp + r * H + j0, n, dhp + r * H + j0);
        }
        if (cols) {
          cols_hand_back(gtp + ((i + 1) % 2) * 4 * H * R, B, 4 * H, wp.const_data_ptr<float>() + p * blk, n,
                         ctp + p * ct_size, dhp + j0, H, /*accumulate=*/pp != nullptr);
        } else if (!packed_product(dg_next, 4 * H, B, 4 * H, wp, p * blk, n, dhp + j0, H,
                                   /*accumulate=*/pp != nullptr)) {
          hand_back(dh_blk[p], pass_blk[p], dgx.select(0, tn), w_blk[p]);
        }
      }
      for (int64_t r = 0; r < B; ++r) {
        const int64_t o = r * H + j0;
        const scalar_t* ghr = gh + r * dhs_r + j0;  // the row's slice of grad_hs
        if (geo.active(t, r)) {
          cell_bwd_row<scalar_t>(ghr, dhp + o, gc ? gc + o : dcp + o, gc ? dcp + o : nullptr,
                                 a + 4 * r * H + j0, cp + o, dg + 4 * r * H + j0, dcp + o, H, n, dbp + j0);
          if (pp) std::fill(pp + o, pp + o + n, scalar_t(0));
        } else {
          for (int64_t k = 0; k < 4; ++k) std::fill_n(dg + (4 * r + k) * H + j0, n, scalar_t(0));
          for (int64_t j = o; j < o + n; ++j) {
            pp[j] = static_cast<scalar_t>(acc_t<scalar_t>(ghr[j - o]) + acc_t<scalar_t>(dhp[j]));
            if (gc) dcp[j] = static_cast<scalar_t>(acc_t<scalar_t>(gc[j]) + acc_t<scalar_t>(dcp[j]));
          }
        }
      }
      if (cols && s != 0) {  // this slice's gate gradients, transposed, for the next iteration (the step before)
        for (int64_t k = 0; k < 4; ++k)
          cols_store(dg + k * H + j0, B, 4 * H, n, gtp + (i % 2) * 4 * H * R + (k * H + j0) * R);
      }
    };
    sl.run_steps(0, T, step);
    // The first step's gradient into h0: the whole GEMM, threaded by the BLAS.
    hand_back(dh, pass, dgx.select(0, reverse ? T - 1 : 0), w_hh);
  });
  return {dgx, dh, dc, dbias.to(act.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnn, CPU, m) {
  m.impl("lstm_cell_fwd", &lstm_cell_fwd_cpu);
  m.impl("lstm_cell_bwd", &lstm_cell_bwd_cpu);
  m.impl("lstm_layer_fwd", &lstm_layer_fwd_cpu);
  m.impl("lstm_layer_infer_fwd", &lstm_layer_infer_fwd_cpu);
  m.impl("lstm_layer_bwd", &lstm_layer_bwd_cpu);
}

}  // namespace fastnn::cpu
