// The torch ops of the six passes (ops.cpp), to be registered in a library: bindings.cpp registers
// them for CUDA tensors as torch.ops.cbam_kernels_cuda, the CPU emulation of the kernels
// (tests/cuda_emulation) for CPU tensors under a namespace of its own.
#pragma once

#include <torch/library.h>

namespace cbam {

// Defines the schemas of the six ops in the library `m`.
void define_ops(torch::Library& m);
// Registers the implementations of the six ops in `m` (a TORCH_LIBRARY_IMPL for one device).
void impl_ops(torch::Library& m);

}  // namespace cbam
