// The emulator's host-side interface (emulator.cpp, memory.cpp, self_test.cpp), for the op
// library of the emulation (library.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

namespace emulation {

// Raises the emulation's error; inside a kernel it names the kernel, the block and the thread.
[[noreturn]] void fail(const std::string& message);

// The kernels launched since the last call, by name (with their template arguments).
std::vector<std::string> take_launched_kernels();

// Turns the memory checks on or off: while on, every CPU tensor is allocated through a tracking
// allocator (what Checked pointers are checked against), its bytes set to 0xff first, so that an
// element a kernel fails to write reads as NaN (or -1).
void check_memory(bool on);

// Runs the self-test kernel `name` (self_test.cpp) on `out`, a float32 tensor of 64 elements.
void run_self_test(const std::string& name, const at::Tensor& out);

}  // namespace emulation
