// Scaled dot-product attention on CUDA, forward and backward: a deliberately simple flash-style kernel (correct by
// construction; the fast GPU path is the Triton one). Tiles of 32 keys (or queries) are staged in shared memory
// in the accumulation type; each warp owns one row and each lane one element of the tile, so a score is one
// lane's dot product and the softmax statistics are warp shuffles. Rows of the tile are padded to D + 1 floats so
// the lanes' strided reads hit distinct banks. Accumulation is in float32 (float64 for float64 inputs).
//
//   forward  (warp = query row): online softmax over key tiles, out = acc / l, stats = (m, log l) (+inf, 0 if empty)
//   backward delta = rowsum(dO * O); dQ kernel (warp = query row) walks key tiles; dK/dV kernel (warp = key row)
//            walks query tiles. P = exp((S - m) - log l) is recomputed, dropout regenerated from the seed
//            (attention.h).
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "attention.h"

namespace fastnn::cuda {
namespace {

constexpr int kTile = 32;  // keys (forward, dQ) or queries (dK/dV) per shared-memory tile: one per lane
constexpr int kRows = 4;   // warps per block, one row each
constexpr int kMaxDPL = 8; // head-dim elements per lane: D, Dv <= 256

using attention::Params;

template <typename A> __device__ __forceinline__ A warp_max(A x) {
  for (int o = 16; o > 0; o >>= 1) x = max(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
template <typename A> __device__ __forceinline__ A warp_sum(A x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float dexp(float x) { return __expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }

// Score of query i and key j given their dot product: scaled, masked; -inf when the pair is masked out.
template <typename A>
__device__ __forceinline__ A score(const Params<A>& p, int64_t b, int64_t h, int64_t i, int64_t j, A dot) {
  const A ninf = -A(INFINITY);
  if (i >= p.Lq || j >= p.Lk) return ninf;
  if (p.causal && j > i) return ninf;
  if (p.kpm && p.kpm[b * p.Lk + j]) return ninf;
  A s = dot * p.scale;
  if (p.mask) {  // a -inf entry masks the key whatever its score (an overflowed +inf would give NaN)
    const A m = p.mask[b * p.smb + h * p.smh + i * p.smm + j * p.smn];
    s = m == ninf ? ninf : s + m;
  }
  return s;
}

// rows [r0, r0 + kTile) of a (L, D) matrix into a padded shared tile (zeros past L).
template <typename T, typename A>
__device__ void load_tile(A* tile, const T* src, int64_t r0, int64_t L, int64_t D) {  // rows D + 1 apart
  const int64_t ld = D + 1;
  for (int64_t x = threadIdx.x; x < kTile * D; x += blockDim.x) {
    const int64_t r = x / D, d = x % D;
    tile[r * ld + d] = r0 + r < L ? static_cast<A>(src[(r0 + r) * D + d]) : A(0);
  }
}

// One row (length D) into shared memory, by one warp.
template <typename T, typename A> __device__ void load_row(A* dst, const T* src, bool valid, int64_t D) {
  for (int64_t d = threadIdx.x % 32; d < D; d += 32) dst[d] = valid ? static_cast<A>(src[d]) : A(0);
}

template <typename A> __device__ __forceinline__ A dot_row(const A* a, const A* b, int64_t D) {
  A s = 0;
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

// acc[t] (head-dim element lane + 32 t of this lane's row) += sum over the tile's rows r of w_r * tile[r][d], where
// lane r holds w_r: the product of a warp's weights with a staged tile of width W (rows W + 1 apart).
template <typename A>
__device__ __forceinline__ void add_weighted_rows(A (&acc)[kMaxDPL], A w_lane, const A* tile, int64_t W, int lane) {
  for (int r = 0; r < kTile; ++r) {
    const A w = __shfl_sync(0xffffffffu, w_lane, r);
    const A* row = tile + r * (W + 1);
    for (int t = 0; t < kMaxDPL; ++t) {
      const int64_t d = lane + 32 * t;
      if (d < W) acc[t] += w * row[d];
    }
  }
}

// Tiles are staged with rows of the widest head dim + 1 floats; a tile of width W (D or Dv) has rows W + 1 apart.
template <typename T, typename A>
__global__ void attn_fwd_kernel(Params<A> p, const T* q, const T* k, const T* v, T* o, A* stats) {
  extern __shared__ unsigned char smem_raw[];
  A* tile = reinterpret_cast<A*>(smem_raw);
  A* qs = tile + kTile * (max(p.D, p.Dv) + 1);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.y, b = bh / p.H, h = bh % p.H, hk = h / p.group();
  const int64_t i0 = int64_t(blockIdx.x) * kRows, i = i0 + warp, D = p.D, Dv = p.Dv;
  const T *Q = q + b * p.qsb + h * p.qsh, *K = k + b * p.ksb + hk * p.ksh, *V = v + b * p.vsb + hk * p.vsh;
  A* qrow = qs + warp * D;
  load_row(qrow, Q + i * D, i < p.Lq, D);
  A acc[kMaxDPL];
  for (int t = 0; t < kMaxDPL; ++t) acc[t] = 0;
  A m = -A(INFINITY), l = 0;
  const int64_t kend = p.causal ? min(p.Lk, i0 + kRows) : p.Lk;
  for (int64_t j0 = 0; j0 < kend; j0 += kTile) {
    __syncthreads();
    load_tile(tile, K, j0, p.Lk, D);
    __syncthreads();
    const int64_t j = j0 + lane;
    const A s = score(p, b, h, i, j, dot_row(qrow, tile + lane * (D + 1), D));
    const A mnew = max(m, warp_max(s));
    const A msafe = mnew == -A(INFINITY) ? A(0) : mnew;
    const A alpha = dexp(m - msafe);
    A pj = dexp(s - msafe);
    l = l * alpha + warp_sum(pj);
    m = mnew;
    if (p.dropout) pj = attention::dropout_keep(p.seed, bh * p.Lq + i, j, p.thresh) ? pj * p.drop_scale : A(0);
    __syncthreads();
    load_tile(tile, V, j0, p.Lk, Dv);
    __syncthreads();
    for (int t = 0; t < kMaxDPL; ++t) acc[t] *= alpha;
    add_weighted_rows(acc, pj, tile, Dv, lane);
  }
  if (i < p.Lq) {
    const bool empty = l == A(0);
    const A inv = empty ? A(0) : A(1) / l;
    for (int t = 0; t < kMaxDPL; ++t) {
      const int64_t d = lane + 32 * t;
      // Every key masked: zeros, even where a value is inf/NaN (acc = 0 * inf would be NaN).
      if (d < Dv) o[(bh * p.Lq + i) * Dv + d] = static_cast<T>(empty ? A(0) : acc[t] * inv);
    }
    if (lane == 0) {  // m and log l apart: m + log l would lose log l to ulp(m) at large scores
      stats[bh * p.Lq + i] = empty ? A(INFINITY) : m;
      stats[p.query_rows() + bh * p.Lq + i] = empty ? A(0) : log(l);
    }
  }
}

template <typename T, typename A>
__global__ void attn_delta_kernel(int64_t rows, int64_t D, const T* dO, const T* o, A* delta) {
  const int64_t r = int64_t(blockIdx.x) * kRows + threadIdx.x / 32;
  if (r >= rows) return;
  A s = 0;
  for (int64_t d = threadIdx.x % 32; d < D; d += 32) s += static_cast<A>(dO[r * D + d]) * static_cast<A>(o[r * D + d]);
  s = warp_sum(s);
  if (threadIdx.x % 32 == 0) delta[r] = s;
}

template <typename T, typename A>
__global__ void attn_bwd_dq_kernel(Params<A> p, const T* q, const T* k, const T* v, const T* dO, const A* stats,
                                   const A* delta, T* dq) {
  extern __shared__ unsigned char smem_raw[];
  A* tile = reinterpret_cast<A*>(smem_raw);
  A* qs = tile + kTile * (max(p.D, p.Dv) + 1);
  A* dos = qs + kRows * p.D;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.y, b = bh / p.H, h = bh % p.H, hk = h / p.group();
  const int64_t i0 = int64_t(blockIdx.x) * kRows, i = i0 + warp, D = p.D, Dv = p.Dv;
  const T *Q = q + b * p.qsb + h * p.qsh, *K = k + b * p.ksb + hk * p.ksh, *V = v + b * p.vsb + hk * p.vsh,
          *DO = dO + bh * p.Lq * Dv;
  A *qrow = qs + warp * D, *dorow = dos + warp * Dv;
  load_row(qrow, Q + i * D, i < p.Lq, D);
  load_row(dorow, DO + i * Dv, i < p.Lq, Dv);
  const A mi = i < p.Lq ? stats[bh * p.Lq + i] : A(INFINITY);
  const A li = i < p.Lq ? stats[p.query_rows() + bh * p.Lq + i] : A(0);
  const A di = i < p.Lq ? delta[bh * p.Lq + i] : A(0);
  // the mask gradient's row of this query (atomics: other heads / batches may share it)
  A* dmrow = p.dmask ? p.dmask + b * p.dmb + h * p.dmh + i * p.dmm : nullptr;
  A acc[kMaxDPL];
  for (int t = 0; t < kMaxDPL; ++t) acc[t] = 0;
  const int64_t kend = p.causal ? min(p.Lk, i0 + kRows) : p.Lk;
  for (int64_t j0 = 0; j0 < kend; j0 += kTile) {
    const int64_t j = j0 + lane;
    __syncthreads();
    load_tile(tile, K, j0, p.Lk, D);
    __syncthreads();
    const A pj = dexp((score(p, b, h, i, j, dot_row(qrow, tile + lane * (D + 1), D)) - mi) - li);
    __syncthreads();
    load_tile(tile, V, j0, p.Lk, Dv);
    __syncthreads();
    A dp = dot_row(dorow, tile + lane * (Dv + 1), Dv);
    if (p.dropout) dp = attention::dropout_keep(p.seed, bh * p.Lq + i, j, p.thresh) ? dp * p.drop_scale : A(0);
    const A ds = mi == A(INFINITY) ? A(0) : pj * (dp - di);  // every key masked: 0 (0 * an overflowed dP is NaN)
    if (dmrow) {  // d(mask) = dS, summed over the keys first where the mask broadcasts over them
      if (p.dmn == 0) {
        const A sum = warp_sum(ds);
        if (lane == 0 && i < p.Lq) atomicAdd(dmrow, sum);
      } else if (i < p.Lq && j < p.Lk) {
        atomicAdd(dmrow + j * p.dmn, ds);
      }
    }
    __syncthreads();
    load_tile(tile, K, j0, p.Lk, D);
    __syncthreads();
    add_weighted_rows(acc, ds, tile, D, lane);
  }
  if (i < p.Lq) {
    for (int t = 0; t < kMaxDPL; ++t) {
      const int64_t d = lane + 32 * t;
      if (d < D) dq[(bh * p.Lq + i) * D + d] = static_cast<T>(acc[t] * p.scale);
    }
  }
}

// One block per (kRows keys, batch * kv head): it walks the query heads that share the kv head, so dK / dV sum
// over the group without atomics.
template <typename T, typename A>
__global__ void attn_bwd_dkdv_kernel(Params<A> p, const T* q, const T* k, const T* v, const T* dO, const A* stats,
                                     const A* delta, T* dk, T* dv) {
  extern __shared__ unsigned char smem_raw[];
  A* tile = reinterpret_cast<A*>(smem_raw);
  A* ks = tile + kTile * (max(p.D, p.Dv) + 1);
  A* vs = ks + kRows * p.D;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bhk = blockIdx.y, b = bhk / p.Hk, hk = bhk % p.Hk, G = p.group();
  const int64_t j0 = int64_t(blockIdx.x) * kRows, j = j0 + warp, D = p.D, Dv = p.Dv;
  const T *K = k + b * p.ksb + hk * p.ksh, *V = v + b * p.vsb + hk * p.vsh;
  A *krow = ks + warp * D, *vrow = vs + warp * Dv;
  load_row(krow, K + j * D, j < p.Lk, D);
  load_row(vrow, V + j * Dv, j < p.Lk, Dv);
  A gk[kMaxDPL], gv[kMaxDPL];
  for (int t = 0; t < kMaxDPL; ++t) gk[t] = gv[t] = 0;
  for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
    const int64_t bh = b * p.H + h;
    const T *Q = q + b * p.qsb + h * p.qsh, *DO = dO + bh * p.Lq * Dv;
    // Causal: queries before the block's first key see none of it.
    for (int64_t i0 = p.causal ? (j0 / kTile) * kTile : 0; i0 < p.Lq; i0 += kTile) {
      const int64_t i = i0 + lane;
      const A mi = i < p.Lq ? stats[bh * p.Lq + i] : A(INFINITY);
      const A li = i < p.Lq ? stats[p.query_rows() + bh * p.Lq + i] : A(0);
      const A di = i < p.Lq ? delta[bh * p.Lq + i] : A(0);
      __syncthreads();
      load_tile(tile, Q, i0, p.Lq, D);
      __syncthreads();
      const A pi = dexp((score(p, b, h, i, j, dot_row(tile + lane * (D + 1), krow, D)) - mi) - li);
      __syncthreads();
      load_tile(tile, DO, i0, p.Lq, Dv);
      __syncthreads();
      A dp = dot_row(tile + lane * (Dv + 1), vrow, Dv), pd = pi;
      if (p.dropout) {
        const bool keep = attention::dropout_keep(p.seed, bh * p.Lq + i, j, p.thresh);
        dp = keep ? dp * p.drop_scale : A(0);
        pd = keep ? pi * p.drop_scale : A(0);
      }
      const A ds = mi == A(INFINITY) ? A(0) : pi * (dp - di);  // every key masked: 0 (0 * an overflowed dP is NaN)
      add_weighted_rows(gv, pd, tile, Dv, lane);  // dV += Pd^T dO while dO is staged
      __syncthreads();
      load_tile(tile, Q, i0, p.Lq, D);
      __syncthreads();
      add_weighted_rows(gk, ds, tile, D, lane);
    }
  }
  if (j < p.Lk) {
    for (int t = 0; t < kMaxDPL; ++t) {
      const int64_t d = lane + 32 * t;
      if (d < D) dk[(bhk * p.Lk + j) * D + d] = static_cast<T>(gk[t] * p.scale);
      if (d < Dv) dv[(bhk * p.Lk + j) * Dv + d] = static_cast<T>(gv[t]);
    }
  }
}

// The staging tile (rows of the widest head dim + 1) and `row_dims` = the summed widths of the rows each warp
// keeps (q: D; q and dO: D + Dv; k and v: D + Dv).
template <typename A> size_t smem_bytes(int64_t D, int64_t Dv, int64_t row_dims) {
  return sizeof(A) * (kTile * (std::max(D, Dv) + 1) + kRows * row_dims);
}

// Shared memory above 48 KiB needs an opt-in; at D = 256 in float64 the tiles reach ~75 KiB.
template <typename K> void allow_smem(K kernel, size_t bytes) {
  if (bytes > 48 * 1024) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& query, const at::Tensor& key,
                                                      const at::Tensor& value,
                                                      const std::optional<at::Tensor>& attn_mask,
                                                      const std::optional<at::Tensor>& key_padding_mask,
                                                      double dropout_p, bool is_causal, double scale, int64_t seed) {
  const auto g = attention::check_args(query, key, value, attn_mask, key_padding_mask, dropout_p);
  const c10::cuda::CUDAGuard guard(query.device());
  const auto dt = query.scalar_type();
  const at::Tensor q = attention::kernel_operand(query, dt), k = attention::kernel_operand(key, dt),
                   v = attention::kernel_operand(value, dt);
  const auto kpm = attention::contiguous_kpm(key_padding_mask);
  const auto acc = attention::acc_type(dt);
  at::Tensor out = at::empty({g.B, g.H, g.Lq, g.Dv}, q.options());
  at::Tensor stats = at::empty({2, g.B, g.H, g.Lq}, q.options().dtype(acc));
  if (g.Lk == 0) {
    out.zero_();
    attention::fill_no_keys_stats(stats);
    return {out, stats};
  }
  if (out.numel() == 0) return {out, stats};
  const dim3 grid((g.Lq + kRows - 1) / kRows, g.B * g.H);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_fwd_cuda", [&] {
    using A = at::acc_type<scalar_t, true>;
    const auto p = attention::make_params<A>(g, q, k, v, attn_mask, kpm, dropout_p, is_causal, scale, seed);
    const size_t bytes = smem_bytes<A>(g.D, g.Dv, g.D);
    allow_smem(attn_fwd_kernel<scalar_t, A>, bytes);
    attn_fwd_kernel<scalar_t, A><<<grid, kRows * 32, bytes, stream>>>(
        p, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), stats.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& stats, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& key_padding_mask, double dropout_p, bool is_causal, double scale,
    int64_t seed, bool mask_grad) {
  const auto g = attention::check_bwd_args(grad_out, query, key, value, out, stats, attn_mask, key_padding_mask,
                                           dropout_p, mask_grad);
  const auto dt = query.scalar_type();
  const auto acc = attention::acc_type(dt);
  const c10::cuda::CUDAGuard guard(query.device());
  const at::Tensor q = attention::kernel_operand(query, dt), k = attention::kernel_operand(key, dt),
                   v = attention::kernel_operand(value, dt), o = out.contiguous(), dO = grad_out.contiguous(),
                   row_stats = stats.contiguous();
  const auto kpm = attention::contiguous_kpm(key_padding_mask);
  at::Tensor dq = at::empty({g.B, g.H, g.Lq, g.D}, q.options()), dk = at::empty({g.B, g.Hk, g.Lk, g.D}, q.options()),
             dv = at::empty({g.B, g.Hk, g.Lk, g.Dv}, q.options());
  at::Tensor dmask = attention::mask_grad_buffer(attn_mask, mask_grad, q.options().dtype(acc));
  if (dq.numel() == 0 || g.Lk == 0) return {dq.zero_(), dk.zero_(), dv.zero_(), dmask};
  at::Tensor delta = at::empty({g.B, g.H, g.Lq}, q.options().dtype(acc));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_bwd_cuda", [&] {
    using A = at::acc_type<scalar_t, true>;
    const auto p = attention::make_params<A>(g, q, k, v, attn_mask, kpm, dropout_p, is_causal, scale, seed, &dmask);
    const int64_t rows = g.query_rows();
    attn_delta_kernel<scalar_t, A><<<(rows + kRows - 1) / kRows, kRows * 32, 0, stream>>>(
        rows, g.Dv, dO.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(), delta.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const size_t bytes = smem_bytes<A>(g.D, g.Dv, g.D + g.Dv);
    allow_smem(attn_bwd_dq_kernel<scalar_t, A>, bytes);
    allow_smem(attn_bwd_dkdv_kernel<scalar_t, A>, bytes);
    attn_bwd_dq_kernel<scalar_t, A><<<dim3((g.Lq + kRows - 1) / kRows, g.B * g.H), kRows * 32, bytes, stream>>>(
        p, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
        dO.const_data_ptr<scalar_t>(), row_stats.const_data_ptr<A>(), delta.const_data_ptr<A>(),
        dq.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    attn_bwd_dkdv_kernel<scalar_t, A><<<dim3((g.Lk + kRows - 1) / kRows, g.B * g.Hk), kRows * 32, bytes, stream>>>(
        p, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
        dO.const_data_ptr<scalar_t>(), row_stats.const_data_ptr<A>(), delta.const_data_ptr<A>(),
        dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dq, dk, dv, dmask};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnn, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}

}  // namespace fastnn::cuda
