// Output allocation of the CPU kernels: a caching allocator for large buffers, as torch's CUDA allocator is.
//
// A fresh large tensor is faulted in page by page and zeroed by the OS on first touch, which costs about as much
// as a memory-bound kernel's own pass over it. torch's CPU allocator hands large blocks back to the OS at every
// free, so a training loop pays those faults again every step. fastnn's kernels allocate their outputs here
// instead: blocks of 2 MiB and more are kept when freed and handed to the next request they fit, so a loop's
// per-step buffers (the same shapes, or similar ones, every step) are faulted in once. The tensors are ordinary
// resizable CPU tensors whose storage uses this allocator. docs/measurements.md ("CPU allocator") has the
// measurements behind each choice.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstddef>

namespace fastnn::cpu {

// at::empty(sizes, options) from the caching allocator (contiguous, CPU).
at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees every block the allocator keeps for reuse (fastnn.empty_cpu_cache).
void empty_cache();

struct CacheStats {
  size_t held_bytes, limit_bytes, hits, misses, evictions;
};
CacheStats cache_stats();  // fastnn.cpu_cache_info

}  // namespace fastnn::cpu
