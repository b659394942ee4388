// Host emulation of the CUDA primitives fastnn's tensor-core kernels use (tools/cuda_emu: attention.py, lstm.py):
// one std::thread per CUDA thread, std::barrier for __syncthreads, for the warp-collective operations (shfl,
// ldmatrix, mma.m16n8k16 with the fragment layouts of the PTX ISA) and for a cooperative grid's grid.sync(),
// cp.async landing at issue or at cp.async.wait_group. It checks index arithmetic, fragment layouts, masking and pipelining (with ThreadSanitizer:
// shared-memory races) on a machine without a GPU; not timing, not the hardware's rounding order.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <cstdio>
#include <string>
#include <deque>
#include <functional>
#include <thread>
#include <type_traits>
#include <vector>
#include <algorithm>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
using std::max;
using std::min;

struct uint4 { uint32_t x, y, z, w; };
struct Dim3e { unsigned x = 0, y = 0, z = 0; };
inline thread_local Dim3e threadIdx, blockIdx;

struct WarpX {
  std::barrier<> bar{32};
  const void* addr[32];
  uint32_t a[32][4], b0[32], b1[32];
  float f[32];
};
struct BlockX {
  std::barrier<> bar;
  std::vector<WarpX*> warps;
  unsigned char* smem;
  explicit BlockX(int n) : bar(n) {}
};
inline thread_local BlockX* tl_block;
// The grid of a cooperative launch: every block runs at once, grid.sync() waits for all of their threads.
struct GridX {
  std::barrier<> bar;
  explicit GridX(std::ptrdiff_t n) : bar(n) {}
};
inline thread_local GridX* tl_grid;
namespace cooperative_groups {
struct grid_group {
  void sync() { tl_grid->bar.arrive_and_wait(); }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups
inline thread_local WarpX* tl_warp;
inline void __syncthreads() { tl_block->bar.arrive_and_wait(); }
inline int lane_id() { return threadIdx.x % 32; }

inline float __shfl_xor_sync(unsigned, float v, int o) {
  WarpX* w = tl_warp;
  const int l = lane_id();
  w->f[l] = v;
  w->bar.arrive_and_wait();
  const float r = w->f[l ^ o];
  w->bar.arrive_and_wait();
  return r;
}
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }

namespace fastnn::cuda::mma {
struct Copy { void* dst; const void* src; int bytes; };
inline thread_local std::vector<Copy> tl_open;
inline thread_local std::deque<std::vector<Copy>> tl_groups;
// EMU_CP_EAGER=1: the copy lands when issued (the earliest the hardware may write: shows reuse of a buffer that
// other threads still read); otherwise at cp.async.wait_group (the latest: shows a missing wait).
inline const bool cp_eager = getenv("EMU_CP_EAGER") && getenv("EMU_CP_EAGER")[0] == '1';
inline void cp_async16(void* dst, const void* src, int src_bytes) {
  if (cp_eager) {
    std::memset(dst, 0, 16);
    if (src_bytes) std::memcpy(dst, src, src_bytes);
  } else {
    tl_open.push_back({dst, src, src_bytes});
  }
}
inline void cp_async_commit() { tl_groups.push_back(std::move(tl_open)); tl_open.clear(); }
template <int N> inline void cp_async_wait() {
  while ((int)tl_groups.size() > N) {
    for (const Copy& c : tl_groups.front()) {
      std::memset(c.dst, 0, 16);
      if (c.bytes) std::memcpy(c.dst, c.src, c.bytes);
    }
    tl_groups.pop_front();
  }
}
inline void ldm(uint32_t (&r)[4], const void* p, bool trans) {
  WarpX* w = tl_warp;
  const int t = lane_id();
  w->addr[t] = p;
  w->bar.arrive_and_wait();
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (!trans) {
      const uint16_t* row = static_cast<const uint16_t*>(w->addr[8 * i + t / 4]);
      lo = row[2 * (t % 4)], hi = row[2 * (t % 4) + 1];
    } else {
      lo = static_cast<const uint16_t*>(w->addr[8 * i + 2 * (t % 4)])[t / 4];
      hi = static_cast<const uint16_t*>(w->addr[8 * i + 2 * (t % 4) + 1])[t / 4];
    }
    r[i] = lo | uint32_t(hi) << 16;
  }
  w->bar.arrive_and_wait();
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { ldm(r, p, false); }
// x2: matrices 0 and 1 only, addressed by lanes 0-15 (the other lanes' addresses are ignored: a garbage one stays
// unread)
inline void ldmatrix_x2(uint32_t (&r)[2], const void* p) {
  WarpX* w = tl_warp;
  const int t = lane_id();
  w->addr[t] = p;
  w->bar.arrive_and_wait();
  for (int i = 0; i < 2; ++i) {
    const uint16_t* row = static_cast<const uint16_t*>(w->addr[8 * i + t / 4]);
    r[i] = row[2 * (t % 4)] | uint32_t(row[2 * (t % 4) + 1]) << 16;
  }
  w->bar.arrive_and_wait();
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { ldm(r, p, true); }
template <typename T> inline float tof(uint16_t b) { return float(T(b, T::from_bits())); }
template <typename T> inline float half_of(uint32_t reg, int k) { return tof<T>(uint16_t(k % 2 ? reg >> 16 : reg & 0xffff)); }
template <typename T> inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  WarpX* w = tl_warp;
  const int t = lane_id();
  for (int u = 0; u < 4; ++u) w->a[t][u] = a[u];
  w->b0[t] = b0, w->b1[t] = b1;
  w->bar.arrive_and_wait();
  auto A = [&](int r, int k) { return half_of<T>(w->a[(r % 8) * 4 + (k % 8) / 2][(r >= 8) + 2 * (k >= 8)], k); };
  auto B = [&](int k, int n) { const int l = n * 4 + (k % 8) / 2; return half_of<T>(k >= 8 ? w->b1[l] : w->b0[l], k); };
  const int g = t / 4, c = t % 4;
  for (int e = 0; e < 4; ++e) {
    const int r = g + (e / 2) * 8, n = 2 * c + e % 2;
    float s = 0.f;
    for (int k = 0; k < 16; ++k) s += A(r, k) * B(k, n);
    d[e] += s;
  }
  w->bar.arrive_and_wait();
}
template <typename T> inline uint32_t pack2(float lo, float hi) { return T(lo).x | uint32_t(T(hi).x) << 16; }
}  // namespace fastnn::cuda::mma

inline unsigned char* emu_smem() { return tl_block->smem; }
namespace mma = fastnn::cuda::mma;

// Runs body() over a 1-d grid of `grid` blocks of `threads` threads with `smem` bytes, `together` blocks at a time
// (every block at once for a cooperative launch, whose grid.sync() needs them all resident).
template <typename F> void emu_launch(unsigned grid, int threads, size_t smem, F&& body, unsigned together = 1) {
  for (unsigned b0 = 0; b0 < grid; b0 += together) {
    const unsigned nb = std::min(together, grid - b0);
    GridX gridx(std::ptrdiff_t(nb) * threads);
    std::deque<BlockX> blks;
    std::vector<std::vector<unsigned char>> mems(nb);
    std::vector<std::vector<WarpX>> warps(nb);
    for (unsigned i = 0; i < nb; ++i) {
      blks.emplace_back(threads);
      mems[i].resize(smem + 16);
      // garbage, so reading unwritten shared memory shows
      for (size_t j = 0; j < mems[i].size(); ++j) mems[i][j] = (unsigned char)(j * 131 + 7);
      blks[i].smem = mems[i].data();
      warps[i] = std::vector<WarpX>(threads / 32);
    }
    std::vector<std::thread> ts;
    for (unsigned i = 0; i < nb; ++i)
      for (int t = 0; t < threads; ++t)
        ts.emplace_back([&, i, t] {
          threadIdx.x = t, blockIdx.x = b0 + i;
          tl_block = &blks[i], tl_warp = &warps[i][t / 32], tl_grid = &gridx;
          body();
          mma::cp_async_wait<0>();
        });
    for (auto& th : ts) th.join();
  }
}
template <typename F> void emu_launch_cooperative(unsigned grid, int threads, size_t smem, F&& body) {
  emu_launch(grid, threads, smem, body, grid);
}

// The drivers' file exchange with the Python side: exact-size heap vectors, so ASan flags any access past them.
template <typename V> std::vector<V> readf(const std::string& path, size_t n) {
  std::vector<V> v(n);
  if (n == 0) return v;
  FILE* f = fopen(path.c_str(), "rb");
  if (!f) { fprintf(stderr, "no %s\n", path.c_str()); exit(2); }
  if (fread(v.data(), sizeof(V), n, f) != n) { fprintf(stderr, "short %s\n", path.c_str()); exit(2); }
  fclose(f);
  return v;
}
template <typename V> void writef(const std::string& path, const std::vector<V>& v) {
  FILE* f = fopen(path.c_str(), "wb");
  if (!v.empty()) fwrite(v.data(), sizeof(V), v.size(), f);
  fclose(f);
}
