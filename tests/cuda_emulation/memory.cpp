// The memory checks of the emulation: a CPU allocator that records every allocation (the spans
// Checked pointers are checked against) and fills it with 0xff bytes, and the error for an access
// outside the allocation or misaligned.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <cstring>
#include <iterator>
#include <map>
#include <mutex>
#include <string>

#include "emulation/checked.h"
#include "emulator.h"

namespace emulation {
namespace {

// The live allocations of the tracking allocator: begin -> end.
class Allocations {
 public:
  void add(const void* p, size_t bytes) {
    const std::lock_guard<std::mutex> lock(mutex_);
    spans_[address(p)] = address(p) + bytes;
  }
  void remove(const void* p) {
    const std::lock_guard<std::mutex> lock(mutex_);
    spans_.erase(address(p));
  }
  Span holding(const void* p) const {
    const std::lock_guard<std::mutex> lock(mutex_);
    auto after = spans_.upper_bound(address(p));
    if (after == spans_.begin()) return {};
    const auto& [begin, end] = *std::prev(after);
    return address(p) <= end ? Span{begin, end} : Span{};
  }

 private:
  static uintptr_t address(const void* p) { return reinterpret_cast<uintptr_t>(p); }
  mutable std::mutex mutex_;
  std::map<uintptr_t, uintptr_t> spans_;
};

Allocations& allocations() {
  static auto* live = new Allocations();  // never destroyed: tensors may outlive static data
  return *live;
}

c10::DeleterFnPtr base_deleter = nullptr;

void release(void* p) {
  allocations().remove(p);
  base_deleter(p);
}

// The CPU allocator while the memory checks are on: the default one, plus records and 0xff.
class TrackingAllocator final : public c10::Allocator {
 public:
  explicit TrackingAllocator(c10::Allocator* base) : base_(base) {}
  c10::DataPtr allocate(size_t bytes) override {
    c10::DataPtr data = base_->allocate(bytes);
    if (data.get() == nullptr) return data;
    std::memset(data.get(), 0xff, bytes);
    allocations().add(data.get(), bytes);
    TORCH_CHECK(data.compare_exchange_deleter(base_deleter, &release),
                "emulation: the CPU allocator's memory cannot be tracked");
    return data;
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  c10::Allocator* base_;
};

}  // namespace

Span allocation_of(const void* p) { return p == nullptr ? Span{} : allocations().holding(p); }

void bad_access(uintptr_t address, size_t bytes, size_t align, Span span) {
  const std::string access = std::to_string(bytes) + "-byte access";
  if (address == 0) fail(access + " through a null pointer");
  if (span.begin == 0)
    fail(access + " at 0x" + c10::str(std::hex, address) +
         ", in no tensor allocated while the memory checks were on");
  const std::string at = " at byte " + std::to_string(int64_t(address - span.begin)) + " of a " +
                         std::to_string(span.end - span.begin) + "-byte allocation";
  if (address < span.begin || address + bytes > span.end) fail("out-of-bounds " + access + at);
  fail("misaligned " + access + at + " (it needs " + std::to_string(align) + "-byte alignment)");
}

void check_memory(bool on) {
  static c10::Allocator* base = c10::GetCPUAllocator();
  static TrackingAllocator tracking(base);
  if (base_deleter == nullptr) base_deleter = base->raw_deleter();
  TORCH_CHECK(base_deleter != nullptr, "emulation: the CPU allocator has no raw deleter");
  c10::SetCPUAllocator(on ? &tracking : base);
  TORCH_CHECK(c10::GetCPUAllocator() == (on ? &tracking : base),
              "emulation: another CPU allocator takes precedence");
}

}  // namespace emulation
