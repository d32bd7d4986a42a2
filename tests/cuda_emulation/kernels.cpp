// The kernels and launchers of csrc/passes.cu, the very file nvcc compiles, built by the host
// compiler on top of the emulation's device built-ins.
#include "emulation/device.h"
#include "passes.cu"
