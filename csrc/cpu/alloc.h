// Output allocation of the CPU kernels.
//
// A fresh large tensor can cost more to fault in than the kernel costs to fill it: every 4 KiB page takes a page
// fault and a zeroing in the kernel (docs/measurements.md, "CPU allocator"). Buffers of 2 MiB and more are therefore
// allocated 2 MiB-aligned and marked MADV_HUGEPAGE, so transparent huge pages back them where the kernel offers
// THP in "madvise" or "always" mode; elsewhere the advice is a no-op. Freed blocks are kept (up to a bound) for
// the next request of the same size, so per-step buffers are faulted in once (alloc.cpp). The tensors are
// ordinary resizable CPU tensors whose storage uses this allocator.
#pragma once
#include <ATen/core/Tensor.h>

namespace fastnn::cpu {

// at::empty(sizes, options) with the huge-page allocator (contiguous, CPU).
at::Tensor hugepage_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees every block the allocator keeps for reuse (fastnn.empty_cpu_cache).
void empty_cache();

}  // namespace fastnn::cpu
