// launch(kernel, grid, block, stream, args...) for the emulation: runs the grid's blocks one
// after another, each block's threads as fibers of this thread (emulator.cpp).
#pragma once

#include <functional>
#include <tuple>
#include <type_traits>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

namespace emulation {

// Runs `thread` (one thread's call of the kernel) for every thread of the grid; `kernel` names
// the kernel in error messages.
void run_grid(const void* kernel, dim3 grid, dim3 block, const std::function<void()>& thread);

// kernel<<<grid, block, 0, stream>>>(args...), on the CPU; the stream is ignored.
template <typename... Params, typename... Args, typename Stream>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Stream, const Args&... args) {
  const std::tuple<std::decay_t<Params>...> params(args...);
  run_grid(reinterpret_cast<const void*>(kernel), grid, block,
           [&] { std::apply(kernel, params); });
}

}  // namespace emulation

using emulation::launch;
