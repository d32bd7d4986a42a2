// Launchers of the six passes: layout and vector width, launch geometry, dtype dispatch.
//
// The layout is read off x: channels-last-like (C innermost, CL) when x has stride 1 along C
// and not along H*W, NCHW-like otherwise. Vector loads and stores (16, else 8 bytes) are used
// when every full-size tensor of the launch is contiguous along the inner axis with aligned
// rows; other strides (a gy in another memory format, say) take the one-element kernels. Every
// split depends on the shape only, so results are the same run after run and on every GPU.
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <initializer_list>
#include <type_traits>

#include "passes.cuh"

namespace cbam {
namespace {

constexpr int64_t kTargetBlocks = 1024;  // split reductions until about this many blocks
constexpr int64_t kMinLoads = 4;         // ... while each thread still makes this many loads
constexpr int64_t kMaxSplits = 1024;     // and at most this many chunks

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int pow2_at_least(int64_t v, int cap) {
  int p = 1;
  while (p < v && p < cap) p *= 2;
  return p;
}

bool channels_inner(const In& x) { return x.sC == 1 && x.sHW != 1; }

template <bool CL, typename T>
View<const T*> orient(const In& t) {
  return {static_cast<const T*>(t.data), t.sN, CL ? t.sHW : t.sC, CL ? t.sC : t.sHW};
}

template <bool CL, typename T>
View<T*> orient(const Out& t) {
  return {static_cast<T*>(t.data), t.sN, CL ? t.sHW : t.sC, CL ? t.sC : t.sHW};
}

template <bool CL>
Dims dims(const Shape& s) {
  return {s.N, CL ? s.HW : s.C, CL ? s.C : s.HW, s.C, s.HW, 1.f / float(s.C), 1.f / float(s.HW)};
}

// Whether `vec` elements of `elem` bytes can be loaded at once from every full-size tensor
// (inner stride 1, rows and base aligned) and every small tensor (16-byte aligned base).
bool vec_fits(int vec, int elem, bool cl, int64_t inner, std::initializer_list<In> full,
              std::initializer_list<const void*> small) {
  if (inner % vec != 0) return false;
  for (const In& t : full) {
    const int64_t s_inner = cl ? t.sC : t.sHW, s_outer = cl ? t.sHW : t.sC;
    if (s_inner != 1 || t.sN % vec != 0 || s_outer % vec != 0 ||
        reinterpret_cast<uintptr_t>(t.data) % (vec * elem) != 0)
      return false;
  }
  for (const void* p : small) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

int elem_size(DType dt) { return dt == DType::kFloat ? 4 : 2; }

// Bytes per load and store along the inner axis: 16 or 8 when every tensor allows, else 0
// (one element).
int vec_bytes(DType dt, bool cl, const Shape& s, std::initializer_list<In> full,
              std::initializer_list<const void*> small) {
  const int elem = elem_size(dt);
  for (int bytes : {16, 8}) {
    if (vec_fits(bytes / elem, elem, cl, cl ? s.C : s.HW, full, small)) return bytes;
  }
  return 0;
}

template <typename T>
struct Tag {
  using type = T;
};
template <int V>
using Int = std::integral_constant<int, V>;
template <bool B>
using Bool = std::integral_constant<bool, B>;

// Calls f(Tag<T>, Int<VEC>, Bool<CL>) for the dtype, with VEC = bytes / sizeof(T), or 1.
template <typename F>
void dispatch(DType dt, int bytes, bool cl, F&& f) {
  auto with_type = [&](auto tag) {
    constexpr int kSize = sizeof(typename decltype(tag)::type);
    auto with_vec = [&](auto vec) {
      if (cl)
        f(tag, vec, Bool<true>{});
      else
        f(tag, vec, Bool<false>{});
    };
    if (bytes == 16)
      with_vec(Int<16 / kSize>{});
    else if (bytes == 8)
      with_vec(Int<8 / kSize>{});
    else
      with_vec(Int<1>{});
  };
  switch (dt) {
    case DType::kHalf: with_type(Tag<__half>{}); break;
    case DType::kBFloat16: with_type(Tag<__nv_bfloat16>{}); break;
    case DType::kFloat: with_type(Tag<float>{}); break;
  }
}

// Reduce `value` over H*W (REDUCE_HW) or over C into `sink`, through a partials buffer when the
// reduced axis is split into chunks.
template <bool kMax, bool REDUCE_HW, int VEC, bool CL, typename Value>
void reduce(const Value& value, const Sink& sink, const Workspace& ws, cudaStream_t stream) {
  const Dims& d = value.d;
  constexpr bool kInner = REDUCE_HW != CL;  // the reduced axis is the inner one
  const int64_t kept = kInner ? d.O : d.I, reduced = kInner ? d.I : d.O;
  const int64_t vecs = ceil_div(d.I, VEC);
  int G = 1, TX = 1, TY = 1;
  int64_t tiles = 1, base, per_split;
  if constexpr (kInner) {
    G = pow2_at_least(ceil_div(vecs, kMinLoads), 32);
    base = ceil_div(d.N * d.O * G, kThreads);
    per_split = int64_t(G) * VEC * kMinLoads;
  } else {
    TX = pow2_at_least(vecs, 32);
    TY = kThreads / TX;
    tiles = ceil_div(vecs, TX);
    base = d.N * tiles;
    per_split = int64_t(TY) * kMinLoads;
  }
  int64_t S = std::min({ceil_div(kTargetBlocks, base), std::max<int64_t>(1, reduced / per_split),
                        kMaxSplits});
  int64_t chunk = ceil_div(reduced, S);
  if (kInner) chunk = ceil_div(chunk, VEC) * VEC;
  S = ceil_div(reduced, chunk);

  Sink out = sink;
  float *part_sum = nullptr, *part_max = nullptr;
  int32_t* part_arg = nullptr;
  if (S > 1) {
    const int64_t count = S * d.N * kept;
    part_sum = static_cast<float*>(ws(count * sizeof(float)));
    if (kMax) {
      part_max = static_cast<float*>(ws(count * sizeof(float)));
      part_arg = static_cast<int32_t*>(ws(count * sizeof(int32_t)));
    }
    out = {part_sum, part_max, part_arg, d.N * kept, kept, kept, 1.f};
  }
  if constexpr (kInner) {
    const int64_t threads = S * d.N * d.O * G;
    reduce_inner_kernel<kMax, VEC>
        <<<ceil_div(threads, kThreads), kThreads, 0, stream>>>(value, G, chunk, S, out);
  } else {
    reduce_outer_kernel<kMax, VEC>
        <<<dim3(d.N * tiles, S), dim3(TX, TY), 0, stream>>>(value, tiles, chunk, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (S > 1) {
    finalize_kernel<kMax><<<ceil_div(d.N * kept, kThreads), kThreads, 0, stream>>>(
        part_sum, part_max, part_arg, S, d.N, kept, sink);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <int VEC, typename Op>
void elementwise(const Op& op, cudaStream_t stream) {
  const Dims& d = op.d;
  const int TX = pow2_at_least(ceil_div(d.I, VEC), kThreads), TY = kThreads / TX;
  const int64_t row_blocks = std::min<int64_t>(ceil_div(d.N * d.O, TY), 0x7fffffff);
  const int64_t splits = std::min({std::max<int64_t>(1, ceil_div(kTargetBlocks, row_blocks)),
                                   ceil_div(d.I, int64_t(TX) * VEC), int64_t(65535)});
  elementwise_kernel<VEC><<<dim3(row_blocks, splits), dim3(TX, TY), 0, stream>>>(op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool empty(const Shape& s) { return s.N == 0 || s.C == 0 || s.HW == 0; }

}  // namespace

void pool_hw(DType dt, Shape s, In x, float* avg, float* mx, int32_t* arg, const Workspace& ws,
             cudaStream_t stream) {
  if (empty(s)) return;
  const bool cl = channels_inner(x);
  const int bytes = vec_bytes(dt, cl, s, {x}, {});
  dispatch(dt, bytes, cl, [&](auto tag, auto vec, auto clv) {
    using T = typename decltype(tag)::type;
    constexpr int V = decltype(vec)::value;
    constexpr bool CL = decltype(clv)::value;
    const XCa<T, V, CL> value{orient<CL, T>(x), nullptr, dims<CL>(s)};
    const Sink sink{avg, mx, arg, 0, s.C, s.C, 1.f / float(s.HW)};
    if (mx != nullptr)
      reduce<true, true, V, CL>(value, sink, ws, stream);
    else
      reduce<false, true, V, CL>(value, sink, ws, stream);
  });
}

void channel_pool(DType dt, Shape s, In x, const Small& f, float* p, int32_t* cstar,
                  const Workspace& ws, cudaStream_t stream) {
  if (empty(s)) return;
  const bool cl = channels_inner(x);
  const int bytes = vec_bytes(dt, cl, s, {x}, {f.ca});
  dispatch(dt, bytes, cl, [&](auto tag, auto vec, auto clv) {
    using T = typename decltype(tag)::type;
    constexpr int V = decltype(vec)::value;
    constexpr bool CL = decltype(clv)::value;
    const XCa<T, V, CL> value{orient<CL, T>(x), f.ca, dims<CL>(s)};
    float* pmax = p + (f.max_first ? 0 : s.HW);
    float* pmean = p + (f.max_first ? s.HW : 0);
    const Sink sink{pmean, pmax, cstar, 0, 2 * s.HW, s.HW, 1.f / float(s.C)};
    reduce<true, false, V, CL>(value, sink, ws, stream);
  });
}

void apply_gates(DType dt, Shape s, In x, const Small& f, In residual, Out y,
                 cudaStream_t stream) {
  if (empty(s)) return;
  const bool cl = channels_inner(x);
  const In yin{y.data, y.sN, y.sC, y.sHW}, rin = residual.data != nullptr ? residual : x;
  const int bytes = vec_bytes(dt, cl, s, {x, rin, yin}, {f.ca, f.sa});
  dispatch(dt, bytes, cl, [&](auto tag, auto vec, auto clv) {
    using T = typename decltype(tag)::type;
    constexpr int V = decltype(vec)::value;
    constexpr bool CL = decltype(clv)::value;
    elementwise<V>(ApplyGates<T, V, CL>{orient<CL, T>(x), orient<CL, T>(residual),
                                        orient<CL, T>(y), f, dims<CL>(s)},
                   stream);
  });
}

void grad_spatial(DType dt, Shape s, In gy, In x, const Small& f, float* gsa, const Workspace& ws,
                  cudaStream_t stream) {
  if (empty(s)) return;
  const bool cl = channels_inner(x);
  const int bytes = vec_bytes(dt, cl, s, {x, gy}, {f.ca});
  dispatch(dt, bytes, cl, [&](auto tag, auto vec, auto clv) {
    using T = typename decltype(tag)::type;
    constexpr int V = decltype(vec)::value;
    constexpr bool CL = decltype(clv)::value;
    const GyXCa<T, V, CL> value{orient<CL, T>(gy), orient<CL, T>(x), f.ca, dims<CL>(s)};
    const Sink sink{gsa, nullptr, nullptr, 0, s.HW, s.HW, 1.f};
    reduce<false, false, V, CL>(value, sink, ws, stream);
  });
}

void grad_channel(DType dt, Shape s, In gy, In x, const Small& f, float* gca, const Workspace& ws,
                  cudaStream_t stream) {
  if (empty(s)) return;
  const bool cl = channels_inner(x);
  const int bytes = vec_bytes(dt, cl, s, {x, gy}, {f.sa, f.gp, f.cstar});
  dispatch(dt, bytes, cl, [&](auto tag, auto vec, auto clv) {
    using T = typename decltype(tag)::type;
    constexpr int V = decltype(vec)::value;
    constexpr bool CL = decltype(clv)::value;
    const Gx1X<T, V, CL> value{orient<CL, T>(gy), orient<CL, T>(x), f, dims<CL>(s)};
    const Sink sink{gca, nullptr, nullptr, 0, s.C, s.C, 1.f};
    reduce<false, true, V, CL>(value, sink, ws, stream);
  });
}

void grad_input(DType dt, Shape s, In gy, const Small& f, Out gx, cudaStream_t stream) {
  if (empty(s)) return;
  const In gxin{gx.data, gx.sN, gx.sC, gx.sHW};
  const bool cl = channels_inner(gxin);
  const int bytes =
      vec_bytes(dt, cl, s, {gy, gxin}, {f.ca, f.sa, f.gp, f.cstar, f.ga, f.gm, f.pstar});
  dispatch(dt, bytes, cl, [&](auto tag, auto vec, auto clv) {
    using T = typename decltype(tag)::type;
    constexpr int V = decltype(vec)::value;
    constexpr bool CL = decltype(clv)::value;
    elementwise<V>(GradInput<T, V, CL>{orient<CL, T>(gy), orient<CL, T>(gx), f, dims<CL>(s)},
                   stream);
  });
}

bool has_kernel_image() {
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, finalize_kernel<false>);
  if (err != cudaSuccess) (void)cudaGetLastError();  // not sticky; clear it
  return err == cudaSuccess;
}

}  // namespace cbam
