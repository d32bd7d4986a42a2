// The emulator: runs a grid's blocks one after another; a block's threads are fibers (ucontext)
// of the calling thread, each running until it finishes or waits at a barrier or a warp
// collective, which completes when every thread (lane) it waits for has arrived. Everything
// that breaks CUDA's rules for these is an error naming the kernel, block and thread.
#include <c10/util/Exception.h>
#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "emulation/device.h"
#include "emulator.h"

namespace emulation {
namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;                   // per block, as on every GPU
constexpr unsigned kMaxGridYZ = 65535;
constexpr size_t kStackBytes = size_t(256) << 10;  // per fiber
constexpr int kSeveralReaders = -2;

enum class State { kRunnable, kAtBarrier, kAtCollective, kDone };

// Where a thread waits, and for a warp collective its operands and result.
struct Wait {
  const char* file = nullptr;
  int line = 0;
  WarpOp op = WarpOp::kShuffleXor;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int arg = 0, width = kWarpSize;
};

struct Thread {
  dim3 idx;
  int id = 0;
  State state = State::kRunnable;
  Wait wait;
  ucontext_t context;
};

// A fiber stack with a guard page below it, so that an overflow faults instead of corrupting.
class Stack {
 public:
  Stack() {
    base_ = static_cast<char*>(mmap(nullptr, kStackBytes + kGuard, PROT_READ | PROT_WRITE,
                                    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    TORCH_CHECK(base_ != MAP_FAILED, "emulation: no memory for a fiber stack");
    mprotect(base_, kGuard, PROT_NONE);
  }
  ~Stack() { munmap(base_, kStackBytes + kGuard); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  char* top() const { return base_ + kGuard; }

 private:
  static constexpr size_t kGuard = 4096;
  char* base_;
};

// The launch running on this thread: its geometry, the block being run and its threads.
struct Grid {
  std::string kernel;
  dim3 grid, block, block_idx;
  const std::function<void()>* body = nullptr;
  std::vector<Thread> threads;
  Thread* current = nullptr;
  uint64_t block_serial = 0;  // unique per block run, for the shared-memory logs
  uint32_t epoch = 0;         // barriers completed in this block
  int at_barrier = 0, done = 0;
  ucontext_t scheduler;
  std::exception_ptr error;
};

thread_local Grid* running = nullptr;
thread_local std::vector<std::unique_ptr<Stack>> stacks;
thread_local uint64_t blocks_run = 0;

std::mutex log_mutex;
std::vector<std::string> launched;

Grid& grid() {
  TORCH_CHECK(running != nullptr, "emulation: a device built-in used outside a kernel");
  return *running;
}

std::string demangled(const void* kernel) {
  Dl_info info;
  if (dladdr(kernel, &info) == 0 || info.dli_sname == nullptr) return "a kernel";
  int status = 0;
  std::unique_ptr<char, decltype(&std::free)> name(
      abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status), &std::free);
  return status == 0 ? name.get() : info.dli_sname;
}

std::string where(const char* file, int line) {
  const std::string path = file;
  return path.substr(path.find_last_of('/') + 1) + ":" + std::to_string(line);
}

std::string describe(const Thread& t) {
  std::ostringstream out;
  out << "thread (" << t.idx.x << "," << t.idx.y << "," << t.idx.z << ") (warp "
      << t.id / kWarpSize << " lane " << t.id % kWarpSize << ")";
  return out.str();
}

std::string state_of(const Thread& t) {
  switch (t.state) {
    case State::kRunnable: return "runs";
    case State::kDone: return "has exited";
    case State::kAtBarrier:
      return "waits at __syncthreads() (" + where(t.wait.file, t.wait.line) + ")";
    case State::kAtCollective:
      return "waits at a warp collective (" + where(t.wait.file, t.wait.line) + ")";
  }
  return "";
}

void yield(Grid& g, Thread& t) { swapcontext(&t.context, &g.scheduler); }

// Whether u waits at a warp collective for t (a lane of its mask).
bool waits_for(const Thread& u, const Thread& t) {
  return u.state == State::kAtCollective && u.id / kWarpSize == t.id / kWarpSize &&
         (u.wait.mask >> (t.id % kWarpSize) & 1);
}

// Errors at a thread's exit: threads that wait for it at a barrier or a warp collective.
void check_exit(const Grid& g, const Thread& t) {
  for (const Thread& u : g.threads) {
    if (u.state == State::kAtBarrier)
      fail("exits, but " + describe(u) + " " + state_of(u) +
           ": a barrier must be reached by every thread of the block");
    if (waits_for(u, t))
      fail("exits, but " + describe(u) + " " + state_of(u) +
           " with a mask that holds this thread (an inactive lane in the mask)");
  }
}

void fiber_main() {
  Grid& g = *running;
  Thread& t = *g.current;
  try {
    (*g.body)();
    t.state = State::kDone;
    ++g.done;
    check_exit(g, t);
  } catch (...) {
    g.error = std::current_exception();
  }
  t.state = State::kDone;
}  // returns to g.scheduler (uc_link)

void start(Grid& g, Thread& t, char* stack) {
  t.state = State::kRunnable;
  getcontext(&t.context);
  t.context.uc_stack.ss_sp = stack;
  t.context.uc_stack.ss_size = kStackBytes;
  t.context.uc_link = &g.scheduler;
  makecontext(&t.context, fiber_main, 0);
}

// The error when no thread can run and some have not finished.
[[noreturn]] void deadlock(const Grid& g) {
  std::ostringstream out;
  out << "the block cannot go on:";
  for (const Thread& t : g.threads) {
    if (t.state != State::kDone) out << "\n  " << describe(t) << " " << state_of(t);
  }
  fail(out.str());
}

void run_block(Grid& g) {
  g.block_serial = ++blocks_run;
  g.epoch = 0;
  g.at_barrier = g.done = 0;
  for (size_t i = 0; i < g.threads.size(); ++i) start(g, g.threads[i], stacks[i]->top());
  while (g.done < int(g.threads.size())) {
    bool ran = false;
    for (Thread& t : g.threads) {
      if (t.state != State::kRunnable) continue;
      g.current = &t;
      swapcontext(&g.scheduler, &t.context);
      g.current = nullptr;
      if (g.error) std::rethrow_exception(g.error);
      ran = true;
    }
    if (!ran) deadlock(g);
  }
}

void check_geometry(dim3 grid, dim3 block) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  TORCH_CHECK(grid.x > 0 && grid.y > 0 && grid.z > 0 && threads > 0,
              "emulation: a launch with an empty grid or block (invalid configuration)");
  TORCH_CHECK(grid.y <= kMaxGridYZ && grid.z <= kMaxGridYZ && grid.x < (1u << 31),
              "emulation: grid (", grid.x, ", ", grid.y, ", ", grid.z, ") exceeds the limits");
  TORCH_CHECK(threads <= kMaxThreads && block.z <= 64,
              "emulation: block (", block.x, ", ", block.y, ", ", block.z,
              ") exceeds the limits");
}

// The lanes of `mask` in t's warp, checked: t among them, each one existing and not exited or
// waiting elsewhere; returns whether all of them have arrived at t's collective.
bool all_lanes_arrived(Grid& g, const Thread& t) {
  const int base = t.id / kWarpSize * kWarpSize;
  const int lanes = std::min<int>(kWarpSize, int(g.threads.size()) - base);
  const unsigned mask = t.wait.mask;
  if (!(mask >> (t.id - base) & 1))
    fail("calls a warp collective (" + where(t.wait.file, t.wait.line) + ") with mask 0x" +
         c10::str(std::hex, mask) + ", which leaves it out");
  bool all = true;
  for (int lane = 0; lane < kWarpSize; ++lane) {
    if (!(mask >> lane & 1)) continue;
    if (lane >= lanes)
      fail("mask 0x" + c10::str(std::hex, mask) + " names lane " + std::to_string(lane) +
           ", but the warp has " + std::to_string(lanes) + " lanes");
    const Thread& u = g.threads[base + lane];
    const bool same = u.state == State::kAtCollective && u.wait.file == t.wait.file &&
                      u.wait.line == t.wait.line;
    if (u.state == State::kDone || u.state == State::kAtBarrier ||
        (u.state == State::kAtCollective && !same))
      fail("waits at a warp collective (" + where(t.wait.file, t.wait.line) + ") with mask 0x" +
           c10::str(std::hex, mask) + ", but lane " +
           std::to_string(lane) + " " + state_of(u) + " (an inactive lane in the mask)");
    if (same && u.wait.mask != mask)
      fail("lanes meet at a warp collective (" + where(t.wait.file, t.wait.line) +
           ") with masks 0x" + c10::str(std::hex, mask) + " and 0x" +
           c10::str(std::hex, u.wait.mask));
    all = all && same;
  }
  return all;
}

// Lane t's result of the completed collective.
uint64_t result_of(const Grid& g, const Thread& t) {
  const int base = t.id / kWarpSize * kWarpSize, lane = t.id - base;
  const Wait& w = t.wait;
  if (w.op == WarpOp::kBallot) {
    uint64_t bits = 0;
    for (int l = 0; l < kWarpSize; ++l) {
      if (w.mask >> l & 1) bits |= uint64_t(g.threads[base + l].wait.value != 0) << l;
    }
    return bits;
  }
  if (w.width < 1 || w.width > kWarpSize || (w.width & (w.width - 1)) != 0)
    fail("__shfl_xor_sync with width " + std::to_string(w.width) +
         " (a power of two up to 32)");
  const int source = lane ^ w.arg;
  if (source >= (lane / w.width + 1) * w.width) return w.value;  // a later segment: own value
  if (source < 0 || !(w.mask >> source & 1))
    fail(describe(t) + " shuffles from lane " + std::to_string(source) +
         ", which is not in the mask 0x" + c10::str(std::hex, w.mask));
  return g.threads[base + source].wait.value;
}

}  // namespace

void fail(const std::string& message) {
  if (running == nullptr) TORCH_CHECK(false, "emulation: ", message);
  const Grid& g = *running;
  const std::string thread = g.current != nullptr ? " " + describe(*g.current) : "";
  TORCH_CHECK(false, "emulation: in ", g.kernel, ", block (", g.block_idx.x, ",", g.block_idx.y,
              ",", g.block_idx.z, ")", thread, ": ", message);
}

void run_grid(const void* kernel, dim3 grid_size, dim3 block, const std::function<void()>& body) {
  check_geometry(grid_size, block);
  Grid g;
  g.kernel = demangled(kernel);
  {
    const std::lock_guard<std::mutex> lock(log_mutex);
    launched.push_back(g.kernel);
  }
  g.grid = grid_size;
  g.block = block;
  g.body = &body;
  const int n = int(block.x * block.y * block.z);
  g.threads.resize(n);
  for (int i = 0; i < n; ++i) {
    g.threads[i].id = i;
    g.threads[i].idx = dim3(i % block.x, i / block.x % block.y, i / (block.x * block.y));
  }
  while (int(stacks.size()) < n) stacks.push_back(std::make_unique<Stack>());
  running = &g;
  try {
    for (unsigned z = 0; z < grid_size.z; ++z)
      for (unsigned y = 0; y < grid_size.y; ++y)
        for (unsigned x = 0; x < grid_size.x; ++x) {
          g.block_idx = dim3(x, y, z);
          run_block(g);
        }
  } catch (...) {
    running = nullptr;
    throw;
  }
  running = nullptr;
}

std::vector<std::string> take_launched_kernels() {
  const std::lock_guard<std::mutex> lock(log_mutex);
  return std::exchange(launched, {});
}

const dim3& thread_idx() { return grid().current->idx; }
const dim3& block_idx() { return grid().block_idx; }
const dim3& block_dim() { return grid().block; }
const dim3& grid_dim() { return grid().grid; }

void barrier(const char* file, int line) {
  Grid& g = grid();
  Thread& t = *g.current;
  for (const Thread& u : g.threads) {
    if (u.state == State::kDone)
      fail("__syncthreads() (" + where(file, line) + "), but " + describe(u) +
           " has exited: a barrier must be reached by every thread of the block");
    if (waits_for(u, t))
      fail("__syncthreads() (" + where(file, line) + "), but " + describe(u) + " " +
           state_of(u) + " with a mask that holds this thread (an inactive lane in the mask)");
  }
  t.state = State::kAtBarrier;
  t.wait.file = file;
  t.wait.line = line;
  if (++g.at_barrier < int(g.threads.size())) {
    yield(g, t);
    return;
  }
  for (const Thread& u : g.threads) {
    if (u.wait.file != file || u.wait.line != line)
      fail("threads of the block wait at different barriers: __syncthreads() (" +
           where(file, line) + ") and " + describe(u) + " at " +
           where(u.wait.file, u.wait.line));
  }
  g.at_barrier = 0;
  ++g.epoch;
  for (Thread& u : g.threads) u.state = State::kRunnable;
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width,
                         const char* file, int line) {
  Grid& g = grid();
  Thread& t = *g.current;
  t.state = State::kAtCollective;
  t.wait = {file, line, op, mask, value, 0, arg, width};
  if (!all_lanes_arrived(g, t)) {
    yield(g, t);
    return t.wait.result;
  }
  const int base = t.id / kWarpSize * kWarpSize;
  std::vector<uint64_t> results(kWarpSize);
  for (int lane = 0; lane < kWarpSize; ++lane) {
    if (mask >> lane & 1) results[lane] = result_of(g, g.threads[base + lane]);
  }
  for (int lane = 0; lane < kWarpSize; ++lane) {
    if (!(mask >> lane & 1)) continue;
    g.threads[base + lane].wait.result = results[lane];
    g.threads[base + lane].state = State::kRunnable;
  }
  return t.wait.result;
}

void note_read(AccessLog& log, const char* array, int64_t index) {
  const Grid& g = grid();
  const int me = g.current->id;
  const auto name = [&] { return std::string(array) + "[" + std::to_string(index) + "]"; };
  if (log.block != g.block_serial || log.writer < 0)
    fail("reads shared " + name() + " before any thread of the block wrote it: uninitialized, "
         "or written later with no __syncthreads() in between (a race)");
  if (log.write_epoch == g.epoch && log.writer != me)
    fail("reads shared " + name() + ", written by " + describe(g.threads[log.writer]) +
         " with no __syncthreads() in between (a race)");
  if (log.read_epoch != g.epoch || log.reader == -1) {
    log.reader = me;
    log.read_epoch = g.epoch;
  } else if (log.reader != me) {
    log.reader = kSeveralReaders;
  }
}

void note_write(AccessLog& log, const char* array, int64_t index) {
  const Grid& g = grid();
  const int me = g.current->id;
  const auto name = [&] { return std::string(array) + "[" + std::to_string(index) + "]"; };
  if (log.block != g.block_serial) log = AccessLog{g.block_serial};
  if (log.writer >= 0 && log.write_epoch == g.epoch && log.writer != me)
    fail("writes shared " + name() + ", written by " + describe(g.threads[log.writer]) +
         " with no __syncthreads() in between (a race)");
  if (log.reader != -1 && log.read_epoch == g.epoch && log.reader != me)
    fail("writes shared " + name() + ", read by " +
         (log.reader == kSeveralReaders ? std::string("other threads")
                                        : describe(g.threads[log.reader])) +
         " with no __syncthreads() in between (a race)");
  log.writer = me;
  log.write_epoch = g.epoch;
}

void bad_shared_index(const char* array, int64_t index, int64_t size) {
  fail("index " + std::to_string(index) + " of shared " + array + "[" + std::to_string(size) +
       "]: out of bounds");
}

}  // namespace emulation
