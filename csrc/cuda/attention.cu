// Scaled dot-product attention on CUDA, forward and backward.
//
// float16 / bfloat16 on sm_80+: FlashAttention-2 kernels on tensor cores (attn_fwd_tc_kernel, attn_bwd_tc_kernel,
// each with its comment block below; the PTX primitives are in mma.cuh); the backward for padded head
// dims up to 128. Everything else - float32 and float64, half types on older devices, where the device lacks a
// tile's shared memory, and the backward at head dims above 128 - runs on deliberately simple flash-style kernels
// (correct by construction): tiles of 32 keys (or queries) staged in shared memory in the accumulation type; each
// warp owns one row and each lane one element of the tile, so a score is one lane's dot product and the softmax
// statistics are warp shuffles. Rows of the tile are padded to D + 1 floats so the lanes' strided reads hit
// distinct banks. Accumulation is in float32 (float64 for float64 inputs). Both forwards write the same row
// statistics, which either backward reads.
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
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

#include "attention.h"
#include "mma.cuh"

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

// Launch grids are 1-d: block x is tile x % tiles of the (batch, head) pair x / tiles, in 64-bit arithmetic.
// gridDim.x takes 2^31 - 1 blocks where gridDim.y takes 65,535, which B * H alone can pass.
struct Tile {
  int64_t bh, tile;
};
__device__ __forceinline__ Tile block_tile(int64_t tiles) {
  const int64_t x = blockIdx.x;
  return {x / tiles, x % tiles};
}
inline dim3 tile_grid(int64_t tiles, int64_t pairs) {
  const int64_t n = tiles * pairs;
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), "attention: ", n, " thread blocks exceed CUDA's grid limit");
  return dim3(static_cast<unsigned>(n));
}

// Tiles are staged with rows of the widest head dim + 1 floats; a tile of width W (D or Dv) has rows W + 1 apart.
template <typename T, typename A>
__global__ void attn_fwd_kernel(Params<A> p, const T* q, const T* k, const T* v, T* o, A* stats, int64_t tiles) {
  extern __shared__ unsigned char smem_raw[];
  A* tile = reinterpret_cast<A*>(smem_raw);
  A* qs = tile + kTile * (max(p.D, p.Dv) + 1);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Tile blk = block_tile(tiles);
  const int64_t bh = blk.bh, b = bh / p.H, h = bh % p.H, hk = h / p.group();
  const int64_t i0 = blk.tile * kRows, i = i0 + warp, D = p.D, Dv = p.Dv;
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
                                   const A* delta, T* dq, int64_t tiles) {
  extern __shared__ unsigned char smem_raw[];
  A* tile = reinterpret_cast<A*>(smem_raw);
  A* qs = tile + kTile * (max(p.D, p.Dv) + 1);
  A* dos = qs + kRows * p.D;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Tile blk = block_tile(tiles);
  const int64_t bh = blk.bh, b = bh / p.H, h = bh % p.H, hk = h / p.group();
  const int64_t i0 = blk.tile * kRows, i = i0 + warp, D = p.D, Dv = p.Dv;
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
                                     const A* delta, T* dk, T* dv, int64_t tiles) {
  extern __shared__ unsigned char smem_raw[];
  A* tile = reinterpret_cast<A*>(smem_raw);
  A* ks = tile + kTile * (max(p.D, p.Dv) + 1);
  A* vs = ks + kRows * p.D;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Tile blk = block_tile(tiles);
  const int64_t bhk = blk.bh, b = bhk / p.Hk, hk = bhk % p.Hk, G = p.group();
  const int64_t j0 = blk.tile * kRows, j = j0 + warp, D = p.D, Dv = p.Dv;
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

// ---- Forward on tensor cores: float16 / bfloat16 on sm_80+ (the FlashAttention-2 algorithm) ----------------------
// A block of 4 warps owns kM = 64 query rows of one (batch, head), 16 rows per warp, and walks the key tiles of kN
// keys. Q's tile is staged once in shared memory and, for head dims up to 128, moved into registers as mma A
// fragments (at 256 it is re-read with ldmatrix: A fragments and the 16 x 256 accumulator would not fit in
// registers together). K and V tiles stream through two shared-memory stages with cp.async: tile j + 1 is in
// flight while tile j is multiplied. Per tile and warp:
//   S (16 x kN, float32 C fragments) = Q K^T         ldmatrix of K rows = B fragments (K^T is "col" for mma)
//   s = S * scale, then the masks by each element's (row, key) - the C layout gives thread t rows t/4 and t/4 + 8,
//       keys 2(t%4) + {0, 1} of every 8-key fragment - through score(), the simple kernel's rule, on edge tiles
//   online softmax in registers: m = running row max (natural units, as the stats plane holds it; the four
//       threads of a row agree through two xor shuffles), p = exp2(s log2(e) - m log2(e)) (one FFMA + ex2),
//       l and O rescaled by exp2((m_old - m) log2(e)); l summed per thread, reduced across the row at the end
//   dropout: p of a dropped (row, key) zeroed after l took it (attention::dropout_keep, the other backends' hash)
//   O (16 x HD, float32) += P V                      P's C fragments repacked as A fragments (two 8-key halves
//                                                   make one k = 16 chunk), V rows by ldmatrix.trans = B fragments
// Fully masked rows never see a finite score: their max stays -inf, exponents use 0 in its place (no inf - inf),
// every p is 0, l = 0 and the row is written as zeros with stats (+inf, 0), as the simple kernel does.
// Shared-memory rows are HD + 8 elements: a row shift of 16 bytes modulo 128 puts the 8 row addresses of each
// ldmatrix phase (and the 16-byte cp.async stores) in distinct banks for every HD that is a multiple of 32.
template <int HD> struct TcTile {
  static constexpr int kWarps = 4, kThreads = 32 * kWarps;
  static constexpr int kM = 16 * kWarps;
  static constexpr int kN = HD <= 128 ? 64 : 32;  // at 256, a 64-key S tile would spill
  static constexpr int kLd = HD + 8;
  static constexpr bool kQInRegs = HD <= 128;
  // 2 stages of (K, V), and Q's tile: in stage 1's K while it is moved to registers (kN = kM then), apart otherwise
  static constexpr size_t kSmem = sizeof(uint16_t) * kLd * (4 * kN + (kQInRegs ? 0 : kM));
  static_assert(!kQInRegs || kN == kM, "Q's tile is staged in a K tile");
};

// Rows [r0, r0 + R) of a row-major (L, W) matrix (rows W apart) into shared memory rows HD + 8 apart, columns
// [0, HD): zeros past L and past W. vec: 16-byte cp.async (W % 8 == 0 and 16-byte aligned rows, the caller
// checks); otherwise plain 2-byte loads, stored before the caller's __syncthreads like the asynchronous ones.
template <int R, int HD>
__device__ __forceinline__ void tc_load_tile(uint16_t* dst, const uint16_t* src, int64_t r0, int64_t L, int64_t W,
                                             bool vec) {
  using C = TcTile<HD>;
  constexpr int kChunks = HD / 8;  // 16-byte chunks per row
  for (int x = threadIdx.x; x < R * kChunks; x += C::kThreads) {
    const int r = x / kChunks, c = (x % kChunks) * 8;
    uint16_t* d = dst + r * C::kLd + c;
    const int64_t row = r0 + r;
    if (vec) {
      const bool in = row < L && c < W;
      mma::cp_async16(d, in ? src + row * W + c : src, in ? 16 : 0);
    } else {
      uint16_t e[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) e[u] = row < L && c + u < W ? src[row * W + c + u] : uint16_t(0);
      uint4 w;
      w.x = e[0] | uint32_t(e[1]) << 16, w.y = e[2] | uint32_t(e[3]) << 16;
      w.z = e[4] | uint32_t(e[5]) << 16, w.w = e[6] | uint32_t(e[7]) << 16;
      *reinterpret_cast<uint4*>(d) = w;
    }
  }
}

// Grid: 1-d, `tiles` = ceil(Lq / kM) query tiles per (batch, query head), the last tiles first (under a causal mask
// they have the most keys to walk). q, k, v: the operands' 16-bit elements (T says how to read them).
template <typename T, int HD>
__global__ void __launch_bounds__(TcTile<HD>::kThreads) attn_fwd_tc_kernel(Params<float> p, const uint16_t* q,
                                                                           const uint16_t* k, const uint16_t* v,
                                                                           T* o, float* stats, int64_t tiles,
                                                                           bool vec) {
  using C = TcTile<HD>;
  constexpr int kN = C::kN, kLd = C::kLd;
  constexpr float kLog2e = 1.4426950408889634f;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* skv = reinterpret_cast<uint16_t*>(smem_raw);  // stage s: K at skv + 2 s kN kLd, V kN kLd after it
  uint16_t* sq = skv + (C::kQInRegs ? 2 : 4) * kN * kLd;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c4 = lane % 4;
  const Tile blk = block_tile(tiles);
  const int64_t bh = blk.bh, b = bh / p.H, h = bh % p.H, hk = h / p.group();
  const int64_t m0 = (tiles - 1 - blk.tile) * C::kM;
  const uint16_t *Q = q + b * p.qsb + h * p.qsh, *K = k + b * p.ksb + hk * p.ksh, *V = v + b * p.vsb + hk * p.vsh;
  const int64_t kend = p.causal ? min(p.Lk, m0 + C::kM) : p.Lk;  // >= 1: the host returns early when Lk = 0
  const int64_t ntiles = (kend + kN - 1) / kN;
  auto load_kv = [&](int64_t j) {
    uint16_t* st = skv + (j & 1) * 2 * kN * kLd;
    tc_load_tile<kN, HD>(st, K, j * kN, p.Lk, p.D, vec);
    tc_load_tile<kN, HD>(st + kN * kLd, V, j * kN, p.Lk, p.Dv, vec);
  };
  tc_load_tile<C::kM, HD>(sq, Q, m0, p.Lq, p.D, vec);
  load_kv(0);
  mma::cp_async_commit();

  // ldmatrix.x4 addresses: lane l points at row l % 16, column block l / 16 of a 16 x 16 A tile (matrices 0-3 =
  // a0-a3); for B tiles (two 8-wide n blocks of one 16-deep k chunk), K: row (l / 16) * 8 + l % 8, k block
  // (l / 8) % 2 gives b0, b1 of n block 0 then of n block 1; V (.trans): key (l / 8) % 2 * 8 + l % 8, dim block l / 16.
  const uint16_t* qa = sq + (warp * 16 + lane % 16) * kLd + (lane / 16) * 8;
  const int kb_off = ((lane / 16) * 8 + lane % 8) * kLd + ((lane / 8) % 2) * 8;
  const int vb_off = (((lane / 8) % 2) * 8 + lane % 8) * kLd + (lane / 16) * 8;
  uint32_t qf[C::kQInRegs ? HD / 16 : 1][4];
  float acc[HD / 8][4];
#pragma unroll
  for (int d = 0; d < HD / 8; ++d) acc[d][0] = acc[d][1] = acc[d][2] = acc[d][3] = 0.f;
  float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.f, 0.f};
  const int64_t row0 = m0 + warp * 16 + g;  // this thread's rows: row0, row0 + 8
  for (int64_t j = 0; j < ntiles; ++j) {
    if (j + 1 < ntiles && !(C::kQInRegs && j == 0)) {
      load_kv(j + 1);  // into the other stage, released by the __syncthreads ending the previous iteration
      mma::cp_async_commit();
      mma::cp_async_wait<1>();  // all but the group just committed: tile j has landed
    } else {
      mma::cp_async_wait<0>();
    }
    __syncthreads();
    if constexpr (C::kQInRegs) {
      if (j == 0) {  // Q (staged in stage 1) to registers, then stage 1 takes tile 1
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) mma::ldmatrix_x4(qf[kk], qa + kk * 16);
        __syncthreads();
        if (ntiles > 1) {
          load_kv(1);
          mma::cp_async_commit();
        }
      }
    }
    const uint16_t* sk = skv + (j & 1) * 2 * kN * kLd;
    const uint16_t* sv = sk + kN * kLd;
    float s[kN / 8][4];
#pragma unroll
    for (int n = 0; n < kN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      uint32_t a[4];
      if constexpr (C::kQInRegs) {
#pragma unroll
        for (int u = 0; u < 4; ++u) a[u] = qf[kk][u];
      } else {
        mma::ldmatrix_x4(a, qa + kk * 16);
      }
#pragma unroll
      for (int n2 = 0; n2 < kN / 16; ++n2) {
        uint32_t bb[4];
        mma::ldmatrix_x4(bb, sk + n2 * 16 * kLd + kk * 16 + kb_off);
        mma::mma_16816<T>(s[2 * n2], a, bb[0], bb[1]);
        mma::mma_16816<T>(s[2 * n2 + 1], a, bb[2], bb[3]);
      }
    }
    const int64_t n0 = j * kN;
    // Interior tiles (all keys in range, none past the first row's causal limit, no mask) only scale.
    const bool edge = n0 + kN > p.Lk || (p.causal && n0 + kN - 1 > m0) || p.kpm || p.mask;
#pragma unroll
    for (int n = 0; n < kN / 8; ++n)
#pragma unroll
      for (int r = 0; r < 4; ++r)
        s[n][r] = edge ? score(p, b, h, row0 + (r / 2) * 8, n0 + n * 8 + 2 * c4 + (r % 2), s[n][r])
                       : s[n][r] * p.scale;
    float mx[2] = {mrow[0], mrow[1]};
#pragma unroll
    for (int n = 0; n < kN / 8; ++n) {
      mx[0] = fmaxf(mx[0], fmaxf(s[n][0], s[n][1]));
      mx[1] = fmaxf(mx[1], fmaxf(s[n][2], s[n][3]));
    }
    float neg_m[2];  // -m log2(e), m = 0 while the row has no finite score
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float msafe = mx[r] == -INFINITY ? 0.f : mx[r];
      const float alpha = exp2f((mrow[r] - msafe) * kLog2e);  // 0 while mrow is -inf
      mrow[r] = mx[r];
      lrow[r] *= alpha;
      neg_m[r] = -msafe * kLog2e;
#pragma unroll
      for (int d = 0; d < HD / 8; ++d) acc[d][2 * r] *= alpha, acc[d][2 * r + 1] *= alpha;
    }
#pragma unroll
    for (int n = 0; n < kN / 8; ++n)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        s[n][r] = exp2f(fmaf(s[n][r], kLog2e, neg_m[r / 2]));
        lrow[r / 2] += s[n][r];
      }
    if (p.dropout) {
#pragma unroll
      for (int n = 0; n < kN / 8; ++n)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const bool keep = attention::dropout_keep(p.seed, bh * p.Lq + row0 + (r / 2) * 8,
                                                    n0 + n * 8 + 2 * c4 + (r % 2), p.thresh);
          s[n][r] = keep ? s[n][r] * p.drop_scale : 0.f;
        }
    }
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
      const uint32_t a[4] = {mma::pack2<T>(s[2 * kk][0], s[2 * kk][1]), mma::pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                             mma::pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             mma::pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int d2 = 0; d2 < HD / 16; ++d2) {
        uint32_t bb[4];
        mma::ldmatrix_x4_trans(bb, sv + kk * 16 * kLd + d2 * 16 + vb_off);
        mma::mma_16816<T>(acc[2 * d2], a, bb[0], bb[1]);
        mma::mma_16816<T>(acc[2 * d2 + 1], a, bb[2], bb[3]);
      }
    }
    __syncthreads();  // this stage is refilled by the next iteration's cp.async
  }
  const int64_t Dv = p.Dv;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = lrow[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int64_t i = row0 + r * 8;
    if (i >= p.Lq) continue;
    const bool empty = l == 0.f;
    const float inv = empty ? 0.f : 1.f / l;
    T* orow = o + (bh * p.Lq + i) * Dv;
#pragma unroll
    for (int dt = 0; dt < HD / 8; ++dt) {
      const int64_t d = dt * 8 + 2 * c4;
      // Every key masked: zeros, even where a value is inf/NaN (acc = 0 * inf would be NaN).
      const float x0 = empty ? 0.f : acc[dt][2 * r] * inv, x1 = empty ? 0.f : acc[dt][2 * r + 1] * inv;
      if (d + 1 < Dv && Dv % 2 == 0) {
        *reinterpret_cast<uint32_t*>(orow + d) = mma::pack2<T>(x0, x1);
      } else {
        if (d < Dv) orow[d] = static_cast<T>(x0);
        if (d + 1 < Dv) orow[d + 1] = static_cast<T>(x1);
      }
    }
    if (c4 == 0) {  // m and log l apart, as the simple kernel writes them
      stats[bh * p.Lq + i] = empty ? INFINITY : mrow[r];
      stats[p.query_rows() + bh * p.Lq + i] = empty ? 0.f : logf(l);
    }
  }
}

// ---- Backward on tensor cores: float16 / bfloat16 on sm_80+, head dims up to 128 --------------------------------
// A block of 4 warps owns kN = 64 keys of one (batch, kv head), 16 per warp, keeps dK and dV for them in registers
// and walks the query tiles (kMq queries) of every query head of its group, with the softmax recomputed from the
// forward's row statistics. Q, dO and the tile's statistics stream through two shared-memory stages (cp.async);
// K and V stay staged. Per query tile and warp, in the transposed orientation (rows = the warp's 16 keys, so that
// dK and dV accumulate in C fragments):
//   S^T = K Q^T, dP^T = V dO^T            A: ldmatrix of the warp's K / V rows; B: ldmatrix of Q / dO rows
//   P^T = exp2(s log2(e) - (m + log l) log2(e)) per query column (the forward's stats, kept apart as it wrote
//       them), masks through score() on edge tiles; dropout from the same hash: Pd = keep ? P / (1 - p) : 0 and
//       dP likewise
//   dV += Pd^T dO, dS^T = P^T (dP^T - delta), dK += dS^T Q
//                                          A: the C fragments repacked (as the forward's P); B: ldmatrix.trans
//   dQ += dS K: dS^T goes to shared memory; the tile's (query rows x head dim) products are split among the warps,
//       A by ldmatrix.trans of dS^T, B by ldmatrix.trans of K, and added to a float32 dQ with atomics (other key
//       blocks add to the same rows); the host scales and rounds it.
//   d(mask) (a learned float mask) += dS by atomics at the mask's broadcast strides.
// Rows past Lq carry stats (+inf, 0) and delta 0 in the staged tile, so their P and dS are 0.
template <int HD> struct TcBwdTile {
  static constexpr int kThreads = 128, kN = 64;
  static constexpr int kMq = HD <= 64 ? 64 : 32;  // queries per tile: S^T, dP^T, dK and dV fit in registers
  static constexpr int kLd = HD + 8, kLdS = kMq + 8;  // rows 16 bytes off a 128-byte period (see TcTile)
  static constexpr size_t kSmem =
      sizeof(uint16_t) * (2 * kN * kLd + 2 * 2 * kMq * kLd + kN * kLdS) + sizeof(float) * 2 * 3 * kMq;
};

template <typename T, int HD>
__global__ void __launch_bounds__(128) attn_bwd_tc_kernel(Params<float> p, const uint16_t* q, const uint16_t* k,
                                                          const uint16_t* v, const uint16_t* dO, const float* stats,
                                                          const float* delta, float* dq_acc, T* dk, T* dv,
                                                          int64_t tiles, bool vec) {
  using C = TcBwdTile<HD>;
  constexpr int kN = C::kN, kMq = C::kMq, kLd = C::kLd, kLdS = C::kLdS;
  constexpr float kLog2e = 1.4426950408889634f;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* sk = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sv = sk + kN * kLd;
  uint16_t* sstage = sv + kN * kLd;  // stage s: Q at sstage + 2 s kMq kLd, dO kMq kLd after it
  uint16_t* sds = sstage + 4 * kMq * kLd;
  float* sstat = reinterpret_cast<float*>(sds + kN * kLdS);  // stage s: m log2(e), log l log2(e), delta
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c4 = lane % 4;
  const Tile blk = block_tile(tiles);
  const int64_t bhk = blk.bh, b = bhk / p.Hk, hk = bhk % p.Hk, G = p.group();
  const int64_t j0 = blk.tile * kN;
  const uint16_t *K = k + b * p.ksb + hk * p.ksh, *V = v + b * p.vsb + hk * p.vsh;
  // Causal: queries before the block's first key see none of it.
  const int64_t i_start = p.causal ? (j0 / kMq) * kMq : 0;
  const int64_t per_head = i_start < p.Lq ? (p.Lq - i_start + kMq - 1) / kMq : 0, total = G * per_head;
  auto load_stage = [&](int64_t t) {
    const int64_t h = hk * G + t / per_head, i0 = i_start + (t % per_head) * kMq, bh = b * p.H + h;
    uint16_t* st = sstage + (t & 1) * 2 * kMq * kLd;
    tc_load_tile<kMq, HD>(st, q + b * p.qsb + h * p.qsh, i0, p.Lq, p.D, vec);
    tc_load_tile<kMq, HD>(st + kMq * kLd, dO + bh * p.Lq * p.Dv, i0, p.Lq, p.Dv, vec);
    float* ss = sstat + (t & 1) * 3 * kMq;
    for (int x = threadIdx.x; x < kMq; x += C::kThreads) {
      const int64_t i = i0 + x, r = bh * p.Lq + i;
      ss[x] = i < p.Lq ? stats[r] * kLog2e : INFINITY;
      ss[kMq + x] = i < p.Lq ? stats[p.query_rows() + r] * kLog2e : 0.f;
      ss[2 * kMq + x] = i < p.Lq ? delta[r] : 0.f;
    }
  };
  tc_load_tile<kN, HD>(sk, K, j0, p.Lk, p.D, vec);
  tc_load_tile<kN, HD>(sv, V, j0, p.Lk, p.Dv, vec);
  if (total > 0) load_stage(0);
  mma::cp_async_commit();

  // ldmatrix lane offsets as in the forward: A rows (this warp's keys), B rows (non-transposed), B rows (.trans)
  const int a_off = (warp * 16 + lane % 16) * kLd + (lane / 16) * 8;
  const int kb_off = ((lane / 16) * 8 + lane % 8) * kLd + ((lane / 8) % 2) * 8;
  const int vb_off = (((lane / 8) % 2) * 8 + lane % 8) * kLd + (lane / 16) * 8;
  float gk[HD / 8][4], gv[HD / 8][4];
#pragma unroll
  for (int d = 0; d < HD / 8; ++d)
#pragma unroll
    for (int u = 0; u < 4; ++u) gk[d][u] = gv[d][u] = 0.f;
  const int64_t jrow = j0 + warp * 16 + g;  // this thread's keys: jrow, jrow + 8
  for (int64_t t = 0; t < total; ++t) {
    if (t + 1 < total) {
      load_stage(t + 1);  // into the other stage, released by the __syncthreads ending the previous iteration
      mma::cp_async_commit();
      mma::cp_async_wait<1>();
    } else {
      mma::cp_async_wait<0>();
    }
    __syncthreads();
    const int64_t h = hk * G + t / per_head, i0 = i_start + (t % per_head) * kMq, bh = b * p.H + h;
    const uint16_t* sq = sstage + (t & 1) * 2 * kMq * kLd;
    const uint16_t* sdo = sq + kMq * kLd;
    const float* ss = sstat + (t & 1) * 3 * kMq;
    float s[kMq / 8][4], dp[kMq / 8][4];
#pragma unroll
    for (int n = 0; n < kMq / 8; ++n)
#pragma unroll
      for (int u = 0; u < 4; ++u) s[n][u] = dp[n][u] = 0.f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      uint32_t ak[4], av[4];
      mma::ldmatrix_x4(ak, sk + a_off + kk * 16);
      mma::ldmatrix_x4(av, sv + a_off + kk * 16);
#pragma unroll
      for (int n2 = 0; n2 < kMq / 16; ++n2) {
        uint32_t bq[4], bo[4];
        mma::ldmatrix_x4(bq, sq + n2 * 16 * kLd + kk * 16 + kb_off);
        mma::mma_16816<T>(s[2 * n2], ak, bq[0], bq[1]);
        mma::mma_16816<T>(s[2 * n2 + 1], ak, bq[2], bq[3]);
        mma::ldmatrix_x4(bo, sdo + n2 * 16 * kLd + kk * 16 + kb_off);
        mma::mma_16816<T>(dp[2 * n2], av, bo[0], bo[1]);
        mma::mma_16816<T>(dp[2 * n2 + 1], av, bo[2], bo[3]);
      }
    }
    const bool edge = i0 + kMq > p.Lq || j0 + kN > p.Lk || (p.causal && j0 + kN - 1 > i0) || p.kpm || p.mask;
    // s becomes P^T, dp becomes dS^T; pd (in s's place after dS is formed) the dropped-out P^T for dV.
    float pd[kMq / 8][4];
#pragma unroll
    for (int n = 0; n < kMq / 8; ++n)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int ci = n * 8 + 2 * c4 + (r % 2);
        const int64_t i = i0 + ci, j = jrow + (r / 2) * 8;
        const float x = edge ? score(p, b, h, i, j, s[n][r]) : s[n][r] * p.scale;
        const float pr = exp2f(fmaf(x, kLog2e, -ss[ci]) - ss[kMq + ci]);
        float dpr = dp[n][r], pdr = pr;
        if (p.dropout) {
          const bool keep = attention::dropout_keep(p.seed, bh * p.Lq + i, j, p.thresh);
          dpr = keep ? dpr * p.drop_scale : 0.f;
          pdr = keep ? pr * p.drop_scale : 0.f;
        }
        const float ds = pr * (dpr - ss[2 * kMq + ci]);
        if (p.dmask && i < p.Lq && j < p.Lk)
          atomicAdd(p.dmask + b * p.dmb + h * p.dmh + i * p.dmm + j * p.dmn, ds);
        pd[n][r] = pdr;
        dp[n][r] = ds;
      }
#pragma unroll
    for (int kk = 0; kk < kMq / 16; ++kk) {
      const uint32_t ap[4] = {mma::pack2<T>(pd[2 * kk][0], pd[2 * kk][1]), mma::pack2<T>(pd[2 * kk][2], pd[2 * kk][3]),
                              mma::pack2<T>(pd[2 * kk + 1][0], pd[2 * kk + 1][1]),
                              mma::pack2<T>(pd[2 * kk + 1][2], pd[2 * kk + 1][3])};
      const uint32_t as[4] = {mma::pack2<T>(dp[2 * kk][0], dp[2 * kk][1]), mma::pack2<T>(dp[2 * kk][2], dp[2 * kk][3]),
                              mma::pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                              mma::pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
      for (int d2 = 0; d2 < HD / 16; ++d2) {
        uint32_t bo[4], bq[4];
        mma::ldmatrix_x4_trans(bo, sdo + kk * 16 * kLd + d2 * 16 + vb_off);
        mma::mma_16816<T>(gv[2 * d2], ap, bo[0], bo[1]);
        mma::mma_16816<T>(gv[2 * d2 + 1], ap, bo[2], bo[3]);
        mma::ldmatrix_x4_trans(bq, sq + kk * 16 * kLd + d2 * 16 + vb_off);
        mma::mma_16816<T>(gk[2 * d2], as, bq[0], bq[1]);
        mma::mma_16816<T>(gk[2 * d2 + 1], as, bq[2], bq[3]);
      }
      // dS^T of these 16 queries into shared memory, rows = keys (pairs of adjacent queries per 32-bit store)
      uint32_t* row = reinterpret_cast<uint32_t*>(sds + (warp * 16 + g) * kLdS + kk * 16 + 2 * c4);
      row[0] = as[0], row[4 * kLdS] = as[1], row[4] = as[2], row[4 * kLdS + 4] = as[3];
    }
    __syncthreads();
    // dQ (kMq x HD) += dS (kMq x 64 keys) K (64 x HD): 16 x 16 pieces shared among the warps.
    for (int task = warp; task < (kMq / 16) * (HD / 16); task += 4) {
      const int rg = task % (kMq / 16), d2 = task / (kMq / 16);
      if (d2 * 16 >= p.D) continue;  // zero-padded head dims
      float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int kk = 0; kk < kN / 16; ++kk) {
        uint32_t a[4], bk[4];
        mma::ldmatrix_x4_trans(a, sds + (kk * 16 + (lane / 16) * 8 + lane % 8) * kLdS + rg * 16 + ((lane / 8) % 2) * 8);
        mma::ldmatrix_x4_trans(bk, sk + kk * 16 * kLd + d2 * 16 + vb_off);
        mma::mma_16816<T>(acc[0], a, bk[0], bk[1]);
        mma::mma_16816<T>(acc[1], a, bk[2], bk[3]);
      }
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int64_t i = i0 + rg * 16 + g + (r / 2) * 8, d = d2 * 16 + half * 8 + 2 * c4 + (r % 2);
          if (i < p.Lq && d < p.D) atomicAdd(dq_acc + (bh * p.Lq + i) * p.D + d, acc[half][r]);
        }
    }
    __syncthreads();  // this stage and dS^T are rewritten by the next iteration
  }
  mma::cp_async_wait<0>();  // no query tile: K and V were still loaded
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t j = jrow + r * 8;
    if (j >= p.Lk) continue;
#pragma unroll
    for (int dt = 0; dt < HD / 8; ++dt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t d = dt * 8 + 2 * c4 + e;
        if (d < p.D) dk[(bhk * p.Lk + j) * p.D + d] = static_cast<T>(gk[dt][2 * r + e] * p.scale);
        if (d < p.Dv) dv[(bhk * p.Lk + j) * p.Dv + d] = static_cast<T>(gv[dt][2 * r + e]);
      }
  }
}

// The padded head dim of the tensor-core kernels for head dims D, Dv: the smallest of 32, 64, 96, 128, 256
// holding both.
inline int tc_head_dim(int64_t D, int64_t Dv) {
  const int64_t w = std::max(D, Dv);
  return w <= 32 ? 32 : w <= 64 ? 64 : w <= 96 ? 96 : w <= 128 ? 128 : 256;
}

// f(std::integral_constant<int, HD>) for the padded head dim hd.
template <typename F> bool with_head_dim(int hd, F&& f) {
  switch (hd) {
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 96: return f(std::integral_constant<int, 96>{});
    case 128: return f(std::integral_constant<int, 128>{});
    default: return f(std::integral_constant<int, 256>{});
  }
}

// Whether the tensor-core kernels may stage rows with 16-byte cp.async: head dims and the operands' batch / head
// strides multiples of 8 elements, data 16-byte aligned.
template <typename A>
bool tc_vectorizable(const attention::Geometry& g, const Params<A>& p, std::initializer_list<const at::Tensor*> ts) {
  bool ok = g.D % 8 == 0 && g.Dv % 8 == 0 && p.qsb % 8 == 0 && p.qsh % 8 == 0 && p.ksb % 8 == 0 && p.ksh % 8 == 0 &&
            p.vsb % 8 == 0 && p.vsh % 8 == 0;
  for (const at::Tensor* t : ts) ok = ok && reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 == 0;
  return ok;
}

// Launches a tensor-core kernel with `smem` bytes of dynamic shared memory if the device grants them.
template <typename K, typename... Args>
bool launch_tc(K kernel, size_t smem, dim3 grid, int threads, cudaStream_t stream, Args... args) {
  if (smem > at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin) return false;
  allow_smem(kernel, smem);
  kernel<<<grid, threads, smem, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// Runs the tensor-core forward when it applies - float16 / bfloat16 on sm_80+ with the tile's shared memory
// available - and says whether it did.
template <typename T, typename A>
bool attention_fwd_tc(const attention::Geometry& g, const Params<A>& p, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v, at::Tensor& out, at::Tensor& stats, cudaStream_t stream) {
  if constexpr (!kHalfType<T>) {
    return false;
  } else {
    if (at::cuda::getCurrentDeviceProperties()->major < 8) return false;
    const bool vec = tc_vectorizable(g, p, {&q, &k, &v});
    return with_head_dim(tc_head_dim(g.D, g.Dv), [&](auto hd) {
      using C = TcTile<decltype(hd)::value>;
      const int64_t tiles = (g.Lq + C::kM - 1) / C::kM;
      return launch_tc(attn_fwd_tc_kernel<T, decltype(hd)::value>, C::kSmem, tile_grid(tiles, g.B * g.H),
                       C::kThreads, stream, p, static_cast<const uint16_t*>(q.const_data_ptr()),
                       static_cast<const uint16_t*>(k.const_data_ptr()),
                       static_cast<const uint16_t*>(v.const_data_ptr()), out.mutable_data_ptr<T>(),
                       stats.mutable_data_ptr<float>(), tiles, vec);
    });
  }
}

// The tensor-core backward when it applies - float16 / bfloat16 on sm_80+, padded head dim up to 128 (at 256, dK
// and dV of a warp's 16 keys alone would fill the registers: the simple kernels take it) - writing dq, dk, dv
// (and dmask through p); says whether it ran. delta: rowsum(dO * O), computed.
template <typename T, typename A>
bool attention_bwd_tc(const attention::Geometry& g, const Params<A>& p, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v, const at::Tensor& dO, const at::Tensor& stats, const at::Tensor& delta,
                      at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, cudaStream_t stream) {
  if constexpr (!kHalfType<T>) {
    return false;
  } else {
    const int hd = tc_head_dim(g.D, g.Dv);
    if (at::cuda::getCurrentDeviceProperties()->major < 8 || hd > 128) return false;
    const bool vec = tc_vectorizable(g, p, {&q, &k, &v, &dO});
    at::Tensor dq_acc = at::zeros(dq.sizes(), dq.options().dtype(at::kFloat));  // dS K, summed by atomics
    const bool ran = with_head_dim(hd, [&](auto hdc) {
      constexpr int HD = decltype(hdc)::value;
      if constexpr (HD > 128) {
        return false;
      } else {
        using C = TcBwdTile<HD>;
        const int64_t tiles = (g.Lk + C::kN - 1) / C::kN;
        return launch_tc(attn_bwd_tc_kernel<T, HD>, C::kSmem, tile_grid(tiles, g.B * g.Hk), C::kThreads, stream, p,
                         static_cast<const uint16_t*>(q.const_data_ptr()),
                         static_cast<const uint16_t*>(k.const_data_ptr()),
                         static_cast<const uint16_t*>(v.const_data_ptr()),
                         static_cast<const uint16_t*>(dO.const_data_ptr()), stats.const_data_ptr<float>(),
                         delta.const_data_ptr<float>(), dq_acc.mutable_data_ptr<float>(), dk.mutable_data_ptr<T>(),
                         dv.mutable_data_ptr<T>(), tiles, vec);
      }
    });
    if (ran) dq.copy_(dq_acc.mul_(p.scale));
    return ran;
  }
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
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_fwd_cuda", [&] {
    using A = at::acc_type<scalar_t, true>;
    const auto p = attention::make_params<A>(g, q, k, v, attn_mask, kpm, dropout_p, is_causal, scale, seed);
    // float16 / bfloat16 on tensor cores where the device has them; float32 and float64 (and half types on older
    // devices) on the simple kernel, which accumulates in the input's precision class.
    if (attention_fwd_tc<scalar_t>(g, p, q, k, v, out, stats, stream)) return;
    const int64_t tiles = (g.Lq + kRows - 1) / kRows;
    const size_t bytes = smem_bytes<A>(g.D, g.Dv, g.D);
    allow_smem(attn_fwd_kernel<scalar_t, A>, bytes);
    attn_fwd_kernel<scalar_t, A><<<tile_grid(tiles, g.B * g.H), kRows * 32, bytes, stream>>>(
        p, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), stats.mutable_data_ptr<A>(), tiles);
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
    if (attention_bwd_tc<scalar_t>(g, p, q, k, v, dO, row_stats, delta, dq, dk, dv, stream)) return;
    const size_t bytes = smem_bytes<A>(g.D, g.Dv, g.D + g.Dv);
    allow_smem(attn_bwd_dq_kernel<scalar_t, A>, bytes);
    allow_smem(attn_bwd_dkdv_kernel<scalar_t, A>, bytes);
    const int64_t q_tiles = (g.Lq + kRows - 1) / kRows, k_tiles = (g.Lk + kRows - 1) / kRows;
    attn_bwd_dq_kernel<scalar_t, A><<<tile_grid(q_tiles, g.B * g.H), kRows * 32, bytes, stream>>>(
        p, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
        dO.const_data_ptr<scalar_t>(), row_stats.const_data_ptr<A>(), delta.const_data_ptr<A>(),
        dq.mutable_data_ptr<scalar_t>(), q_tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    attn_bwd_dkdv_kernel<scalar_t, A><<<tile_grid(k_tiles, g.B * g.Hk), kRows * 32, bytes, stream>>>(
        p, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
        dO.const_data_ptr<scalar_t>(), row_stats.const_data_ptr<A>(), delta.const_data_ptr<A>(),
        dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>(), k_tiles);
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
