// basisattn/core/workspace.hpp - the one workspace carver of the library (internal, basisattn::detail).
//
// Every run that takes caller-owned memory lays its buffers out with a workspace_carver, in two passes
// over the same sequence of sizes: the size query counts (no base pointer), the run hands out
// pointers (or byte offsets) into the caller's memory. Each region starts at a multiple of the
// carver's alignment (64 bytes on the CPU: a cache line and an AVX-512 vector; 256 bytes on CUDA:
// what cuBLASLt and cuFFT want). The caller's pointer need not be aligned: the count includes
// align - 1 bytes of slack for moving it up, so `bytes()` of the counting pass is always enough.
#pragma once

#include <basisattn/core/config.hpp>
#include <basisattn/core/error.hpp>

#include <cstddef>
#include <cstdint>

BASISATTN_BEGIN_NAMESPACE
namespace detail {

/// x rounded up to a multiple of a (a > 0).
constexpr std::size_t align_up(std::size_t x, std::size_t a) { return (x + a - 1) / a * a; }

/// CPU workspaces: 64-byte regions. CUDA workspaces: 256-byte regions.
inline constexpr std::size_t cpu_workspace_align = 64;
inline constexpr std::size_t cuda_workspace_align = 256;

class workspace_carver {
 public:
  /// Counting pass: no memory, offsets and the total (slack for the base pointer included).
  explicit workspace_carver(std::size_t align) : align_(align), offset_(align - 1) {}
  /// Carving pass over the caller's memory at `base` (moved up to the alignment). With `limit` (the
  /// caller's byte count), a region that would end past it raises errc::invalid_argument: a size
  /// query and a run that disagree are caught instead of writing past the caller's memory.
  workspace_carver(std::size_t align, void* base, std::size_t limit = SIZE_MAX)
      : align_(align), base_(static_cast<unsigned char*>(base)), limit_(limit) {
    if (base_) {
      const auto p = reinterpret_cast<std::uintptr_t>(base_);
      offset_ = static_cast<std::size_t>(align_up(p, align_) - p);
    } else {
      offset_ = align_ - 1;
    }
  }

  /// Layout pass for regions placed at an already aligned address (per-thread slices of a
  /// workspace): offsets start at 0 and no slack is counted.
  static workspace_carver relative(std::size_t align) {
    workspace_carver c(align);
    c.offset_ = 0;
    return c;
  }

  /// A new region of `bytes` bytes (an empty one takes no space): its byte offset from the caller's
  /// base pointer.
  std::size_t take(std::size_t bytes) {
    const std::size_t at = offset_;
    offset_ += align_up(bytes, align_);
    taken_ = taken_ || bytes > 0;
    BASISATTN_REQUIRE(!base_ || at + bytes <= limit_, invalid_argument, "internal: a workspace of ", limit_,
                      " bytes is exhausted at byte ", at + bytes);
    return at;
  }
  /// A new region of n elements of T: its pointer (nullptr in the counting pass or when n == 0).
  template <class T>
  T* take_elems(index_t n) {
    const std::size_t bytes = static_cast<std::size_t>(n) * sizeof(T);
    const std::size_t at = take(bytes);
    return base_ && bytes ? reinterpret_cast<T*>(base_ + at) : nullptr;
  }
  /// Pointer at a byte offset returned by take (the carving pass only).
  template <class T>
  T* at(std::size_t offset) const {
    return reinterpret_cast<T*>(base_ + offset);
  }
  /// Bytes used so far, slack included: the workspace size to ask of the caller (0 while every
  /// region is empty: then the caller may pass no memory at all).
  std::size_t bytes() const { return taken_ ? offset_ : 0; }
  std::size_t alignment() const { return align_; }

 private:
  std::size_t align_ = 1;
  unsigned char* base_ = nullptr;
  std::size_t limit_ = SIZE_MAX;
  std::size_t offset_ = 0;
  bool taken_ = false;
};

/// Per-thread slices of a caller's workspace (the CPU runs: one slice of scratch per thread). The
/// slices follow the caller's pointer moved up to the alignment; `count` of them fit.
struct workspace_slices {
  unsigned char* base = nullptr;
  std::size_t slice = 0;  ///< bytes per slice (a multiple of the alignment)
  std::size_t count = 0;  ///< slices that fit (0: the workspace is too small or null)
  unsigned char* operator[](std::size_t i) const { return base + i * slice; }
};

/// Bytes to ask of the caller for `count` slices of `slice` bytes: the slices plus align - 1 bytes of
/// slack for an unaligned pointer.
constexpr std::size_t sliced_workspace_bytes(std::size_t slice, std::size_t count, std::size_t align) {
  return slice * count + align - 1;
}

/// Cuts the caller's workspace into slices of `slice` bytes after aligning its start.
inline workspace_slices slice_workspace(void* workspace, std::size_t bytes, std::size_t slice, std::size_t align) {
  workspace_slices w;
  w.slice = slice;
  if (!workspace || slice == 0) return w;
  const auto p = reinterpret_cast<std::uintptr_t>(workspace);
  const std::size_t pad = static_cast<std::size_t>(align_up(p, align) - p);
  if (bytes < pad) return w;
  w.base = static_cast<unsigned char*>(workspace) + pad;
  w.count = (bytes - pad) / slice;
  return w;
}

}  // namespace detail
BASISATTN_END_NAMESPACE
