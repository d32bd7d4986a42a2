// The CUDA built-ins of device code, for the host compiler: what nvcc makes of a .cu file's
// kernels, the emulation makes of it after including this header. Thread and block indices,
// __syncthreads() as a barrier of the block's threads, warp shuffles and votes executed
// together by the lanes of the mask, and SHARED_ARRAY, the block's shared memory with a check
// for races between threads (emulator.cpp does the work).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "launch.h"

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)

using std::max;
using std::min;

namespace emulation {

const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

// Waits until every thread of the block reaches this barrier (the same call site).
void barrier(const char* file, int line);

enum class WarpOp { kShuffleXor, kBallot };
// A warp collective: waits for every lane of `mask` at this call site, then returns this lane's
// result: the value of lane (lane ^ arg) for a shuffle (width: its segment), the lanes whose
// value is not 0 for a ballot.
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width,
                         const char* file, int line);

// What one shared-memory element has seen in the current block: the last write, and the reads
// since the last barrier.
struct AccessLog {
  uint64_t block = 0;  // the block these entries belong to
  uint32_t write_epoch = 0, read_epoch = 0;
  int writer = -1, reader = -1;  // thread numbers; reader -2: several threads
};
// Records a read (write) of element `index` of the shared array `array`; raises the error for a
// race with another thread of the block (no barrier in between) or a read of an unwritten one.
void note_read(AccessLog& log, const char* array, int64_t index);
void note_write(AccessLog& log, const char* array, int64_t index);
// Raises the error for an index outside a shared array of `size` elements.
[[noreturn]] void bad_shared_index(const char* array, int64_t index, int64_t size);

// __shared__ T name[N]: one per block (blocks run one at a time on a thread), race-checked.
template <typename T, int N>
class SharedArray {
 public:
  explicit SharedArray(const char* name) : name_(name) {}

  class Element {
   public:
    Element(SharedArray& a, int64_t i) : array_(a), index_(i) {}
    operator T() const {
      note_read(array_.log_[index_], array_.name_, index_);
      return array_.values_[index_];
    }
    Element& operator=(T v) {
      note_write(array_.log_[index_], array_.name_, index_);
      array_.values_[index_] = v;
      return *this;
    }

   private:
    SharedArray& array_;
    int64_t index_;
  };

  Element operator[](int64_t i) {
    if (i < 0 || i >= N) bad_shared_index(name_, i, N);
    return {*this, i};
  }

 private:
  T values_[N];
  AccessLog log_[N];
  const char* name_;
};

// A value's bits and back, to pass it through a warp collective.
template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace emulation

#define threadIdx (::emulation::thread_idx())
#define blockIdx (::emulation::block_idx())
#define blockDim (::emulation::block_dim())
#define gridDim (::emulation::grid_dim())
#define SHARED_ARRAY(T, name, size) \
  static thread_local ::emulation::SharedArray<T, (size)> name(#name)

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  emulation::barrier(file, line);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                  const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return emulation::from_bits<T>(emulation::warp_collective(
      emulation::WarpOp::kShuffleXor, mask, emulation::to_bits(var), lane_mask, width, file,
      line));
}

inline unsigned __ballot_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return unsigned(emulation::warp_collective(emulation::WarpOp::kBallot, mask, predicate != 0,
                                             0, 32, file, line));
}
inline int __any_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return __ballot_sync(mask, predicate, file, line) != 0;
}
inline int __all_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return __ballot_sync(mask, predicate, file, line) == mask;
}
