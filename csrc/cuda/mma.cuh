// Warp-level tensor-core primitives for sm_80+ (the attention and LSTM kernels) as inline PTX: cp.async (global -> shared without registers),
// ldmatrix (shared -> mma fragments) and mma.sync m16n8k16 with float32 accumulation, for float16 and bfloat16.
//
// Fragment layout of mma.m16n8k16 (g = lane / 4, c = lane % 4; each register holds two 16-bit elements, the lower
// column / k index in the low half):
//   A 16x16 row-major: a0 = (row g, k 2c..2c+1), a1 = (row g+8, k 2c..), a2 = (row g, k 2c+8..), a3 = (row g+8, k 2c+8..)
//   B 16x8 "col" (pairs run along k): b0 = (k 2c..2c+1, col g), b1 = (k 2c+8..2c+9, col g)
//   C 16x8 float: c0, c1 = (row g, cols 2c, 2c+1), c2, c3 = (row g+8, cols 2c, 2c+1)
// ldmatrix.x4 loads four 8x8 b16 matrices, lanes 8i..8i+7 giving the row addresses of matrix i; lane t receives,
// of each matrix, row t/4, elements 2(t%4), 2(t%4)+1 - A's and B's pattern above - or with .trans the transpose
// (rows 2(t%4), 2(t%4)+1 of column t/4), which turns a row-major tile whose rows run along k into B fragments.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace fastnn::cuda {
// The 16-bit types the tensor-core kernels take (mma_16816 below).
template <typename T> constexpr bool kHalfType = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;
}  // namespace fastnn::cuda

namespace fastnn::cuda::mma {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes from global `src` (16-byte aligned) to shared `dst`, asynchronously; the bytes past `src_bytes` are
// zero-filled, and with src_bytes = 0 nothing is read (src must still be a valid address).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
// Two matrices: lanes 0-15 give the row addresses (the other lanes' are ignored); one 8-column B fragment pair.
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// d += a b (16x16 by 16x8, float32 accumulators), T = c10::Half or c10::BFloat16.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<T, c10::BFloat16>, "mma_16816: float16 or bfloat16");
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats rounded to T and packed, `lo` in the low 16 bits (the lower column of an A fragment register).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (std::is_same_v<T, c10::Half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    r = *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    r = *reinterpret_cast<const uint32_t*>(&h);
  }
  return r;
}

// One float rounded to T, as its 16 bits.
template <typename T> __device__ __forceinline__ uint16_t bits(float x) {
  return static_cast<uint16_t>(pack2<T>(x, 0.f) & 0xffffu);
}

}  // namespace fastnn::cuda::mma
