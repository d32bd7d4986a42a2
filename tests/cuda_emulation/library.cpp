// torch.ops.cbam_kernels_emulated: the six ops of csrc/ops.cpp for CPU tensors, running the
// emulated kernels, and the emulator's controls.
#include <torch/library.h>

#include "emulator.h"
#include "ops.h"

TORCH_LIBRARY(cbam_kernels_emulated, m) {
  cbam::define_ops(m);
  m.def("check_memory(bool on) -> ()", &emulation::check_memory);
  m.def("take_launched_kernels() -> str[]", &emulation::take_launched_kernels);
  m.def("run_self_test(str name, Tensor out) -> ()", &emulation::run_self_test);
}

TORCH_LIBRARY_IMPL(cbam_kernels_emulated, CPU, m) { cbam::impl_ops(m); }
