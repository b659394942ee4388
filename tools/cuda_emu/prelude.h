// Host emulation of the CUDA primitives fastnn's kernels use (tools/cuda_emu: attention.py and lstm.py run single
// kernels; library.py compiles whole .cu files against it through shim/): one std::thread per CUDA thread,
// std::barrier for __syncthreads, for the warp-collective operations (shuffles, ldmatrix, mma.m16n8k16 with the
// fragment layouts of the PTX ISA) and for a cooperative grid's grid.sync(), cp.async landing at issue or at
// cp.async.wait_group. Launches check the device's limits and abort on a hang. It checks index arithmetic,
// fragment layouts, masking and pipelining (with ThreadSanitizer: shared-memory races) on a machine without a
// GPU; not timing, not the hardware's rounding order.
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
#include <chrono>
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
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local dim3 threadIdx{0, 0, 0}, blockIdx{0, 0, 0}, blockDim, gridDim;

[[noreturn]] inline void emu_fail(const char* what) {
  fprintf(stderr, "cuda_emu: %s\n", what);
  fflush(stderr);
  std::abort();
}

// A warp: `size` lanes (32, or fewer in a block's last warp when blockDim is not a multiple of 32).
struct WarpX {
  int size;
  std::barrier<> bar;
  const void* addr[32];
  uint32_t a[32][4], b0[32], b1[32];
  uint64_t u[32];
  explicit WarpX(int n = 32) : size(n), bar(n) {}
};
struct BlockX {
  std::barrier<> bar;
  std::deque<WarpX> warps;
  unsigned char* smem;
  explicit BlockX(int n) : bar(n) {
    for (int w = 0; w < n; w += 32) warps.emplace_back(std::min(32, n - w));
  }
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
inline thread_local int tl_lane;
inline void __syncthreads() { tl_block->bar.arrive_and_wait(); }
inline int lane_id() { return tl_lane; }

// Every lane of the warp puts v, then reads lane src(l) (its own value where src returns -1).
template <typename V, typename Src> inline V warp_exchange(V v, Src src) {
  static_assert(sizeof(V) <= 8 && std::is_trivially_copyable_v<V>);
  WarpX* w = tl_warp;
  const int l = lane_id();
  std::memcpy(&w->u[l], &v, sizeof(V));
  w->bar.arrive_and_wait();
  const int s = src(l);
  if (s >= w->size) emu_fail("a shuffle reads a lane that does not exist (a warp of fewer than 32 threads)");
  V r = v;
  if (s >= 0) std::memcpy(&r, &w->u[s], sizeof(V));
  w->bar.arrive_and_wait();
  return r;
}
// The shuffles' width semantics (CUDA programming guide): lanes form groups of `width`; xor may read earlier
// groups but a later group's lane gives the caller its own value; down does not wrap past its group's end.
template <typename V> inline V __shfl_xor_sync(unsigned, V v, int o, int width = 32) {
  return warp_exchange(v, [&](int l) { const int s = l ^ o; return s / width > l / width ? -1 : s; });
}
template <typename V> inline V __shfl_down_sync(unsigned, V v, unsigned d, int width = 32) {
  return warp_exchange(v, [&](int l) { return int(l % width + d) >= width ? -1 : l + int(d); });
}
template <typename V> inline V __shfl_sync(unsigned, V v, int src, int width = 32) {
  return warp_exchange(v, [&](int l) { return l / width * width + src % width; });
}
template <typename V> inline V atomicAdd(V* p, V v) { return std::atomic_ref<V>(*p).fetch_add(v); }

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

// The emulated device's limits, checked at every launch as the hardware would refuse the launch.
constexpr unsigned kEmuMaxGridX = 2147483647u, kEmuMaxGridYZ = 65535u;
constexpr int kEmuMaxThreads = 1024;
constexpr size_t kEmuMaxSmem = 227 * 1024;  // sm_90's opt-in shared memory per block

// Seconds a launch may take before it is taken for a hang (a barrier or shuffle not every thread reaches):
// EMU_TIMEOUT, default 300.
inline double emu_timeout() {
  const char* e = getenv("EMU_TIMEOUT");
  return e ? atof(e) : 300.0;
}

// EMU_SAMPLE_BLOCKS=K: a launch of more than 2K blocks (not cooperative) runs only its first K and last K blocks,
// in linear block order - a check of the launch geometry of grids too large to emulate whole; the skipped blocks'
// outputs stay unwritten.
inline uint64_t emu_sample_blocks() {
  const char* e = getenv("EMU_SAMPLE_BLOCKS");
  return e ? strtoull(e, nullptr, 10) : 0;
}

// Runs body() as the kernel's threads over `grid` blocks of `block` threads with `smem` bytes of dynamic shared
// memory. `together` blocks run at once (every block for a cooperative launch, whose grid.sync() needs them all
// resident); otherwise one block after another on the same threads, so a kernel's static __shared__ arrays
// (plain statics here) belong to the one block that runs. Shared memory starts as garbage in every block.
template <typename F>
void emu_launch(dim3 grid, dim3 block, size_t smem, F&& body, unsigned together = 1) {
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  if (nthreads == 0 || nthreads > kEmuMaxThreads || block.z > 64) emu_fail("launch: bad block size");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) emu_fail("launch: an empty grid (CUDA refuses it)");
  if (grid.x > kEmuMaxGridX || grid.y > kEmuMaxGridYZ || grid.z > kEmuMaxGridYZ)
    emu_fail("launch: grid past the device's limits (y and z at most 65535)");
  if (smem > kEmuMaxSmem) emu_fail("launch: dynamic shared memory past the device's opt-in maximum");
  const int threads = int(nthreads);
  auto fill = [](std::vector<unsigned char>& m) {
    for (size_t j = 0; j < m.size(); ++j) m[j] = (unsigned char)(j * 131 + 7);  // unwritten reads show
  };
  std::atomic<bool> done{false};
  std::thread watchdog([&] {
    const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(emu_timeout());
    while (!done.load()) {
      if (std::chrono::steady_clock::now() > until)
        emu_fail("a launch did not finish: a barrier or shuffle that not every thread of a block reaches?");
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  for (uint64_t b0 = 0; b0 < nblocks; b0 += together) {
    const unsigned nb = unsigned(std::min<uint64_t>(together, nblocks - b0));
    GridX gridx(std::ptrdiff_t(nb) * threads);
    std::deque<BlockX> blks;
    std::vector<std::vector<unsigned char>> mems(nb);
    for (unsigned i = 0; i < nb; ++i) {
      blks.emplace_back(threads);
      mems[i].resize(smem + 16);
      fill(mems[i]);
      blks[i].smem = mems[i].data();
    }
    // Sequential blocks (together == 1) reuse the block's threads: block b0, then every later one (or a sample).
    const uint64_t sample = together == 1 ? emu_sample_blocks() : 0;
    const bool sampled = sample > 0 && nblocks > 2 * sample;
    auto next = [&](uint64_t b) { return sampled && b + 1 == sample ? nblocks - sample : b + 1; };
    std::vector<std::thread> ts;
    for (unsigned i = 0; i < nb; ++i)
      for (int t = 0; t < threads; ++t)
        ts.emplace_back([&, i, t] {
          threadIdx = dim3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
          blockDim = block, gridDim = grid;
          tl_block = &blks[i], tl_warp = &blks[i].warps[t / 32], tl_lane = t % 32, tl_grid = &gridx;
          for (uint64_t b = b0 + i; b < (together == 1 ? nblocks : b0 + i + 1); b = next(b)) {
            blockIdx = dim3(unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / (uint64_t(grid.x) * grid.y)));
            body();
            mma::cp_async_wait<0>();
            tl_block->bar.arrive_and_wait();
            if (t == 0) fill(mems[i]);
            tl_block->bar.arrive_and_wait();
          }
        });
    for (auto& th : ts) th.join();
    if (together == 1) break;
  }
  done = true;
  watchdog.join();
}
template <typename F> void emu_launch(unsigned grid, int threads, size_t smem, F&& body, unsigned together = 1) {
  emu_launch(dim3(grid), dim3(unsigned(threads)), smem, body, together);
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
