#include "cpu/alloc.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <sys/mman.h>

#include <cstdlib>
#include <map>
#include <mutex>

namespace fastnn::cpu {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;

// Freed blocks wait here for a request of the same rounded size, so a training loop's per-step buffers (the
// same shapes every step) are faulted in once, not every step (docs/measurements.md, "CPU allocator"). Bounded, since the memory stays with the process: FASTNN_CPU_CACHE_MB (default
// 256, 0 turns the cache off); fastnn.empty_cpu_cache() frees what it holds.
class BlockCache {
 public:
  BlockCache() {
    const char* env = std::getenv("FASTNN_CPU_CACHE_MB");
    if (env == nullptr || *env == '\0') return;
    char* end = nullptr;
    const unsigned long long mb = std::strtoull(env, &end, 10);
    TORCH_CHECK(*end == '\0' && env[0] != '-', "FASTNN_CPU_CACHE_MB must be a whole number of MiB, got '", env, "'");
    limit_ = size_t(mb) << 20;
  }
  void* take(size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = free_.find(size);
    if (it == free_.end()) return nullptr;
    void* p = it->second;
    free_.erase(it);
    held_ -= size;
    return p;
  }
  // False when the block does not fit the bound: the caller frees it.
  bool keep(void* p, size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (held_ + size > limit_) return false;
    free_.emplace(size, p);
    held_ += size;
    return true;
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& [size, p] : free_) std::free(p);
    free_.clear();
    held_ = 0;
  }

 private:
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  size_t held_ = 0, limit_ = size_t(256) << 20;
};

// Never destroyed: tensors may be freed during static destruction, after a static cache would be gone.
BlockCache& cache() {
  static BlockCache* c = new BlockCache();
  return *c;
}

struct Block {
  void* p;
  size_t size;
};

void free_huge(void* ctx) {
  Block* b = static_cast<Block*>(ctx);
  if (!cache().keep(b->p, b->size)) std::free(b->p);
  delete b;
}

// On this class of machine a fresh large tensor costs more to fault in than the kernel costs to fill it (see
// alloc.h): buffers of 2 MiB and more are 2 MiB-aligned and marked MADV_HUGEPAGE, and reused through the cache.
struct HugePageAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n < kHugePage) return c10::GetCPUAllocator()->allocate(n);
    const size_t size = (n + kHugePage - 1) / kHugePage * kHugePage;
    void* p = cache().take(size);
    if (p == nullptr) {
      p = std::aligned_alloc(kHugePage, size);
      TORCH_CHECK(p != nullptr, "fastnn: out of memory allocating ", n, " bytes");
#ifdef MADV_HUGEPAGE
      madvise(p, size, MADV_HUGEPAGE);  // advice only: failure (THP off) leaves ordinary pages
#endif
    }
    return {p, new Block{p, size}, &free_huge, c10::Device(c10::DeviceType::CPU)};
  }
  // Mixed deleters (small buffers come from c10's allocator), so no single raw deleter.
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

HugePageAllocator g_allocator;

}  // namespace

at::Tensor hugepage_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::detail::empty_generic(sizes, &g_allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::MemoryFormat::Contiguous);
}

void empty_cache() { cache().clear(); }

}  // namespace fastnn::cpu
