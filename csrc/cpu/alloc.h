// Output allocation of the CPU kernels.
//
// On this class of machine a fresh large tensor costs more to fault in than the kernel costs to fill it: every
// 4 KiB page takes a page fault and a zeroing in the kernel (measured: 512 MiB empty+fill 1376 ms with 4 KiB
// pages, 157 ms with 2 MiB pages, on a loaded 2-core machine). Buffers of 2 MiB and more are therefore
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
