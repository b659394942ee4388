// LSTM on CUDA: the fused cell (forward and backward) and the whole recurrence of one layer, as on the CPU
// (csrc/cpu/lstm.cpp, which explains the design). One thread per (batch row, hidden unit) reads that unit's
// four gates; a step is one read of gates and c and one write of h', c' and the activated gates, so the cell
// kernel is bound by memory bandwidth.
//
// The layer op runs the recurrence one of two ways:
// - persistent (float16 / bfloat16 on sm_80+, batch <= 128, H % 8 == 0, when the weight slices fit in shared
//   memory and the steps' L2 traffic stays small, below): one cooperative launch for all T steps. Each block owns a few hidden units, keeps their rows of
//   W_hh in shared memory for the whole sequence, multiplies the previous h by them on the tensor cores and
//   applies the cell to its units; a grid-wide barrier separates the steps. A small batch thus costs T barriers
//   instead of 2T launches, and W_hh is read from global memory once instead of T times.
// - step loop (every other case): per step one cuBLAS addmm into the step's slice of the gate buffer and one
//   cell launch that activates it in place - no host synchronization, no allocation.
// The persistent kernels pay for their small tiles in L2 traffic: every block reads the whole [B, K] operand of
// each step, so large layers (B H large) keep the step loop, whose cuBLAS tiles are larger. The environment
// variable FASTNN_LSTM_PERSISTENT=0 forces the step loop, =1 the persistent kernels wherever they can run (tests
// and benches compare the three settings).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>

#include "common.h"
#include "cuda/common.cuh"
#include "cuda/mma.cuh"
#include "lstm.h"

namespace fastnn::cuda {
namespace {

constexpr int kThreads = 256;

// float: the approximate divide (2 ulp) has no slow-path call, whose saved registers would spill in the
// persistent kernels; 1 / inf = 0 keeps large negative inputs exact.
__device__ __forceinline__ float sigmoid_(float x) { return __fdividef(1.f, 1.f + exp_(-x)); }
__device__ __forceinline__ double sigmoid_(double x) { return 1.0 / (1.0 + exp_(-x)); }

// `len` null: every row is active; otherwise row r runs while t < len[r] and keeps its state after.
__device__ __forceinline__ bool active(const int64_t* len, int64_t t, int64_t r) { return len == nullptr || t < len[r]; }

// One (row, unit)'s cell step from its four pre-activations z = (i, f, g, o) and the previous c: the activated
// gates into a, the new c and h into cn, hn.
template <typename A>
__device__ __forceinline__ void cell_forward(const A (&z)[4], A cp, A (&a)[4], A& cn, A& hn) {
  a[0] = sigmoid_(z[0]), a[1] = sigmoid_(z[1]), a[2] = tanh(z[2]), a[3] = sigmoid_(z[3]);
  cn = a[1] * cp + a[0] * a[2];
  hn = a[3] * tanh(cn);
}

// Its gradients: gh, gc the incoming gradients of h and c, a the activated gates, cp the previous c; the four
// pre-activation gradients into dg; returns the previous c's gradient.
template <typename A>
__device__ __forceinline__ A cell_backward(A gh, A gc, const A (&a)[4], A cp, A (&dg)[4]) {
  const A i = a[0], f = a[1], g = a[2], o = a[3];
  const A tc = tanh(f * cp + i * g);
  gc += gh * o * (A(1) - tc * tc);
  dg[0] = gc * g * i * (A(1) - i);
  dg[1] = gc * cp * f * (A(1) - f);
  dg[2] = gc * i * (A(1) - g * g);
  dg[3] = gh * tc * o * (A(1) - o);
  return gc * f;
}

// pre may alias act (the layer activates its gate buffer in place): every thread reads its four gates before
// writing them. hp (the previous h) is read only for inactive rows.
template <typename T>
__global__ void cell_fwd_kernel(const T* pre, const T* __restrict__ bias, const T* __restrict__ cp,
                                const T* __restrict__ hp, T* act, T* __restrict__ c, T* __restrict__ h, int64_t B,
                                int64_t H, const int64_t* __restrict__ len, int64_t t) {
  using A = acc_t<T>;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < B * H;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = idx / H, j = idx - r * H;
    if (!active(len, t, r)) {
      c[idx] = cp[idx];
      h[idx] = hp[idx];
      continue;
    }
    const int64_t g0 = r * 4 * H + j;
    A z[4], a[4], cn, hn;
#pragma unroll
    for (int k = 0; k < 4; ++k) z[k] = A(pre[g0 + k * H]) + (bias ? A(bias[j + k * H]) : A(0));
    cell_forward(z, A(cp[idx]), a, cn, hn);
#pragma unroll
    for (int k = 0; k < 4; ++k) act[g0 + k * H] = T(a[k]);
    c[idx] = T(cn);
    h[idx] = T(hn);
  }
}

// dh + dh2 and dc + dc2 are the incoming gradients (dh2, dc, dc2 may be null); dcp may alias dc2. Inactive rows
// (the layer with lengths) hand their gradients through: dgates 0, dcp = dc, pass = dh.
template <typename T>
__global__ void cell_bwd_kernel(const T* __restrict__ dh, const T* __restrict__ dh2, const T* __restrict__ dc,
                                const T* dc2, const T* __restrict__ act, const T* __restrict__ cp,
                                T* __restrict__ dgates, T* dcp, T* __restrict__ pass, int64_t B, int64_t H,
                                const int64_t* __restrict__ len, int64_t t) {
  using A = acc_t<T>;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < B * H;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = idx / H, j = idx - r * H, g0 = r * 4 * H + j;
    const A gh = A(dh[idx]) + (dh2 ? A(dh2[idx]) : A(0));
    const A gc = (dc ? A(dc[idx]) : A(0)) + (dc2 ? A(dc2[idx]) : A(0));
    if (!active(len, t, r)) {
#pragma unroll
      for (int k = 0; k < 4; ++k) dgates[g0 + k * H] = T(0);
      dcp[idx] = T(gc);
      pass[idx] = T(gh);
      continue;
    }
    A a[4], dg[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) a[k] = A(act[g0 + k * H]);
    const A dc_prev = cell_backward(gh, gc, a, A(cp[idx]), dg);
#pragma unroll
    for (int k = 0; k < 4; ++k) dgates[g0 + k * H] = T(dg[k]);
    dcp[idx] = T(dc_prev);
    if (pass) pass[idx] = T(0);
  }
}

// ---- The persistent layer kernels (float16 / bfloat16, sm_80+) -------------------------------------------------
// Both multiply a [B, K] matrix of the previous step - h [B, H] in the forward, the gate gradients [B, 4H] in the
// backward, written by every block and read back through L2 - by a block's [N, K] tile of W_hh held in shared
// memory, N = 8 NT columns, on mma.sync m16n8k16 with float32 accumulation. The [B, K] matrix streams in chunks
// of kc columns through two cp.async stages (zeros past B rows and past K); kc is as wide as kPStageBytes of
// stages allow, so that a small batch's step is one or a few chunks rather than many L2 round trips of a few
// kilobytes each. 8 warps split the work: warp w takes
// the 16-row tile w % MT (MT = ceil(B / 16) <= 8) and every KS-th 16-deep k tile, KS = 8 / MT, so a small batch
// still spreads over the warps; their partial sums meet in a float32 [Bp, N] tile z in shared memory, which the
// caller filled with the rest of the sum first.
// Shared-memory rows are padded by 8 elements: rows 16 bytes apart modulo 128 put the 8 row addresses of each
// ldmatrix phase in distinct banks.
constexpr int kPWarps = 8, kPThreads = 32 * kPWarps, kPMaxRows = 16 * kPWarps;
constexpr int64_t kPStageBytes = 96 << 10;  // both chunk stages together

// The shared-memory layout of a persistent kernel, made on the host and passed to the kernel.
struct PersistentSmem {
  int kc, kcld;  // the chunk width (a multiple of 64) and its stage rows' length, kc + 8
  int kp, ldw;   // K rounded up to whole chunks, and the weight tile's row length, kp + 8
  size_t w, stage, z, bytes;  // byte offsets of the weight tile, the two chunk stages, z; the total
};
// K: the row length of the multiplied matrix, N: the tile's columns, Bp: the batch rounded up to 16, z_tiles: how
// many float32 [Bp, N] tiles the kernel keeps (z and per-row state), kc: the chunk width.
__host__ __device__ inline PersistentSmem persistent_smem(int64_t K, int N, int64_t Bp, int z_tiles, int kc) {
  PersistentSmem s;
  s.kc = kc, s.kcld = kc + 8;
  s.kp = int(ceil_div(K, kc) * kc), s.ldw = s.kp + 8;
  s.w = 0;
  s.stage = s.w + sizeof(uint16_t) * size_t(N) * s.ldw;
  s.z = s.stage + sizeof(uint16_t) * 2 * size_t(Bp) * s.kcld;
  s.bytes = s.z + sizeof(float) * size_t(z_tiles) * Bp * N;
  return s;
}
// The widest chunk - a power of two from 1024 down to 64, or K rounded up to 64 if that is less - whose two
// stages of Bp rows fit in kPStageBytes.
inline int chunk_width(int64_t K, int64_t Bp) {
  const int64_t k64 = ceil_div(K, 64) * 64;
  for (int64_t kc = 1024; kc > 64; kc /= 2) {
    const int64_t w = std::min(kc, k64);
    if (2 * Bp * (w + 8) * int64_t(sizeof(uint16_t)) <= kPStageBytes) return int(w);
  }
  return 64;
}

// z[Bp, N] += a[B, K] (rows lda apart, 16-byte aligned, K % 8 == 0) w^T, w the [N, L.ldw] weight tile (columns
// past K zero). Every thread of the block calls it; it starts and ends with a __syncthreads.
template <typename T, int NT>
__device__ void rows_times_tile(const uint16_t* a, int64_t B, int64_t K, int64_t lda, const uint16_t* w,
                                const PersistentSmem& L, uint16_t* stage, float* z) {
  constexpr int N = 8 * NT;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int MT = int(ceil_div(B, 16)), Bp = 16 * MT, KS = kPWarps / MT;  // KS: 8, 4, 2 or 1, a power of two
  const int mt = warp % MT, ks = warp / MT;
  const bool busy = warp < MT * KS;
  // 32-bit indices here: a 64-bit divide is a call (and spills)
  const int kc = L.kc, ld = L.kcld, chunks = L.kp / kc, pieces = kc / 8, ktiles = kc / 16;
  auto load = [&](int c) {
    uint16_t* st = stage + (c & 1) * Bp * ld;
    for (int x = threadIdx.x; x < Bp * pieces; x += kPThreads) {
      const int r = x / pieces, col = (x % pieces) * 8;
      const int k = c * kc + col;
      const bool in = r < B && k < K;
      mma::cp_async16(st + r * ld + col, in ? a + r * lda + k : a, in ? 16 : 0);
    }
    mma::cp_async_commit();
  };
  float acc[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  __syncthreads();  // the stages are free (the previous call's readers are done), z is filled
  load(0);
  for (int c = 0; c < chunks; ++c) {
    if (c + 1 < chunks) {
      load(c + 1);  // into the other stage, released by the __syncthreads ending the previous iteration
      mma::cp_async_wait<1>();
    } else {
      mma::cp_async_wait<0>();
    }
    __syncthreads();
    const uint16_t* st = stage + (c & 1) * Bp * ld;
    if (busy) {
      // this warp's k tiles: global index c * ktiles + kt = ks modulo KS
      for (int kt = (ks - c * ktiles) & (KS - 1); kt < ktiles; kt += KS) {
        uint32_t af[4];
        // A: lane l points at row l % 16, k block l / 16 of the 16 x 16 tile (a0..a3)
        mma::ldmatrix_x4(af, st + (mt * 16 + lane % 16) * ld + kt * 16 + (lane / 16) * 8);
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          // B: lane l (< 16) points at weight row n * 8 + l % 8, k block l / 8 (b0, b1 of the 8 columns)
          uint32_t bf[2];
          mma::ldmatrix_x2(bf, w + (n * 8 + lane % 8) * L.ldw + c * kc + kt * 16 + ((lane / 8) % 2) * 8);
          mma::mma_16816<T>(acc[n], af, bf[0], bf[1]);
        }
      }
    }
    __syncthreads();  // everyone is done with this stage before it is loaded again
  }
  // The k splits add their partial sums one after the other, in a fixed order: each element of z has one writer
  // per round, and the result does not depend on warp scheduling (the same bits on every run).
  // C fragment: (row g, columns 2 c4, 2 c4 + 1) and (row g + 8, the same columns) of each 8-column tile.
  const int g = lane / 4, c4 = lane % 4;
  float* z0 = z + (mt * 16 + g) * N + 2 * c4;
  for (int round = 0; round < KS; ++round) {
    if (busy && ks == round) {
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        z0[n * 8] += acc[n][0];
        z0[n * 8 + 1] += acc[n][1];
        z0[8 * N + n * 8] += acc[n][2];
        z0[8 * N + n * 8 + 1] += acc[n][3];
      }
    }
    __syncthreads();
  }
}

// Forward. Block b owns the NU = 2 NT hidden units j0 = b NU ..; its weight tile row n = gate NU + u holds W_hh's
// row gate H + j0 + u. act [T, B, 4H] arrives holding x W_ih^T + bias and leaves holding the activated gates
// (rows past their length keep x W_ih^T + bias: the backward never reads them).
template <typename T, int NT>
__global__ void __launch_bounds__(kPThreads, 1) layer_fwd_persistent_kernel(const T* __restrict__ w_hh,
                                                                         const T* __restrict__ h0,
                                                                         const T* __restrict__ c0, T* act, T* hs,
                                                                         T* cs, int64_t steps, int64_t B, int64_t H,
                                                                         const int64_t* __restrict__ len,
                                                                         bool reverse, PersistentSmem L) {
  constexpr int N = 8 * NT, NU = N / 4;
  const int64_t Bp = 16 * ceil_div(B, 16), j0 = int64_t(blockIdx.x) * NU;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* w = reinterpret_cast<uint16_t*>(smem_raw + L.w);
  uint16_t* stage = reinterpret_cast<uint16_t*>(smem_raw + L.stage);
  float* z = reinterpret_cast<float*>(smem_raw + L.z);
  const uint16_t* wg = reinterpret_cast<const uint16_t*>(w_hh);
  for (int x = threadIdx.x; x < N * L.ldw; x += kPThreads) {
    const int n = x / L.ldw, k = x % L.ldw;
    const int64_t j = j0 + n % NU;
    w[x] = j < H && k < H ? wg[((n / NU) * H + j) * H + k] : uint16_t(0);
  }
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t t = reverse ? steps - 1 - s : s, tp = reverse ? t + 1 : t - 1;
    const T* hp = s == 0 ? h0 : hs + tp * B * H;
    const T* cp = s == 0 ? c0 : cs + tp * B * H;
    T* act_t = act + t * B * 4 * H;
    for (int x = threadIdx.x; x < Bp * N; x += kPThreads) {
      const int r = x / N, n = x % N;
      const int64_t j = j0 + n % NU;
      z[x] = r < B && j < H ? float(act_t[r * 4 * H + (n / NU) * H + j]) : 0.f;
    }
    rows_times_tile<T, NT>(reinterpret_cast<const uint16_t*>(hp), B, H, H, w, L, stage, z);
    for (int x = threadIdx.x; x < B * NU; x += kPThreads) {
      const int r = x / NU, u = x % NU;
      const int64_t j = j0 + u, o = r * H + j;
      if (j >= H) continue;
      if (!active(len, t, r)) {
        cs[t * B * H + o] = cp[o];
        hs[t * B * H + o] = hp[o];
        continue;
      }
      float zz[4], a[4], cn, hn;
#pragma unroll
      for (int k = 0; k < 4; ++k) zz[k] = z[r * N + k * NU + u];
      cell_forward(zz, float(cp[o]), a, cn, hn);
#pragma unroll
      for (int k = 0; k < 4; ++k) act_t[r * 4 * H + k * H + j] = T(a[k]);
      cs[t * B * H + o] = T(cn);
      hs[t * B * H + o] = T(hn);
    }
    grid.sync();  // step t's h is complete (and visible) before any block reads it
  }
}

// Backward. Block b owns the NU = 8 NT hidden units j0 = b NU ..; its weight tile row u holds W_hh's column
// j0 + u (dh_prev[:, j] = dgates_t W_hh[:, j]). Per step, in the step loop's order: z = the rows' handed-through
// gradient + dgates of the step before (every block's) times the tile; the cell backward of the block's units
// writes dgates_t; the barrier. The running dc and the handed-through dh (rows past their length) stay in float32
// in shared memory. dgx [T, B, 4H] out; dh, dc [B, H]: the gradients of h0 and c0.
template <typename T, int NT>
__global__ void __launch_bounds__(kPThreads, 1) layer_bwd_persistent_kernel(
    const T* __restrict__ w_hh, const T* __restrict__ dhs, const T* __restrict__ dcs, const T* __restrict__ c0,
    const T* __restrict__ cs, const T* __restrict__ act, T* dgx, T* __restrict__ dh, T* __restrict__ dc,
    int64_t steps, int64_t B, int64_t H, const int64_t* __restrict__ len, bool reverse, PersistentSmem L) {
  constexpr int N = 8 * NT, NU = N;
  const int64_t Bp = 16 * ceil_div(B, 16), j0 = int64_t(blockIdx.x) * NU;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* w = reinterpret_cast<uint16_t*>(smem_raw + L.w);
  uint16_t* stage = reinterpret_cast<uint16_t*>(smem_raw + L.stage);
  float* z = reinterpret_cast<float*>(smem_raw + L.z);
  float* dcs_run = z + Bp * N;    // the running gradient of c, per (row, unit)
  float* pass = dcs_run + Bp * N;  // dh handed through rows past their length
  const uint16_t* wg = reinterpret_cast<const uint16_t*>(w_hh);
  for (int x = threadIdx.x; x < N * L.ldw; x += kPThreads) {
    const int k = x / N, u = x % N;  // consecutive threads read consecutive columns of a row
    const int64_t j = j0 + u;
    w[u * L.ldw + k] = j < H && k < 4 * H ? wg[k * H + j] : uint16_t(0);
  }
  for (int x = threadIdx.x; x < Bp * N; x += kPThreads) dcs_run[x] = pass[x] = 0.f;
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  const uint16_t* dg_prev = nullptr;  // the gate gradients of the step before (null at the first)
  auto recurrent_dh = [&] {           // z = pass + dg_prev W_hh[:, j0 ..]
    for (int x = threadIdx.x; x < Bp * N; x += kPThreads) z[x] = pass[x];
    if (dg_prev) rows_times_tile<T, NT>(dg_prev, B, 4 * H, 4 * H, w, L, stage, z);
    else __syncthreads();
  };
  for (int64_t s = steps - 1; s >= 0; --s) {
    const int64_t t = reverse ? steps - 1 - s : s, tp = reverse ? t + 1 : t - 1;
    const T* cp = s == 0 ? c0 : cs + tp * B * H;
    recurrent_dh();
    for (int x = threadIdx.x; x < B * NU; x += kPThreads) {
      const int r = x / NU, u = x % NU, zi = r * N + u;
      const int64_t j = j0 + u, o = r * H + j, g0 = t * B * 4 * H + r * 4 * H + j;
      if (j >= H) continue;
      const float gh = float(dhs[t * B * H + o]) + z[zi];
      const float gc = (dcs ? float(dcs[t * B * H + o]) : 0.f) + dcs_run[zi];
      if (!active(len, t, r)) {
#pragma unroll
        for (int k = 0; k < 4; ++k) dgx[g0 + k * H] = T(0);
        dcs_run[zi] = gc;
        pass[zi] = gh;
        continue;
      }
      float a[4], dg[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) a[k] = float(act[g0 + k * H]);
      dcs_run[zi] = cell_backward(gh, gc, a, float(cp[o]), dg);
      pass[zi] = 0.f;
#pragma unroll
      for (int k = 0; k < 4; ++k) dgx[g0 + k * H] = T(dg[k]);
    }
    dg_prev = reinterpret_cast<const uint16_t*>(dgx + t * B * 4 * H);
    grid.sync();  // step t's gate gradients are complete before any block multiplies them
  }
  recurrent_dh();
  for (int x = threadIdx.x; x < B * NU; x += kPThreads) {
    const int r = x / NU, u = x % NU;
    const int64_t j = j0 + u;
    if (j < H) {
      dh[r * H + j] = T(z[r * N + u]);
      dc[r * H + j] = T(dcs_run[r * N + u]);
    }
  }
}

// Enough blocks to fill any current GPU several times over; the kernels' grid-stride loops cover the rest.
unsigned blocks_for(int64_t n) { return unsigned(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, kThreads), 8192))); }

template <typename T> const T* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<T>() : nullptr; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_fwd_cuda(const at::Tensor& gates_,
                                                                  const std::optional<at::Tensor>& bias_,
                                                                  const at::Tensor& cx_) {
  check_lstm_cell(gates_, cx_, "gates");
  const at::Tensor bias = checked_lstm_bias(bias_, gates_, cx_.size(1));
  const c10::cuda::CUDAGuard guard(cx_.device());
  const int64_t B = cx_.size(0), H = cx_.size(1);
  const at::Tensor gates = gates_.contiguous(), cx = cx_.contiguous();
  at::Tensor hy = at::empty({B, H}, cx.options()), cy = at::empty({B, H}, cx.options());
  at::Tensor act = at::empty({B, 4 * H}, cx.options());
  if (B * H == 0) return {hy, cy, act};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cx.scalar_type(), "lstm_cell_fwd_cuda", [&] {
    cell_fwd_kernel<scalar_t><<<blocks_for(B * H), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        gates.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(bias), cx.const_data_ptr<scalar_t>(), nullptr,
        act.mutable_data_ptr<scalar_t>(), cy.mutable_data_ptr<scalar_t>(), hy.mutable_data_ptr<scalar_t>(), B, H,
        nullptr, 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {hy, cy, act};
}

std::tuple<at::Tensor, at::Tensor> lstm_cell_bwd_cuda(const at::Tensor& grad_hy_, const at::Tensor& grad_cy_,
                                                      const at::Tensor& act_, const at::Tensor& cx_) {
  check_lstm_cell(act_, cx_, "act");
  check_same(grad_hy_, "grad_hy", cx_, "cx");
  check_same(grad_cy_, "grad_cy", cx_, "cx");
  const c10::cuda::CUDAGuard guard(cx_.device());
  const int64_t B = cx_.size(0), H = cx_.size(1);
  const at::Tensor dh = grad_hy_.contiguous(), dc = grad_cy_.contiguous(), act = act_.contiguous();
  const at::Tensor cx = cx_.contiguous();
  at::Tensor dgates = at::empty({B, 4 * H}, cx.options()), dcx = at::empty({B, H}, cx.options());
  if (B * H == 0) return {dgates, dcx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cx.scalar_type(), "lstm_cell_bwd_cuda", [&] {
    cell_bwd_kernel<scalar_t><<<blocks_for(B * H), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        dh.const_data_ptr<scalar_t>(), nullptr, dc.const_data_ptr<scalar_t>(), nullptr,
        act.const_data_ptr<scalar_t>(), cx.const_data_ptr<scalar_t>(), dgates.mutable_data_ptr<scalar_t>(),
        dcx.mutable_data_ptr<scalar_t>(), nullptr, B, H, nullptr, 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dgates, dcx};
}

// lengths arrive on the CPU (checked there); the kernels read a device copy.
at::Tensor device_lengths(const LstmLayerGeometry& geo, const at::Tensor& host, const at::Device& dev) {
  return geo.len ? host.to(dev, /*non_blocking=*/false) : at::Tensor();
}

template <typename F> auto with_nt(int nt, F&& f) {
  switch (nt) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

struct PersistentPlan {
  int nt = 0;  // 0: the persistent kernel does not apply
  int blocks = 0;
  PersistentSmem layout{};
};

enum class PersistentMode { kAuto, kNever, kWherePossible };
// FASTNN_LSTM_PERSISTENT: "0" never, "1" wherever the kernels can run, otherwise (or unset) by the traffic limit.
PersistentMode persistent_mode() {
  const char* env = std::getenv("FASTNN_LSTM_PERSISTENT");
  if (env != nullptr && std::strcmp(env, "0") == 0) return PersistentMode::kNever;
  if (env != nullptr && std::strcmp(env, "1") == 0) return PersistentMode::kWherePossible;
  return PersistentMode::kAuto;
}

// Per step, the whole grid reads blocks * B * K 16-bit elements of the previous step's operand from L2; above
// this many bytes, a few microseconds of L2 bandwidth on current GPUs, the step loop's larger cuBLAS tiles move
// less data per step.
constexpr int64_t kPMaxStepBytes = int64_t(16) << 20;

// Where the persistent kernels apply at all: sm_80+ with cooperative launch, a 16-bit dtype, B <= 128 (one
// 16-row tile per warp), H % 8 == 0 (16-byte rows for cp.async), not turned off.
template <typename T> bool persistent_applies(int64_t B, int64_t H) {
  if constexpr (!kHalfType<T>) {
    return false;
  } else {
    if (persistent_mode() == PersistentMode::kNever) return false;
    const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
    return prop->major >= 8 && prop->cooperativeLaunch && B >= 1 && B <= kPMaxRows && H % 8 == 0;
  }
}

// The tile for a grid-synchronized kernel: kernel_of(nt) its instance with NT = nt, a block of it owning
// units_per_nt * nt hidden units and multiplying rows of K elements, keeping z_tiles float32 tiles. Every block
// must be resident at once (cooperative launch), and in the automatic mode the step's L2 reads within
// kPMaxStepBytes. Prefers the smallest tile whose grid fits one block per SM (the most warps without two blocks
// competing for one SM), else the smallest whose grid co-resides at all.
template <typename KernelOf>
PersistentPlan plan_persistent(int64_t B, int64_t H, int64_t K, int units_per_nt, int z_tiles, KernelOf kernel_of) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t Bp = 16 * ceil_div(B, 16);
  const bool limit_traffic = persistent_mode() == PersistentMode::kAuto;
  PersistentPlan fallback;
  for (int nt : {1, 2, 4, 8}) {
    const int64_t blocks = ceil_div(H, int64_t(units_per_nt) * nt);
    // narrower chunks where the widest would not fit beside the weight tile
    int kc = chunk_width(K, Bp);
    PersistentSmem layout = persistent_smem(K, 8 * nt, Bp, z_tiles, kc);
    while (layout.bytes > prop->sharedMemPerBlockOptin && kc > 64) {
      kc = std::max(64, kc / 2 / 64 * 64);
      layout = persistent_smem(K, 8 * nt, Bp, z_tiles, kc);
    }
    const size_t smem = layout.bytes;
    if (smem > prop->sharedMemPerBlockOptin) continue;
    if (limit_traffic && blocks * Bp * K * int64_t(sizeof(uint16_t)) > kPMaxStepBytes) continue;
    const void* kernel = kernel_of(nt);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kPThreads, smem));
    if (blocks > int64_t(per_sm) * prop->multiProcessorCount) continue;
    const PersistentPlan plan{nt, int(blocks), layout};
    if (blocks <= prop->multiProcessorCount) return plan;
    if (fallback.nt == 0) fallback = plan;
  }
  return fallback;
}

// One cooperative launch of kernel(args...) (the exact parameter types: cudaLaunchCooperativeKernel passes them
// by address).
template <typename... Params, typename... Args>
void launch_cooperative(void (*kernel)(Params...), const PersistentPlan& plan, cudaStream_t stream, Args... args) {
  std::tuple<Params...> values(args...);
  void* ptrs[sizeof...(Params)];
  std::apply([&](auto&... v) {
    int i = 0;
    ((ptrs[i++] = static_cast<void*>(&v)), ...);
  }, values);
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(plan.blocks),
                                             dim3(kPThreads), ptrs, plan.layout.bytes, stream));
}

// The persistent forward over act (holding x W_ih^T + bias) when it applies; says whether it ran.
template <typename T>
bool layer_fwd_persistent(const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0, at::Tensor& act,
                          at::Tensor& hs, at::Tensor& cs, const at::Tensor& len, int64_t steps, int64_t B, int64_t H,
                          bool reverse) {
  if constexpr (!kHalfType<T>) {
    return false;
  } else {
    if (!persistent_applies<T>(B, H) || !aligned16(h0.const_data_ptr())) return false;
    const PersistentPlan plan = plan_persistent(B, H, H, 2, 1, [](int nt) {
      return with_nt(nt, [](auto c) { return reinterpret_cast<const void*>(layer_fwd_persistent_kernel<T, c.value>); });
    });
    if (plan.nt == 0) return false;
    with_nt(plan.nt, [&](auto c) {
      launch_cooperative(layer_fwd_persistent_kernel<T, c.value>, plan, c10::cuda::getCurrentCUDAStream(),
                         w_hh.const_data_ptr<T>(), h0.const_data_ptr<T>(), c0.const_data_ptr<T>(),
                         act.mutable_data_ptr<T>(), hs.mutable_data_ptr<T>(), cs.mutable_data_ptr<T>(), steps, B, H,
                         ptr_or_null<int64_t>(len), reverse, plan.layout);
    });
    return true;
  }
}

// The persistent backward when it applies, writing dgx, dh and dc; says whether it ran.
template <typename T>
bool layer_bwd_persistent(const at::Tensor& w_hh, const at::Tensor& dhs, const at::Tensor& dcs, const at::Tensor& c0,
                          const at::Tensor& cs, const at::Tensor& act, at::Tensor& dgx, at::Tensor& dh, at::Tensor& dc,
                          const at::Tensor& len, int64_t steps, int64_t B, int64_t H, bool reverse) {
  if constexpr (!kHalfType<T>) {
    return false;
  } else {
    if (!persistent_applies<T>(B, H) || !aligned16(dgx.const_data_ptr())) return false;
    const PersistentPlan plan = plan_persistent(B, H, 4 * H, 8, 3, [](int nt) {
      return with_nt(nt, [](auto c) { return reinterpret_cast<const void*>(layer_bwd_persistent_kernel<T, c.value>); });
    });
    if (plan.nt == 0) return false;
    with_nt(plan.nt, [&](auto c) {
      launch_cooperative(layer_bwd_persistent_kernel<T, c.value>, plan, c10::cuda::getCurrentCUDAStream(),
                         w_hh.const_data_ptr<T>(), dhs.const_data_ptr<T>(), ptr_or_null<T>(dcs),
                         c0.const_data_ptr<T>(), cs.const_data_ptr<T>(), act.const_data_ptr<T>(),
                         dgx.mutable_data_ptr<T>(), dh.mutable_data_ptr<T>(), dc.mutable_data_ptr<T>(), steps, B, H,
                         ptr_or_null<int64_t>(len), reverse, plan.layout);
    });
    return true;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_fwd_cuda(
    const at::Tensor& x_, const at::Tensor& w_ih, const std::optional<at::Tensor>& bias_, const at::Tensor& w_hh_,
    const at::Tensor& h0_, const at::Tensor& c0_, const std::optional<at::Tensor>& lengths, bool reverse) {
  at::Tensor len_host;
  const LstmLayerGeometry geo = check_lstm_layer(x_, "x", w_hh_, c0_, lengths, len_host, x_.size(-1));
  const at::Tensor bias = check_lstm_layer_input(x_, w_ih, bias_, w_hh_);
  check_same(h0_, "h0", c0_, "c0");
  const c10::cuda::CUDAGuard guard(x_.device());
  const int64_t T = geo.T, B = geo.B, H = geo.H;
  const at::Tensor w_hh = w_hh_.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous();
  const at::Tensor len = device_lengths(geo, len_host, x_.device());
  at::Tensor hs = at::empty({T, B, H}, x_.options()), cs = at::empty({T, B, H}, x_.options());
  at::Tensor act = at::empty({T, B, 4 * H}, x_.options());
  if (T * B * H == 0) return {hs, cs, act};
  // All steps' input products in one GEMM straight into the gate buffer; each step adds h W_hh^T in place.
  const at::Tensor x2 = x_.reshape({T * B, x_.size(2)});
  at::Tensor act2 = act.view({T * B, 4 * H});
  if (bias.defined()) at::addmm_out(act2, bias, x2, w_ih.t());
  else at::mm_out(act2, x2, w_ih.t());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, act.scalar_type(), "lstm_layer_fwd_cuda", [&] {
    if (layer_fwd_persistent<scalar_t>(w_hh, h0, c0, act, hs, cs, len, T, B, H, reverse)) return;
    const at::Tensor w_hh_t = w_hh.t();
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = reverse ? T - 1 - s : s, tp = reverse ? t + 1 : t - 1;
      const at::Tensor h_prev = s == 0 ? h0 : hs.select(0, tp), c_prev = s == 0 ? c0 : cs.select(0, tp);
      at::Tensor act_t = act.select(0, t);
      act_t.addmm_(h_prev, w_hh_t);
      cell_fwd_kernel<scalar_t><<<blocks_for(B * H), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          act_t.const_data_ptr<scalar_t>(), nullptr, c_prev.const_data_ptr<scalar_t>(),
          h_prev.const_data_ptr<scalar_t>(), act_t.mutable_data_ptr<scalar_t>(),
          cs.mutable_data_ptr<scalar_t>() + t * B * H, hs.mutable_data_ptr<scalar_t>() + t * B * H, B, H,
          ptr_or_null<int64_t>(len), t);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {hs, cs, act};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd_cuda(
    const at::Tensor& grad_hs_, const std::optional<at::Tensor>& grad_cs, const at::Tensor& w_hh_,
    const at::Tensor& c0_, const at::Tensor& cs_, const at::Tensor& act_, const std::optional<at::Tensor>& lengths,
    bool reverse) {
  at::Tensor len_host;
  const LstmLayerGeometry geo = check_lstm_layer(act_, "act", w_hh_, c0_, lengths, len_host);
  const at::Tensor dcs = check_lstm_layer_grads(geo, grad_hs_, grad_cs, cs_, act_);  // undefined: zero
  const c10::cuda::CUDAGuard guard(act_.device());
  const int64_t T = geo.T, B = geo.B, H = geo.H;
  const at::Tensor dhs = grad_hs_.contiguous(), w_hh = w_hh_.contiguous();
  const at::Tensor c0 = c0_.contiguous(), cs = cs_.contiguous(), act = act_.contiguous();
  const at::Tensor len = device_lengths(geo, len_host, act.device());
  at::Tensor dgx = at::empty({T, B, 4 * H}, act.options());
  at::Tensor dh = at::empty({B, H}, act.options()), dc = at::empty({B, H}, act.options());
  if (T * B * H == 0) return {dgx.zero_(), dh.zero_(), dc.zero_(), at::zeros({4 * H}, act.options())};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, act.scalar_type(), "lstm_layer_bwd_cuda", [&] {
    if (layer_bwd_persistent<scalar_t>(w_hh, dhs, dcs, c0, cs, act, dgx, dh, dc, len, T, B, H, reverse)) return;
    dh.zero_();  // the running gradients start at 0 (the persistent kernel writes both whole)
    dc.zero_();
    at::Tensor pass = geo.len ? at::zeros({B, H}, act.options()) : at::Tensor();
    for (int64_t s = T - 1; s >= 0; --s) {
      const int64_t t = reverse ? T - 1 - s : s, tp = reverse ? t + 1 : t - 1;
      const scalar_t* cp = s == 0 ? c0.const_data_ptr<scalar_t>() : cs.const_data_ptr<scalar_t>() + tp * B * H;
      at::Tensor dg_t = dgx.select(0, t);
      cell_bwd_kernel<scalar_t><<<blocks_for(B * H), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          dhs.const_data_ptr<scalar_t>() + t * B * H, dh.const_data_ptr<scalar_t>(),
          dcs.defined() ? dcs.const_data_ptr<scalar_t>() + t * B * H : nullptr, dc.const_data_ptr<scalar_t>(),
          act.const_data_ptr<scalar_t>() + t * B * 4 * H, cp, dg_t.mutable_data_ptr<scalar_t>(),
          dc.mutable_data_ptr<scalar_t>(), pass.defined() ? pass.mutable_data_ptr<scalar_t>() : nullptr, B, H,
          ptr_or_null<int64_t>(len), t);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (pass.defined()) at::addmm_out(dh, pass, dg_t, w_hh);
      else at::mm_out(dh, dg_t, w_hh);
    }
  });
  // The bias gradient: one reduction over all steps' gate gradients (torch's, accumulating half types in float).
  return {dgx, dh, dc, dgx.view({T * B, 4 * H}).sum(0)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnn, CUDA, m) {
  m.impl("lstm_cell_fwd", &lstm_cell_fwd_cuda);
  m.impl("lstm_cell_bwd", &lstm_cell_bwd_cuda);
  m.impl("lstm_layer_fwd", &lstm_layer_fwd_cuda);
  m.impl("lstm_layer_bwd", &lstm_layer_bwd_cuda);
}

}  // namespace fastnn::cuda
