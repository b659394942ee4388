#include "cpu/alloc.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>

namespace fastnn::cpu {
namespace {

constexpr size_t kBlock = size_t(2) << 20;  // smaller requests go to torch's allocator (glibc reuses them itself)

// The cache's bound: FASTNN_CPU_CACHE_MB if set (0 turns the cache off), else a quarter of physical memory, so
// that a step's buffers fit (a 4096 x 32000 float32 softmax alone frees two 500 MiB blocks per step) while the
// process keeps most of the machine for everything else.
size_t cache_limit() {
  const char* env = std::getenv("FASTNN_CPU_CACHE_MB");
  if (env != nullptr && *env != '\0') {
    char* end = nullptr;
    const unsigned long long mb = std::strtoull(env, &end, 10);
    TORCH_CHECK(*end == '\0' && env[0] != '-', "FASTNN_CPU_CACHE_MB must be a whole number of MiB, got '", env, "'");
    return size_t(mb) << 20;
  }
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page > 0 ? size_t(pages) * size_t(page) / 4 : size_t(1) << 30;
}

// Freed blocks by size. A request takes the smallest kept block that fits it with at most 1/8 to spare, so a
// loop whose shapes vary a little from step to step (a translator's batches of different lengths) still reuses
// its blocks without a small request pinning a much larger one. A block that would pass the bound evicts the
// longest-kept ones first: the newest blocks are the ones the next step asks for.
class BlockCache {
 public:
  BlockCache() : limit_(cache_limit()) {}

  // A kept block of at least `size` bytes and its size, or {nullptr, 0}.
  std::pair<void*, size_t> take(size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = free_.lower_bound(size);
    if (it == free_.end() || it->first > size + size / 8) {
      ++misses_;
      return {nullptr, 0};
    }
    const std::pair<void*, size_t> block{it->second.p, it->first};
    held_ -= it->first;
    free_.erase(it);
    ++hits_;
    return block;
  }

  // False when the block alone exceeds the bound: the caller frees it.
  bool keep(void* p, size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (size > limit_) return false;
    while (held_ + size > limit_) evict_oldest();
    free_.emplace(size, Kept{p, ++clock_});
    held_ += size;
    return true;
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& [size, k] : free_) std::free(k.p);
    free_.clear();
    held_ = 0;
  }

  CacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {held_, limit_, hits_, misses_, evictions_};
  }

 private:
  struct Kept {
    void* p;
    uint64_t freed_at;
  };
  void evict_oldest() {  // a linear scan: the cache holds tens of blocks, and evictions are rare
    auto oldest = free_.begin();
    for (auto it = free_.begin(); it != free_.end(); ++it)
      if (it->second.freed_at < oldest->second.freed_at) oldest = it;
    std::free(oldest->second.p);
    held_ -= oldest->first;
    free_.erase(oldest);
    ++evictions_;
  }

  std::mutex mutex_;
  std::multimap<size_t, Kept> free_;
  size_t held_ = 0;
  const size_t limit_;
  uint64_t clock_ = 0, hits_ = 0, misses_ = 0, evictions_ = 0;
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

void free_block(void* ctx) {
  Block* b = static_cast<Block*>(ctx);
  if (!cache().keep(b->p, b->size)) std::free(b->p);
  delete b;
}

struct CachingAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n < kBlock) return c10::GetCPUAllocator()->allocate(n);
    // Whole 2 MiB units, 2 MiB-aligned: blocks of neighbouring sizes share a size, and transparent huge pages
    // can back them where the system hands them out unasked (THP "always").
    const size_t want = (n + kBlock - 1) / kBlock * kBlock;
    auto [p, size] = cache().take(want);
    if (p == nullptr) {
      size = want;
      p = std::aligned_alloc(kBlock, size);
      TORCH_CHECK(p != nullptr, "fastnn: out of memory allocating ", n, " bytes");
    }
    return {p, new Block{p, size}, &free_block, c10::Device(c10::DeviceType::CPU)};
  }
  // Mixed deleters (small buffers come from c10's allocator), so no single raw deleter.
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

CachingAllocator g_allocator;

}  // namespace

at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::detail::empty_generic(sizes, &g_allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::MemoryFormat::Contiguous);
}

void empty_cache() { cache().clear(); }

CacheStats cache_stats() { return cache().stats(); }

}  // namespace fastnn::cpu
