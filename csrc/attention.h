// Pieces of the attention op shared by the CPU and CUDA kernels: argument checks and the dropout hash.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>

#include "common.h"

#if defined(__CUDACC__)
#define FASTNN_HD __host__ __device__ __forceinline__
#else
#define FASTNN_HD inline
#endif

namespace fastnn::attention {

// fastnn.reference.dropout_keep, bit for bit: element (row, col) of the flattened (B*H*Lq, Lk) probabilities is
// kept when the top 24 bits of a 32-bit hash of (seed, row, col) reach the threshold round(p * 2^24).
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
  int64_t B, H, Lq, Lk, D;
};

// Checks the op's arguments (Python validates first; this is defense in depth) and returns the geometry.
inline Geometry check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& kpm,
                           double dropout_p) {
  check_floating(q, "query");
  TORCH_CHECK(q.dim() == 4, "query must be 4-d (B, H, Lq, D), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "key must be 4-d (B, H, Lk, D), got ", k.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "query, key and value must have the same dtype");
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "query, key and value must share a device");
  const Geometry g{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK(k.size(0) == g.B && k.size(1) == g.H && k.size(3) == g.D, "key shape ", k.sizes(),
              " does not match query shape ", q.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "value must have key's shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(g.D >= 1 && g.D <= 256, "head dim must be in [1, 256], got ", g.D);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, "dropout_p must be in [0, 1], got ", dropout_p);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (mask) {
    TORCH_CHECK(mask->scalar_type() == acc, "attn_mask must be additive in ", acc, ", got ", mask->scalar_type());
    TORCH_CHECK(mask->dim() == 4 && mask->size(0) == g.B && mask->size(1) == g.H && mask->size(2) == g.Lq &&
                    mask->size(3) == g.Lk,
                "attn_mask must be (expanded to) (B, H, Lq, Lk) = (", g.B, ", ", g.H, ", ", g.Lq, ", ", g.Lk,
                "), got ", mask->sizes());
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

// The backward's arguments: the forward's, plus grad_out and out shaped like query and lse (B, H, Lq) in the
// accumulation dtype.
inline Geometry check_bwd_args(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                               const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& kpm,
                               double dropout_p) {
  const Geometry g = check_args(q, k, v, mask, kpm, dropout_p);
  check_same(grad_out, "grad_out", q, "query");
  check_same(out, "out", q, "query");
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.scalar_type() == acc && lse.dim() == 3 && lse.size(0) == g.B && lse.size(1) == g.H &&
                  lse.size(2) == g.Lq,
              "lse must be (B, H, Lq) in ", acc, ", got ", lse.sizes(), " ", lse.scalar_type());
  return g;
}

}  // namespace fastnn::attention
