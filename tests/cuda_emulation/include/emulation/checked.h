// Checked<T>, the emulation's stand-in for a device pointer (cbam::Ptr<T> in csrc/passes.h):
// every access is checked against the allocation the pointer was made from (bounds) and its
// type (alignment, 16 bytes for a 16-byte vector).
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace emulation {

// A tracked allocation [begin, end) (memory.cpp); {0, 0} for none.
struct Span {
  uintptr_t begin = 0, end = 0;
};

// The tracked allocation that holds p (or ends at p), or {0, 0}.
Span allocation_of(const void* p);
// Raises the error for an access of `bytes` at `address` that leaves `span` or is misaligned.
[[noreturn]] void bad_access(uintptr_t address, size_t bytes, size_t align, Span span);

template <typename T>
class Checked {
 public:
  Checked(std::nullptr_t = nullptr) {}  // NOLINT: implicit, like a null pointer
  Checked(T* p)                         // NOLINT: implicit, where a raw pointer becomes checked
      : address_(reinterpret_cast<uintptr_t>(p)), span_(allocation_of(p)) {}

  Checked operator+(int64_t k) const {
    Checked moved = *this;
    moved.address_ += k * int64_t(sizeof(T));
    return moved;
  }
  T& operator[](int64_t k) const { return (*this + k).template as<T>(); }
  operator const void*() const { return reinterpret_cast<const void*>(address_); }

  // The object of type U at this address, once checked to lie in the allocation and aligned.
  template <typename U>
  U& as() const {
    if (address_ < span_.begin || address_ + sizeof(U) > span_.end || address_ % alignof(U) != 0)
      bad_access(address_, sizeof(U), alignof(U), span_);
    return *reinterpret_cast<U*>(address_);
  }

 private:
  uintptr_t address_ = 0;
  Span span_;
};

// read_as and write_as of csrc/passes.cuh for checked pointers.
template <typename P, typename T>
P read_as(Checked<const T> p) {
  return p.template as<const P>();
}
template <typename P, typename T>
void write_as(Checked<T> p, const P& v) {
  static_assert(!std::is_const_v<T>, "a write through a pointer to const");
  p.template as<P>() = v;
}

}  // namespace emulation
