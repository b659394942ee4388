#include "cpu/alloc.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <sys/mman.h>

#include <cstdlib>

namespace fastnn::cpu {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;

void free_huge(void* p) { std::free(p); }

struct HugePageAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n < kHugePage) return c10::GetCPUAllocator()->allocate(n);
    const size_t size = (n + kHugePage - 1) / kHugePage * kHugePage;
    void* p = std::aligned_alloc(kHugePage, size);
    TORCH_CHECK(p != nullptr, "fastnn: out of memory allocating ", n, " bytes");
#ifdef MADV_HUGEPAGE
    madvise(p, size, MADV_HUGEPAGE);  // advice only: failure (THP off) leaves ordinary pages
#endif
    return {p, p, &free_huge, c10::Device(c10::DeviceType::CPU)};
  }
  // Mixed deleters (small buffers come from c10's allocator), so no single raw deleter.
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

HugePageAllocator g_allocator;

}  // namespace

at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::detail::empty_generic(sizes, &g_allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::MemoryFormat::Contiguous);
}

}  // namespace fastnn::cpu
