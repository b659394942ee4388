// The CPU's floating-point ceiling for float32 matrix products: independent AVX-512 FMA chains held in registers
// (no memory operands), on 1..N OpenMP threads. No GEMM can beat it, so it bounds any product-bound CPU bench.
//
//   g++ -O2 -mavx512f -fopenmp tools/cpu_fma_peak.cpp -o /tmp/cpu_fma_peak && /tmp/cpu_fma_peak [THREADS] [RUNS]
#include <immintrin.h>
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>

int main(int argc, char** argv) {
  const int threads = argc > 1 ? atoi(argv[1]) : omp_get_max_threads();
  const int runs = argc > 2 ? atoi(argv[2]) : 5;
  constexpr int kChains = 12;  // more independent chains than FMA latency x issue width: throughput, not latency
  const long rounds = 200000000L / kChains;
  for (int run = 0; run < runs; ++run) {
    float sink = 0;
    const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
      __m512 acc[kChains];
      for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(1.0f + i * 1e-3f);
      const __m512 b = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
      for (long r = 0; r < rounds; ++r) {
#pragma GCC unroll 12
        for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(acc[i], b, c);
      }
      __m512 s = acc[0];
      for (int i = 1; i < kChains; ++i) s = _mm512_add_ps(s, acc[i]);
      sink += _mm512_reduce_add_ps(s);  // keeps the chains live
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double flops = 2.0 * 16 * kChains * rounds * threads;
    printf("threads %d: %.1f GFLOP/s (checksum %g)\n", threads, flops / seconds / 1e9, sink);
  }
  return 0;
}
