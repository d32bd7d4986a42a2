// The extension module cbam_kernels._C: registers the ops of ops.cpp for CUDA tensors as
// torch.ops.cbam_kernels_cuda, with has_kernel_image, which tells whether the kernels run on a
// GPU.
#include <Python.h>

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops.h"
#include "passes.h"

extern "C" {
// An empty module `cbam_kernels._C`: importing it loads this library, whose static initializers
// register the ops below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {

bool has_kernel_image(int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  return cbam::has_kernel_image();
}

}  // namespace

TORCH_LIBRARY(cbam_kernels_cuda, m) {
  cbam::define_ops(m);
  m.def("has_kernel_image(int device) -> bool", &has_kernel_image);
}

TORCH_LIBRARY_IMPL(cbam_kernels_cuda, CUDA, m) { cbam::impl_ops(m); }
