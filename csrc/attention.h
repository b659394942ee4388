// Pieces of the attention op shared by the CPU and CUDA kernels: argument checks, the dropout hash and the
// kernels' parameters.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

#include "common.h"

#if defined(__CUDACC__)
#define FASTNN_HD __host__ __device__ __forceinline__
#else
#define FASTNN_HD inline
#endif

namespace fastnn::attention {

// fastnn.reference.dropout_keep, bit for bit: element (row, col) of the flattened (B*H*Lq, Lk) probabilities is
// kept when the top 24 bits of a 32-bit hash of (seed, row, col) reach the threshold round(p * 2^24). The
// constants are kernels/dropout.py's, which the Python and Triton versions import.
FASTNN_HD uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}
FASTNN_HD bool dropout_keep(uint64_t seed, int64_t row, int64_t col, uint32_t thresh) {
  uint32_t x = uint32_t(row) * 0x9E3779B1u + uint32_t(col) * 0x85EBCA77u + uint32_t(seed);
  x = fmix32(fmix32(x) ^ uint32_t(seed >> 32));
  return (x >> 8) >= thresh;
}
inline uint32_t dropout_threshold(double p) {
  const double t = std::nearbyint(p * 16777216.0);  // round half to even, as Python's round()
  return t >= 16777216.0 ? 16777216u : uint32_t(t);
}

struct Geometry {
  // H query heads share Hk key/value heads (grouped-query attention: H a multiple of Hk, query head h reads kv
  // head h / group()); D the query/key head dim, Dv the value (and output) head dim.
  int64_t B, H, Hk, Lq, Lk, D, Dv;
  // Query rows of all heads: the size of each of the two planes of stats (row max m, then log l) - query row r's
  // statistics are stats[r] and stats[query_rows() + r].
  FASTNN_HOST_DEVICE int64_t query_rows() const { return B * H * Lq; }
  FASTNN_HOST_DEVICE int64_t group() const { return H / Hk; }
};

// float64 inputs accumulate in float64, all others in float32 (the dtype of stats and of an additive mask).
inline at::ScalarType acc_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

// Stride of dim d as the kernels index it: 0 along a broadcast (size-1) dim.
inline int64_t bstride(const at::Tensor& t, int64_t d) { return t.size(d) == 1 ? 0 : t.stride(d); }

// Checks the op's arguments (Python validates first; this is defense in depth) and returns the geometry.
// q (B, H, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv); attn_mask 4-d, each dim 1 or (B, H, Lq, Lk)'s.
inline Geometry check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& kpm,
                           double dropout_p) {
  check_floating(q, "query");
  TORCH_CHECK(q.dim() == 4, "query must be 4-d (B, H, Lq, D), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "key must be 4-d (B, Hk, Lk, D), got ", k.sizes());
  TORCH_CHECK(v.dim() == 4, "value must be 4-d (B, Hk, Lk, Dv), got ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "query, key and value must have the same dtype");
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "query, key and value must share a device");
  const Geometry g{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  TORCH_CHECK(k.size(0) == g.B && k.size(3) == g.D && g.Hk >= 1 && g.H % g.Hk == 0, "key shape ", k.sizes(),
              " does not match query shape ", q.sizes(), " (key heads must divide query heads)");
  TORCH_CHECK(v.size(0) == g.B && v.size(1) == g.Hk && v.size(2) == g.Lk, "value must be (B, Hk, Lk, Dv) = (",
              g.B, ", ", g.Hk, ", ", g.Lk, ", Dv) as key, got ", v.sizes());
  TORCH_CHECK(g.D >= 1 && g.D <= 256, "head dim must be in [1, 256], got ", g.D);
  TORCH_CHECK(g.Dv >= 1 && g.Dv <= 256, "value head dim must be in [1, 256], got ", g.Dv);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, "dropout_p must be in [0, 1], got ", dropout_p);
  const auto acc = acc_type(q.scalar_type());
  if (mask) {
    TORCH_CHECK(mask->scalar_type() == acc, "attn_mask must be additive in ", acc, ", got ", mask->scalar_type());
    const int64_t full[4] = {g.B, g.H, g.Lq, g.Lk};
    bool ok = mask->dim() == 4;
    for (int64_t d = 0; ok && d < 4; ++d) ok = mask->size(d) == 1 || mask->size(d) == full[d];
    TORCH_CHECK(ok, "attn_mask must be 4-d and broadcastable to (B, H, Lq, Lk) = (", g.B, ", ", g.H, ", ", g.Lq,
                ", ", g.Lk, "), got ", mask->sizes());
    TORCH_CHECK(mask->device() == q.device(), "attn_mask must be on query's device");
  }
  if (kpm) {
    TORCH_CHECK(kpm->scalar_type() == at::kBool, "key_padding_mask must be bool, got ", kpm->scalar_type());
    TORCH_CHECK(kpm->dim() == 2 && kpm->size(0) == g.B && kpm->size(1) == g.Lk,
                "key_padding_mask must be (B, Lk) = (", g.B, ", ", g.Lk, "), got ", kpm->sizes());
    TORCH_CHECK(kpm->device() == q.device(), "key_padding_mask must be on query's device");
  }
  return g;
}

// stats of a call with no keys: every row empty (m = +inf, so the backward's P is 0; log l = 0).
inline void fill_no_keys_stats(at::Tensor& stats) {
  stats[0].fill_(std::numeric_limits<double>::infinity());
  stats[1].zero_();
}

// The backward's arguments: the forward's, plus grad_out and out (B, H, Lq, Dv) in q's dtype and the forward's row
// statistics stats (2, B, H, Lq) in the accumulation dtype: plane 0 the row max m of the scores, plane 1 log l.
inline Geometry check_bwd_args(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& out, const at::Tensor& stats,
                               const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& kpm,
                               double dropout_p, bool mask_grad) {
  const Geometry g = check_args(q, k, v, mask, kpm, dropout_p);
  check_same(grad_out, "grad_out", out, "out");
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && out.device() == q.device() && out.dim() == 4 &&
                  out.size(0) == g.B && out.size(1) == g.H && out.size(2) == g.Lq && out.size(3) == g.Dv,
              "out must be (B, H, Lq, Dv) in query's dtype, got ", out.sizes());
  TORCH_CHECK(!mask_grad || mask, "mask_grad needs an attn_mask");
  const auto acc = acc_type(q.scalar_type());
  TORCH_CHECK(stats.scalar_type() == acc && stats.dim() == 4 && stats.size(0) == 2 && stats.size(1) == g.B &&
                  stats.size(2) == g.H && stats.size(3) == g.Lq,
              "stats must be (2, B, H, Lq) in ", acc, ", got ", stats.sizes(), " ", stats.scalar_type());
  return g;
}

// A (B, H, L, D) operand as the kernels read it: row-contiguous (L, D) blocks at batch / head strides sb, sh,
// which are 0 along broadcast dims (an expanded key shared by the batch is read in place, not copied). Converted
// to `dtype` (float32 for half types on the CPU) at its unexpanded size.
inline at::Tensor kernel_operand(const at::Tensor& t, at::ScalarType dtype) {
  at::Tensor base = t;
  for (int64_t d = 0; d < 2; ++d)
    if (t.size(d) > 1 && t.stride(d) == 0) base = base.narrow(d, 0, 1);
  if (base.scalar_type() != dtype) base = base.to(dtype);
  const bool rows = (base.size(3) <= 1 || base.stride(3) == 1) && (base.size(2) <= 1 || base.stride(2) == base.size(3));
  if (!rows) base = base.contiguous();
  return base.expand(t.sizes());
}

// The gradient of an additive mask: zeros of the mask's own (unexpanded) shape in the accumulation dtype
// (`acc`: q's device), or an empty (0,) tensor when not asked for.
inline at::Tensor mask_grad_buffer(const std::optional<at::Tensor>& mask, bool mask_grad,
                                   const at::TensorOptions& acc) {
  return mask_grad ? at::zeros(mask->sizes(), acc) : at::empty({0}, acc);
}

// What the kernels read of one call, A being the accumulation type.
template <typename A> struct Params : Geometry {
  A scale;
  bool causal;
  int64_t qsb, qsh, ksb, ksh, vsb, vsh;  // batch / head strides of q, k, v (elements; rows are D or Dv apart)
  const A* mask;  // additive, indexed with the strides below (0 along broadcast dims), or null
  int64_t smb, smh, smm, smn;
  A* dmask;  // the backward's d(loss)/d(mask), the mask's own shape, strides below (0 along broadcast dims)
  int64_t dmb, dmh, dmm, dmn;
  const bool* kpm;  // (B, Lk), true = pad, or null
  bool dropout;
  uint64_t seed;
  uint32_t thresh;
  A drop_scale;
};

// key_padding_mask as the kernels index it, (B, Lk) contiguous; it must outlive the Params that point into it.
inline std::optional<at::Tensor> contiguous_kpm(const std::optional<at::Tensor>& kpm) {
  if (!kpm) return std::nullopt;
  return kpm->contiguous();
}

// q, k, v: kernel_operand's; dmask: mask_grad_buffer's (empty: no mask gradient).
template <typename A>
Params<A> make_params(const Geometry& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& kpm,
                      double dropout_p, bool causal, double scale, int64_t seed, at::Tensor* dmask = nullptr) {
  Params<A> p{g, A(scale), causal};  // the pointers and strides start null / 0
  p.qsb = bstride(q, 0), p.qsh = bstride(q, 1), p.ksb = bstride(k, 0), p.ksh = bstride(k, 1);
  p.vsb = bstride(v, 0), p.vsh = bstride(v, 1);
  if (mask) {
    p.mask = mask->const_data_ptr<A>();
    p.smb = bstride(*mask, 0), p.smh = bstride(*mask, 1), p.smm = bstride(*mask, 2), p.smn = bstride(*mask, 3);
  }
  if (dmask && dmask->numel() > 0) {
    p.dmask = dmask->mutable_data_ptr<A>();
    p.dmb = bstride(*dmask, 0), p.dmh = bstride(*dmask, 1), p.dmm = bstride(*dmask, 2), p.dmn = bstride(*dmask, 3);
  }
  if (kpm) p.kpm = kpm->const_data_ptr<bool>();
  p.dropout = dropout_p > 0;
  p.seed = uint64_t(seed);
  p.thresh = dropout_threshold(dropout_p);
  p.drop_scale = dropout_p < 1 ? A(1.0 / (1.0 - dropout_p)) : A(0);
  return p;
}

}  // namespace fastnn::attention
