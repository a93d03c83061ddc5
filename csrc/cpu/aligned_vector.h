#pragma once
// A std::vector whose data starts on a cache line. The kernels' scratch buffers are read and written
// by AMX tile rows and 64-byte vector accesses; from malloc's 16-byte alignment, each such row
// straddles two lines, and a tile load of 16 rows that straddle runs several times slower (a
// scratch loop of tdpbf16ps over B tiles from L2: 5.4 ns a product aligned, 23-31 ns at malloc's
// alignment).

#include <cstddef>
#include <new>
#include <vector>

namespace pagedlm::cpu {

constexpr std::size_t kCacheLine = 64;

template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{kCacheLine}));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t{kCacheLine}); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};

template <typename T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

}  // namespace pagedlm::cpu
