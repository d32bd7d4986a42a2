// The CUDA runtime API as the CPU emulation of the kernels needs it: dim3, streams, launches
// (emulation/launch.h), checked pointers in place of device pointers (emulation/checked.h).
#pragma once

#include "emulation/checked.h"
#include "emulation/launch.h"

using cudaStream_t = struct CUstream_st*;  // ignored: the emulation runs each launch at once

enum cudaError_t { cudaSuccess = 0 };
struct cudaFuncAttributes {};

// Every kernel has an image in the emulation.
template <typename Kernel>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes*, Kernel*) {
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
