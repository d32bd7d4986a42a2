// Small kernels that each break one rule of CUDA, to show that the emulation catches it, and one
// that keeps them all, to compare the emulated warp collectives with CUDA's semantics. Each runs
// as one block of 64 threads (two warps) on a float32 output of 4 x 64 elements.
#include <cuda_runtime_api.h>

#include <map>

#include "emulation/device.h"
#include "emulator.h"

namespace emulation::self_test {

constexpr int kThreads = 64;
using Out = Checked<float>;

// Reads a neighbour's shared-memory element with no barrier after the writes.
__global__ void missing_barrier(Out out) {
  SHARED_ARRAY(float, s, kThreads);
  s[threadIdx.x] = float(threadIdx.x);
  out[threadIdx.x] = s[(threadIdx.x + 1) % kThreads];
}

// A barrier in a branch that half of the block does not take.
__global__ void divergent_barrier(Out out) {
  if (threadIdx.x < kThreads / 2) __syncthreads();
  out[threadIdx.x] = 0.f;
}

// Half of each warp returns before a shuffle whose mask names the whole warp.
__global__ void inactive_lanes(Out out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

// Writes past the end of the output (thread 0 just one element past it).
__global__ void out_of_bounds(Out out) { out[4 * kThreads + threadIdx.x] = 0.f; }

// A 16-byte store 4 bytes past a 16-byte boundary.
__global__ void misaligned(Out out) {
  struct alignas(16) Vector {
    float v[4];
  };
  if (threadIdx.x == 0) write_as(out + 1, Vector{});
}

// Row 0: the butterfly sum of the lane numbers of a 16-lane segment, passed through shared memory
// to the mirrored thread; row 1: a shuffle with lane ^ 16 in 16-lane segments (the first
// segment reads a later one: its own value); row 2: this lane's bit of a ballot of lane % 3 == 0;
// row 3: __any_sync(lane == 31) + 2 * __all_sync(lane < 31).
__global__ void warp_semantics(Out out) {
  SHARED_ARRAY(float, s, kThreads);
  const int t = threadIdx.x, lane = t % 32;
  float sum = float(lane);
  for (int offset = 8; offset > 0; offset /= 2)
    sum += __shfl_xor_sync(0xffffffffu, sum, offset, 16);
  s[t] = sum;
  __syncthreads();
  out[t] = s[kThreads - 1 - t];
  out[kThreads + t] = __shfl_xor_sync(0xffffffffu, float(lane), 16, 16);
  out[2 * kThreads + t] = float(__ballot_sync(0xffffffffu, lane % 3 == 0) >> lane & 1);
  out[3 * kThreads + t] =
      float(__any_sync(0xffffffffu, lane == 31) + 2 * __all_sync(0xffffffffu, lane < 31));
}

}  // namespace emulation::self_test

namespace emulation {

void run_self_test(const std::string& name, const at::Tensor& out) {
  using namespace self_test;
  static const std::map<std::string, void (*)(Out)> kernels = {
      {"missing_barrier", &missing_barrier}, {"divergent_barrier", &divergent_barrier},
      {"inactive_lanes", &inactive_lanes},   {"out_of_bounds", &out_of_bounds},
      {"misaligned", &misaligned},           {"warp_semantics", &warp_semantics}};
  const auto kernel = kernels.find(name);
  TORCH_CHECK(kernel != kernels.end(), "emulation: no self-test kernel ", name);
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kFloat &&
                  out.numel() == 4 * kThreads,
              "emulation: a self test writes a contiguous float32 tensor of 4 x 64 elements");
  launch(kernel->second, dim3(1), dim3(kThreads), nullptr, Out(out.data_ptr<float>()));
}

}  // namespace emulation
