// CUDA kernels of the six full-size passes (launched by passes.cu).
//
// A full-size tensor is addressed as (N, O, I) with element strides (sN, sO, sI), in one of three
// layouts L: kNchw (O = C, I = H*W: NCHW-like), kCl (O = H*W, I = C: channels-last-like), so both
// are native, and, for the elementwise passes, kFlat (O = 1, I = C*H*W: NCHW tensors whose
// samples are contiguous, so that vectors need not fit in a row of H*W, as at 7x7 or 14x14).
// With VEC > 1 every full-size tensor of a launch has sI = 1 and aligned rows, and each thread
// moves VEC elements (16 or 8 bytes) per load or store. Arithmetic and
// accumulation are float32. Reductions are split deterministically: each thread sums a fixed
// set of elements in a fixed order, threads are combined by a fixed tree (warp shuffles or
// shared memory), and each range of the reduced axis writes its own partial results, which
// the consumer combines in range order. There are no atomics. Offsets are 64-bit.
//
// The CPU emulation of the kernels (tests/cuda_emulation) compiles this file with the host
// compiler: for it, pointers are Ptr<T>, vector accesses go through read_as and write_as, and
// shared memory is declared with SHARED_ARRAY.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "passes.h"

namespace cbam {

constexpr int kThreads = 256;               // threads per block, every kernel
constexpr int32_t kNoIndex = 0x7fffffff;    // arg-max of an empty range

// `__shared__ T name[size]`: memory of the block (a race-checked array in the emulation).
#ifndef CBAM_EMULATION
#define SHARED_ARRAY(T, name, size) __shared__ T name[size]
#endif

// ------------------------------------------------------------------------------ element access

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// *p read or written as a P, one access (a vector one for a Pack); the emulation has overloads
// for its checked pointers.
template <typename P, typename T>
__device__ __forceinline__ P read_as(const T* p) {
  return *reinterpret_cast<const P*>(p);
}
template <typename P, typename T>
__device__ __forceinline__ void write_as(T* p, const P& v) {
  *reinterpret_cast<P*>(p) = v;
}

// VEC consecutive elements as float (one vector load when VEC > 1).
template <int VEC, typename T>
__device__ __forceinline__ void load(Ptr<const T> p, float (&v)[VEC]) {
  const auto pk = read_as<Pack<T, VEC>>(p);
#pragma unroll
  for (int j = 0; j < VEC; ++j) v[j] = to_float(pk.v[j]);
}

template <int VEC, typename T>
__device__ __forceinline__ void store(Ptr<T> p, const float (&v)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int j = 0; j < VEC; ++j) pk.v[j] = from_float<T>(v[j]);
  write_as(p, pk);
}

// VEC consecutive 4-byte values of a small tensor (16-byte loads when VEC is a multiple of 4).
template <int VEC, typename U>
__device__ __forceinline__ void load_small(Ptr<const U> p, U (&v)[VEC]) {
  constexpr int kStep = VEC % 4 == 0 ? 4 : 1;
#pragma unroll
  for (int q = 0; q < VEC; q += kStep) {
    const auto pk = read_as<Pack<U, kStep>>(p + q);
#pragma unroll
    for (int j = 0; j < kStep; ++j) v[q + j] = pk.v[j];
  }
}

// a / b for a >= 0, b > 0; 32-bit division when both fit (64-bit division is a long subroutine).
__device__ __forceinline__ int64_t divide(int64_t a, int64_t b) {
  return ((a | b) >> 32) == 0 ? int64_t(uint32_t(a) / uint32_t(b)) : a / b;
}

template <typename P>
struct View {
  P data;
  int64_t sN, sO, sI;
  __device__ __forceinline__ P at(int64_t n, int64_t o, int64_t i) const {
    return data + n * sN + o * sO + i * sI;
  }
};

struct Dims {
  int64_t N, O, I;   // sizes of the (N, O, I) view
  int64_t C, HW;
  float inv_c, inv_hw;
};

constexpr int kNchw = 0, kCl = 1, kFlat = 2;  // the layouts L (a bool CL converts: kNchw, kCl)

// The channel (CHANNEL) or the h*w position of each of the VEC elements at (o, i..i+VEC-1).
template <int VEC, int L, bool CHANNEL>
__device__ __forceinline__ void positions(int64_t o, int64_t i, const Dims& d, int64_t (&p)[VEC]) {
  if constexpr (L == kFlat) {  // one division for the vector, then steps across row ends
    int64_t c = divide(i, d.HW), hw = i - c * d.HW;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      p[j] = CHANNEL ? c : hw;
      if (++hw == d.HW) {
        hw = 0;
        ++c;
      }
    }
  } else {
    constexpr bool kAlongI = (L == kCl) == CHANNEL;  // the position is the inner index
#pragma unroll
    for (int j = 0; j < VEC; ++j) p[j] = kAlongI ? i + j : o;
  }
}

// A factor indexed by (n, c) (CHANNEL) or by (n, hw), for the VEC elements at (o, i..i+VEC-1);
// f points at sample n. One vector load where the factor runs along I, one element for the
// whole vector where it is constant along I, else one element per element.
template <int VEC, int L, bool CHANNEL, typename U>
__device__ __forceinline__ void factor(Ptr<const U> f, int64_t o, int64_t i, const Dims& d,
                                       U (&v)[VEC]) {
  if constexpr (L != kFlat && (L == kCl) == CHANNEL) {
    load_small<VEC>(f + i, v);
  } else if constexpr (L != kFlat) {
    const U u = f[o];
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = u;
  } else {
    int64_t p[VEC];
    positions<VEC, L, CHANNEL>(o, i, d, p);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = f[p[j]];
  }
}

template <int VEC, int L, typename U>
__device__ __forceinline__ void channel_factor(Ptr<const U> f, int64_t o, int64_t i,
                                               const Dims& d, U (&v)[VEC]) {
  factor<VEC, L, true>(f, o, i, d, v);
}

template <int VEC, int L, typename U>
__device__ __forceinline__ void pixel_factor(Ptr<const U> f, int64_t o, int64_t i, const Dims& d,
                                             U (&v)[VEC]) {
  factor<VEC, L, false>(f, o, i, d, v);
}

// v *= f[c] (PER_CHANNEL, f a per-(n, c) row) or v *= f[hw] (f a per-(n, h*w) row); nothing
// when f is null.
template <int VEC, int L, bool PER_CHANNEL>
__device__ __forceinline__ void scale_by(Ptr<const float> f, int64_t o, int64_t i, const Dims& d,
                                         float (&v)[VEC]) {
  if (f == nullptr) return;
  float s[VEC];
  factor<VEC, L, PER_CHANNEL>(f, o, i, d, s);
#pragma unroll
  for (int j = 0; j < VEC; ++j) v[j] *= s[j];
}

// g <- gx1 = g * sa + gp_mean / C + gp_max * [c == cstar], the gradient reaching x1 = x * ca.
template <int VEC, int L>
__device__ __forceinline__ void grad_x1(const Small& f, const Dims& d, int64_t n, int64_t o,
                                        int64_t i, float (&g)[VEC]) {
  scale_by<VEC, L, false>(f.sa ? f.sa + n * d.HW : nullptr, o, i, d, g);
  if (f.gp != nullptr) {
    const Ptr<const float> gp = f.gp + 2 * n * d.HW;
    float gmax[VEC], gmean[VEC];
    int32_t cs[VEC];
    int64_t c[VEC];
    pixel_factor<VEC, L>(gp + (f.max_first ? 0 : d.HW), o, i, d, gmax);
    pixel_factor<VEC, L>(gp + (f.max_first ? d.HW : 0), o, i, d, gmean);
    pixel_factor<VEC, L>(f.cstar + n * d.HW, o, i, d, cs);
    positions<VEC, L, true>(o, i, d, c);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      g[j] += gmean[j] * d.inv_c;
      if (c[j] == cs[j]) g[j] += gmax[j];
    }
  }
}

// ------------------------------------------------------------------ values of the reductions
// Each fills v with the value at (n, o, i..i+VEC-1) that its pass reduces.

// g = gy, or with out (the forward's output relu(... + residual)) g = 0 where out <= 0, else gy
// (a NaN in out passes gy, as in torch's threshold_backward), which is also written to gres:
// each element once, by the thread that reduces it.
template <typename T, int VEC>
struct EpilogueGy {
  View<Ptr<const T>> gy, out;  // out.data == nullptr: no epilogue
  View<Ptr<T>> gres;
  __device__ __forceinline__ void operator()(int64_t n, int64_t o, int64_t i,
                                             float (&g)[VEC]) const {
    load<VEC>(gy.at(n, o, i), g);
    if (out.data == nullptr) return;
    float r[VEC];
    load<VEC>(out.at(n, o, i), r);
#pragma unroll
    for (int j = 0; j < VEC; ++j) g[j] = r[j] <= 0.f ? 0.f : g[j];
    store<VEC>(gres.at(n, o, i), g);
  }
};

// pool_hw: x;  channel_pool: x * ca.
template <typename T, int VEC, int L>
struct XCa {
  View<Ptr<const T>> x;
  Ptr<const float> ca;
  Dims d;
  __device__ __forceinline__ void operator()(int64_t n, int64_t o, int64_t i,
                                             float (&v)[VEC]) const {
    load<VEC>(x.at(n, o, i), v);
    scale_by<VEC, L, true>(ca ? ca + n * d.C : nullptr, o, i, d, v);
  }
};

// grad_spatial: g * x * ca.
template <typename T, int VEC, int L>
struct GyXCa {
  EpilogueGy<T, VEC> gy;
  View<Ptr<const T>> x;
  Ptr<const float> ca;
  Dims d;
  __device__ __forceinline__ void operator()(int64_t n, int64_t o, int64_t i,
                                             float (&v)[VEC]) const {
    float xv[VEC];
    gy(n, o, i, v);
    load<VEC>(x.at(n, o, i), xv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] *= xv[j];
    scale_by<VEC, L, true>(ca ? ca + n * d.C : nullptr, o, i, d, v);
  }
};

// grad_channel: gx1(g) * x.
template <typename T, int VEC, int L>
struct Gx1X {
  EpilogueGy<T, VEC> gy;
  View<Ptr<const T>> x;
  Small f;
  Dims d;
  __device__ __forceinline__ void operator()(int64_t n, int64_t o, int64_t i,
                                             float (&v)[VEC]) const {
    float xv[VEC];
    gy(n, o, i, v);
    grad_x1<VEC, L>(f, d, n, o, i, v);
    load<VEC>(x.at(n, o, i), xv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] *= xv[j];
  }
};

// ------------------------------------------------------------------------------- reductions

// max with the first arg-max; NaN wins (first NaN), as torch.max.
__device__ __forceinline__ void take_max(float& m, int32_t& a, float v, int32_t b) {
  const bool v_nan = v != v, m_nan = m != m;
  const bool tie = (v == m) || (v_nan && m_nan);
  if ((v > m) || (v_nan && !m_nan) || (tie && b < a)) {
    m = v;
    a = b;
  }
}

// Where a reduction writes the partials of range s for kept index k of sample n: element
// (s, n, k) of (S, N, K) arrays, the sum times `scale` (1 / the divisor), the max and its index.
struct Sink {
  Ptr<float> sum, max;
  Ptr<int32_t> arg;
  int64_t N, K;
  float scale;
  template <bool kMax>
  __device__ __forceinline__ void put(int64_t s, int64_t n, int64_t k, float acc, float m,
                                      int32_t a) const {
    const int64_t at = (s * N + n) * K + k;
    sum[at] = acc * scale;
    if constexpr (kMax) {
      max[at] = m;
      arg[at] = a;
    }
  }
};

// Reduce along the inner (contiguous) axis: a group of G lanes (G a power of two <= 32) takes
// one range (`chunk` elements) of one (n, o) row, VEC elements per load, and combines its lanes
// with warp shuffles.
// Groups are numbered row-fastest, so neighbouring groups read neighbouring rows.
// Traffic: one read of each full-size input; writes N * O * S sums (and max, arg).
template <bool kMax, int VEC, typename Value>
__global__ void __launch_bounds__(kThreads)
    reduce_inner_kernel(const Value value, int G, int64_t chunk, int64_t S, const Sink sink) {
  const Dims& d = value.d;
  const int lane = threadIdx.x % G;
  const int64_t rows = d.N * d.O;
  const int64_t group = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  const bool live = group < rows * S;
  const int64_t s = divide(group, rows), row = group - s * rows;
  const int64_t n = divide(row, d.O), o = row - n * d.O;
  float acc = 0.f, m = -INFINITY;
  int32_t a = kNoIndex;
  if (live) {
    const int64_t end = min(d.I, (s + 1) * chunk);
    for (int64_t i = s * chunk + int64_t(lane) * VEC; i < end; i += int64_t(G) * VEC) {
      float v[VEC];
      value(n, o, i, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        acc += v[j];
        if constexpr (kMax) take_max(m, a, v[j], int32_t(i + j));
      }
    }
  }
  for (int off = G / 2; off > 0; off /= 2) {
    acc += __shfl_xor_sync(0xffffffffu, acc, off, G);
    if constexpr (kMax) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, off, G);
      const int32_t a2 = __shfl_xor_sync(0xffffffffu, a, off, G);
      take_max(m, a, m2, a2);
    }
  }
  if (live && lane == 0) sink.put<kMax>(s, n, o, acc, m, a);
}

// Reduce along the outer axis: a (TX, TY) block takes TX * VEC inner positions of one sample and
// one range (`chunk` indices) of the outer axis; each thread walks every TY-th outer index of the
// range, then row ty = 0 adds up the TY partials from shared memory in order.
// Traffic: one read of each full-size input; writes N * I * S sums (and max, arg).
template <bool kMax, int VEC, typename Value>
__global__ void __launch_bounds__(kThreads)
    reduce_outer_kernel(const Value value, int64_t tiles, int64_t chunk, const Sink sink) {
  SHARED_ARRAY(float, s_acc, kThreads * VEC);
  SHARED_ARRAY(float, s_max, kMax ? kThreads * VEC : 1);
  SHARED_ARRAY(int32_t, s_arg, kMax ? kThreads * VEC : 1);
  const Dims& d = value.d;
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int64_t n = divide(blockIdx.x, tiles), tile = blockIdx.x - n * tiles, s = blockIdx.y;
  const int64_t i = (tile * TX + tx) * VEC;
  const bool live = i < d.I;
  float acc[VEC], m[VEC];
  int32_t a[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    acc[j] = 0.f;
    m[j] = -INFINITY;
    a[j] = kNoIndex;
  }
  if (live) {
    const int64_t end = min(d.O, (s + 1) * chunk);
    for (int64_t o = s * chunk + ty; o < end; o += TY) {
      float v[VEC];
      value(n, o, i, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        acc[j] += v[j];
        if constexpr (kMax) take_max(m[j], a[j], v[j], int32_t(o));
      }
    }
  }
  const int t = (ty * TX + tx) * VEC;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    s_acc[t + j] = acc[j];
    if constexpr (kMax) {
      s_max[t + j] = m[j];
      s_arg[t + j] = a[j];
    }
  }
  __syncthreads();
  if (ty != 0 || !live) return;
  for (int k = 1; k < TY; ++k) {
    const int u = (k * TX + tx) * VEC;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc[j] += s_acc[u + j];
      if constexpr (kMax) take_max(m[j], a[j], s_max[u + j], s_arg[u + j]);
    }
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) sink.put<kMax>(s, n, i + j, acc[j], m[j], a[j]);
}

// ----------------------------------------------------------------------------- elementwise

// y = x * ca * sa, or relu(x * ca * sa + residual) (the ResNet block epilogue; NaN stays NaN).
template <typename T, int VEC, int L>
struct ApplyGates {
  View<Ptr<const T>> x, residual;  // residual.data == nullptr: absent
  View<Ptr<T>> y;
  Small f;
  Dims d;
  __device__ __forceinline__ int64_t tasks() const { return 0; }
  __device__ __forceinline__ void task(int64_t, int) const {}
  __device__ __forceinline__ void operator()(int64_t n, int64_t o, int64_t i) const {
    float v[VEC], s[VEC];
    load<VEC>(x.at(n, o, i), v);
    scale_by<VEC, L, true>(f.ca ? f.ca + n * d.C : nullptr, o, i, d, v);
    scale_by<VEC, L, false>(f.sa ? f.sa + n * d.HW : nullptr, o, i, d, v);
    if (residual.data != nullptr) {
      load<VEC>(residual.at(n, o, i), s);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = v[j] + s[j] < 0.f ? 0.f : v[j] + s[j];
    }
    store<VEC>(y.at(n, o, i), v);
  }
};

// ------------------------------------------------------------------ parameter gradients

// A parameter gradient: float values stored in the parameter's dtype (at most one pointer set)
// at element offsets from its strides s.
struct GradStore {
  Ptr<float> f32 = nullptr;
  Ptr<__half> f16 = nullptr;
  Ptr<__nv_bfloat16> bf16 = nullptr;
  int64_t s[4] = {0, 0, 0, 0};
  __device__ __forceinline__ bool present() const {
    return f32 != nullptr || f16 != nullptr || bf16 != nullptr;
  }
  __device__ __forceinline__ void put(int64_t at, float v) const {
    if (f32 != nullptr) f32[at] = v;
    if (f16 != nullptr) f16[at] = from_float<__half>(v);
    if (bf16 != nullptr) bf16[at] = from_float<__nv_bfloat16>(v);
  }
};

constexpr int kTaskChannels = 16;  // channels of the MLP weights per task
constexpr int kSubR = 1, kSubC = 2;  // a thread's tile of the weights: kSubR units x kSubC channels
constexpr int kTileThreads = kTaskChannels / kSubC;  // threads across a task's channels

// The parameter gradients, sums over the batch in a fixed order, as `tasks` tasks of a block
// each (the math of param_grads_task in cbam_kernels/ops/triton/param_grads.py): task t takes
// channels [16 t, 16 t + 16) of gW1 = sum_kn ghidden (x) pooled, gW2 = sum_kn gz (x) act(hidden)
// and gb2 = K sum_n gz, each thread a 1 x 2 tile of hidden units and channels at a time (few
// registers: they count for the whole kernel); task 0 also gb1 = sum_kn ghidden and the spatial
// gate's conv and BatchNorm gradients from the per-program partials wpart (P, 2 k k) and
// bn_part (P, 2: sums of gv and of gv * xhat).
struct ParamTasks {
  int64_t tasks = 0;
  Ptr<const float> gz = nullptr, ghidden = nullptr, pooled = nullptr, hidden = nullptr;
  int64_t N = 0, C = 0, R = 0;
  int K = 1;
  bool silu = false;
  GradStore gw1, gb1, gw2, gb2;
  Ptr<const float> wpart = nullptr, bn_part = nullptr;
  int64_t P = 0;
  int ksize = 0;
  GradStore gconv, gbn_w, gbn_b;

  __device__ __forceinline__ float activation(float h) const {
    if (silu) return h / (1.f + expf(-h));
    return h < 0.f ? 0.f : h;  // NaN stays NaN, as torch.relu
  }

  __device__ void run(int64_t task, int t) const {
    if (gz != nullptr) channel_weights(task, t);
    if (task != 0) return;
    if (gb1.present()) {
      for (int64_t r = t; r < R; r += kThreads) {
        float acc = 0.f;
        for (int64_t row = 0; row < K * N; ++row) acc += ghidden[row * R + r];
        gb1.put(r * gb1.s[0], acc);
      }
    }
    if (wpart != nullptr) spatial(t);
  }

  __device__ void channel_weights(int64_t task, int t) const {
    const int64_t c = task * kTaskChannels + (t % kTileThreads) * kSubC;
    for (int64_t r = (t / kTileThreads) * kSubR; r < R; r += kThreads / kTileThreads * kSubR) {
      float a1[kSubR][kSubC] = {}, a2[kSubC][kSubR] = {};
#pragma unroll 1
      for (int64_t n = 0; n < N; ++n) {
        float g[kSubC];
#pragma unroll
        for (int j = 0; j < kSubC; ++j) g[j] = c + j < C ? gz[n * C + c + j] : 0.f;
#pragma unroll 1
        for (int k = 0; k < K; ++k) {
          const int64_t row = k * N + n;
          float gh[kSubR], act[kSubR], pv[kSubC];
#pragma unroll
          for (int i = 0; i < kSubR; ++i) {
            gh[i] = r + i < R ? ghidden[row * R + r + i] : 0.f;
            act[i] = r + i < R ? activation(hidden[row * R + r + i]) : 0.f;
          }
#pragma unroll
          for (int j = 0; j < kSubC; ++j) pv[j] = c + j < C ? pooled[row * C + c + j] : 0.f;
#pragma unroll
          for (int i = 0; i < kSubR; ++i) {
#pragma unroll
            for (int j = 0; j < kSubC; ++j) {
              a1[i][j] += gh[i] * pv[j];
              a2[j][i] += g[j] * act[i];
            }
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kSubR; ++i) {
#pragma unroll
        for (int j = 0; j < kSubC; ++j) {
          if (r + i < R && c + j < C) {
            gw1.put((r + i) * gw1.s[0] + (c + j) * gw1.s[1], a1[i][j]);
            gw2.put((c + j) * gw2.s[0] + (r + i) * gw2.s[1], a2[j][i]);
          }
        }
      }
    }
    const int64_t cb = task * kTaskChannels + t;
    if (gb2.present() && t < kTaskChannels && cb < C) {
      float acc = 0.f;
      for (int64_t n = 0; n < N; ++n) acc += gz[n * C + cb];
      gb2.put(cb * gb2.s[0], acc * float(K));
    }
  }

  __device__ void spatial(int t) const {
    const int taps = ksize * ksize;
    for (int i = t; i < 2 * taps; i += kThreads) {
      float acc = 0.f;
      for (int64_t q = 0; q < P; ++q) acc += wpart[q * 2 * taps + i];
      const int ch = i / taps, tap = i % taps;
      gconv.put(ch * gconv.s[1] + (tap / ksize) * gconv.s[2] + (tap % ksize) * gconv.s[3], acc);
    }
    if (t != 0) return;
    float sum_gv = 0.f, sum_gv_xhat = 0.f;
    for (int64_t q = 0; q < P; ++q) {
      sum_gv += bn_part[2 * q];
      sum_gv_xhat += bn_part[2 * q + 1];
    }
    if (gbn_w.present()) gbn_w.put(0, sum_gv_xhat);
    if (gbn_b.present()) gbn_b.put(0, sum_gv);
  }
};

// gx = gx1 * ca + ga / HW + gm * [hw == pstar]  (x itself is not read); the launch's first
// blocks run the parameter-gradient tasks.
template <typename T, int VEC, int L>
struct GradInput {
  View<Ptr<const T>> gy;
  View<Ptr<T>> gx;
  Small f;
  Dims d;
  ParamTasks params;
  __device__ __forceinline__ int64_t tasks() const { return params.tasks; }
  __device__ __forceinline__ void task(int64_t t, int thread) const { params.run(t, thread); }
  __device__ __forceinline__ void operator()(int64_t n, int64_t o, int64_t i) const {
    float g[VEC], s[VEC];
    load<VEC>(gy.at(n, o, i), g);
    grad_x1<VEC, L>(f, d, n, o, i, g);
    scale_by<VEC, L, true>(f.ca ? f.ca + n * d.C : nullptr, o, i, d, g);
    if (f.ga != nullptr) {
      channel_factor<VEC, L>(f.ga + n * d.C, o, i, d, s);
#pragma unroll
      for (int j = 0; j < VEC; ++j) g[j] += s[j] * d.inv_hw;
    }
    if (f.gm != nullptr) {
      int32_t ps[VEC];
      int64_t hw[VEC];
      channel_factor<VEC, L>(f.gm + n * d.C, o, i, d, s);
      channel_factor<VEC, L>(f.pstar + n * d.C, o, i, d, ps);
      positions<VEC, L, false>(o, i, d, hw);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if (hw[j] == ps[j]) g[j] += s[j];
      }
    }
    store<VEC>(gx.at(n, o, i), g);
  }
};

// One pass over the (N, O, I) index space: a (TX, TY) block takes TY rows (n, o) at a time and
// walks each along I, VEC elements per thread; blockIdx.y splits I when there are few rows.
// The first `tail` columns of blocks (blockIdx.x < tail) run op.task(0 .. op.tasks() - 1)
// instead, numbered blockIdx.x * gridDim.y + blockIdx.y.
// Traffic: one read of each full-size input of Op (x and the residual, or gy), one write.
template <int VEC, typename Op>
__global__ void __launch_bounds__(kThreads) elementwise_kernel(const Op op, int64_t tail) {
  if (blockIdx.x < tail) {
    const int64_t t = int64_t(blockIdx.x) * gridDim.y + blockIdx.y;
    if (t < op.tasks()) op.task(t, threadIdx.y * blockDim.x + threadIdx.x);
    return;
  }
  const Dims& d = op.d;
  const int64_t rows = d.N * d.O;
  const int64_t i0 = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  const int64_t i_step = int64_t(gridDim.y) * blockDim.x * VEC;
  for (int64_t row = (int64_t(blockIdx.x) - tail) * blockDim.y + threadIdx.y; row < rows;
       row += (int64_t(gridDim.x) - tail) * blockDim.y) {
    const int64_t n = divide(row, d.O), o = row - n * d.O;
    for (int64_t i = i0; i < d.I; i += i_step) op(n, o, i);
  }
}

}  // namespace cbam
