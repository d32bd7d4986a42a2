// Launchers of the six passes: layout and vector width, launch geometry, dtype dispatch.
//
// The layout is read off x: channels-last-like (C innermost, kCl) when x has stride 1 along C
// and not along H*W, NCHW-like otherwise. Vector loads and stores (16, else 8 bytes) are used
// when every full-size tensor of the launch is contiguous along the inner axis with aligned
// rows; other strides (a gy in another memory format, say) take the one-element kernels. Every
// split depends on the shape and layout only, so results are the same run after run and on
// every GPU.
#include <algorithm>
#include <initializer_list>
#include <utility>

#include "passes.cuh"
#ifndef CBAM_EMULATION  // the CPU emulation (tests/cuda_emulation) brings its own launch()
#include <c10/cuda/CUDAException.h>
#endif

namespace cbam {
namespace {

constexpr int64_t kTargetBlocks = 1024;  // elementwise passes: split rows until this many blocks
constexpr int64_t kMinLoads = 4;         // reductions: loads per thread and range, at least
constexpr int64_t kMaxSplits = 1024;     // reductions: ranges of the reduced axis, at most
constexpr int64_t kWidestVec = 8;        // elements per load, at most (16 bytes of 16-bit data)

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int pow2_at_least(int64_t v, int cap) {
  int p = 1;
  while (p < v && p < cap) p *= 2;
  return p;
}

#ifndef CBAM_EMULATION
// kernel<<<grid, block, 0, stream>>>(args...), then a check that the launch went through.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream,
            const Args&... args) {
  kernel<<<grid, block, 0, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

bool channels_inner(const In& x) { return x.sC == 1 && x.sHW != 1; }

// The (sO, sI) strides of a tensor with strides (sC, sHW) in layout L (kFlat: its samples are
// contiguous).
template <int L>
std::pair<int64_t, int64_t> outer_inner(int64_t sC, int64_t sHW) {
  if constexpr (L == kFlat) return {0, 1};
  if constexpr (L == kCl) return {sHW, sC};
  return {sC, sHW};
}

template <int L, typename T>
View<Ptr<const T>> orient(const In& t) {
  const auto [sO, sI] = outer_inner<L>(t.sC, t.sHW);
  return {static_cast<const T*>(t.data), t.sN, sO, sI};
}

template <int L, typename T>
View<Ptr<T>> orient(const Out& t) {
  const auto [sO, sI] = outer_inner<L>(t.sC, t.sHW);
  return {static_cast<T*>(t.data), t.sN, sO, sI};
}

template <int L, typename T, int VEC>
EpilogueGy<T, VEC> epilogue_gy(const In& gy, const EpilogueGrad& e) {
  return {orient<L, T>(gy), orient<L, T>(e.out), orient<L, T>(e.gres)};
}

In as_in(const Out& t) { return {t.data, t.sN, t.sC, t.sHW}; }

template <int L>
Dims dims(const Shape& s) {
  const int64_t O = L == kFlat ? 1 : L == kCl ? s.HW : s.C;
  const int64_t I = L == kFlat ? s.C * s.HW : L == kCl ? s.C : s.HW;
  return {s.N, O, I, s.C, s.HW, 1.f / float(s.C), 1.f / float(s.HW)};
}

// Whether `vec` elements of `elem` bytes can be loaded at once from every full-size tensor
// present (inner stride 1, rows and base aligned) and every small tensor (16-byte aligned base).
bool vec_fits(int vec, int elem, bool cl, int64_t inner, std::initializer_list<In> full,
              std::initializer_list<const void*> small) {
  if (inner % vec != 0) return false;
  for (const In& t : full) {
    const int64_t s_inner = cl ? t.sC : t.sHW, s_outer = cl ? t.sHW : t.sC;
    if (t.data != nullptr &&
        (s_inner != 1 || t.sN % vec != 0 || s_outer % vec != 0 ||
         reinterpret_cast<uintptr_t>(t.data) % (vec * elem) != 0))
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

// Whether 16-byte loads and stores fit the flat view (kFlat) of NCHW tensors: every full-size
// tensor present holds each sample's C*H*W elements contiguously (in NCHW order), aligned.
// Small tensors are read one element at a time there.
bool flat_fits(DType dt, const Shape& s, std::initializer_list<In> full) {
  const int vec = 16 / elem_size(dt);
  bool fits = s.C * s.HW % vec == 0;
  for (const In& t : full) {
    fits = fits && (t.data == nullptr ||
                    ((t.sHW == 1 || s.HW == 1) && (t.sC == s.HW || s.C == 1) &&
                     t.sN % vec == 0 && reinterpret_cast<uintptr_t>(t.data) % 16 == 0));
  }
  return fits;
}

// The layout and bytes per access of an elementwise pass over NCHW-like (cl false) or
// channels-last-like tensors: the flat view where it moves 16 bytes and the rows do not.
std::pair<int, int> elementwise_layout(DType dt, bool cl, const Shape& s,
                                       std::initializer_list<In> full,
                                       std::initializer_list<const void*> small) {
  const int rows = vec_bytes(dt, cl, s, full, small);
  if (cl) return {kCl, rows};
  return rows < 16 && flat_fits(dt, s, full) ? std::pair{kFlat, 16} : std::pair{kNchw, rows};
}

template <typename T>
struct Tag {
  using type = T;
};

// Calls f.template operator()<T, VEC, L>() for the dtype T, with VEC = bytes / sizeof(T) (or 1)
// and the layout L (kFlat, with 16 bytes, only where kWithFlat: the elementwise passes).
template <bool kWithFlat = false, typename F>
void dispatch(DType dt, int bytes, int layout, F&& f) {
  auto with_type = [&]<typename T>(Tag<T>) {
    auto with_vec = [&]<int VEC>() {
      if (layout == kCl) {
        f.template operator()<T, VEC, kCl>();
      } else if (layout == kNchw) {
        f.template operator()<T, VEC, kNchw>();
      } else if constexpr (kWithFlat && VEC * sizeof(T) == 16) {
        f.template operator()<T, VEC, kFlat>();
      }
    };
    if (bytes == 16)
      with_vec.template operator()<16 / sizeof(T)>();
    else if (bytes == 8)
      with_vec.template operator()<8 / sizeof(T)>();
    else
      with_vec.template operator()<1>();
  };
  switch (dt) {
    case DType::kHalf: with_type(Tag<__half>{}); break;
    case DType::kBFloat16: with_type(Tag<__nv_bfloat16>{}); break;
    case DType::kFloat: with_type(Tag<float>{}); break;
  }
}

// S ranges of `chunk` elements (a multiple of the widest vector; the last range may be shorter).
struct Split {
  int64_t S, chunk;
};

// The split of a reduction over H*W (over_hw) or C, whose reduced axis is the inner (contiguous)
// one or not: as many ranges as keep about `target` (n, kept index, range) triples, each range at
// least `min_range` long, at most kMaxSplits. An inner reduction gives each triple up to 32
// lanes, an outer one a column of a block's threads: hence different targets. (Estimates, not
// yet tuned on a GPU.)
Split split_of(int64_t N, int64_t C, int64_t HW, bool over_hw, bool inner) {
  const int64_t kept = N * (over_hw ? C : HW), length = over_hw ? HW : C;
  if (kept == 0 || length == 0) return {1, kWidestVec};
  const int64_t target = inner ? 8192 : 131072, min_range = inner ? 1024 : 256;
  const int64_t S = std::max<int64_t>(
      1, std::min({ceil_div(target, kept), length / min_range, kMaxSplits}));
  const int64_t chunk = ceil_div(ceil_div(length, S), kWidestVec) * kWidestVec;
  return {ceil_div(length, chunk), chunk};
}

// Reduce `value` over H*W (REDUCE_HW) or over C into the partials of `sink`, one range of the
// reduced axis per group of lanes (inner axis) or per block row (outer axis).
template <bool kMax, bool REDUCE_HW, int VEC, int L, typename Value>
void reduce(const Value& value, const Sink& sink, cudaStream_t stream) {
  const Dims& d = value.d;
  constexpr bool kInner = REDUCE_HW != (L == kCl);  // the reduced axis is the inner one
  const Split split = split_of(d.N, d.C, d.HW, REDUCE_HW, kInner);
  if constexpr (kInner) {
    const int64_t range = std::min(split.chunk, d.I);
    const int G = pow2_at_least(ceil_div(ceil_div(range, VEC), kMinLoads), 32);
    const int64_t threads = split.S * d.N * d.O * G;
    launch(reduce_inner_kernel<kMax, VEC, Value>, dim3(ceil_div(threads, kThreads)),
           dim3(kThreads), stream, value, G, split.chunk, split.S, sink);
  } else {
    const int64_t vecs = ceil_div(d.I, VEC);
    const int TX = pow2_at_least(vecs, 32), TY = kThreads / TX;
    const int64_t tiles = ceil_div(vecs, TX);
    launch(reduce_outer_kernel<kMax, VEC, Value>, dim3(d.N * tiles, split.S), dim3(TX, TY),
           stream, value, tiles, split.chunk, sink);
  }
}

// `tasks` blocks of op.task ahead of the elementwise ones (see elementwise_kernel).
template <int VEC, typename Op>
void elementwise(const Op& op, cudaStream_t stream, int64_t tasks = 0) {
  const Dims& d = op.d;
  const int TX = pow2_at_least(ceil_div(d.I, VEC), kThreads), TY = kThreads / TX;
  const int64_t row_blocks = std::min<int64_t>(ceil_div(d.N * d.O, TY), 0x7fffffff - tasks);
  const int64_t splits = std::min({std::max<int64_t>(1, ceil_div(kTargetBlocks, row_blocks)),
                                   ceil_div(d.I, int64_t(TX) * VEC), int64_t(65535)});
  const int64_t tail = ceil_div(tasks, splits);
  launch(elementwise_kernel<VEC, Op>, dim3(tail + row_blocks, splits), dim3(TX, TY), stream, op,
         tail);
}

GradStore grad_store(const ParamGrad& g) {
  GradStore out;
  std::copy(g.strides, g.strides + 4, out.s);
  if (g.data == nullptr) return out;
  switch (g.dt) {
    case DType::kFloat: out.f32 = static_cast<float*>(g.data); break;
    case DType::kHalf: out.f16 = static_cast<__half*>(g.data); break;
    case DType::kBFloat16: out.bf16 = static_cast<__nv_bfloat16*>(g.data); break;
  }
  return out;
}

// The tasks of `tail`: one per kTaskChannels channels of the MLP, or one for the spatial gate
// alone, or none.
ParamTasks param_tasks(const ParamTail& t) {
  ParamTasks p;
  if (t.gz != nullptr) {
    p.tasks = ceil_div(t.C, kTaskChannels);
    p.gz = t.gz;
    p.ghidden = t.ghidden;
    p.pooled = t.pooled;
    p.hidden = t.hidden;
    p.N = t.N;
    p.C = t.C;
    p.R = t.R;
    p.K = int(t.K);
    p.silu = t.silu;
    p.gw1 = grad_store(t.gw1);
    p.gb1 = grad_store(t.gb1);
    p.gw2 = grad_store(t.gw2);
    p.gb2 = grad_store(t.gb2);
  }
  if (t.wpart != nullptr) {
    p.tasks = std::max<int64_t>(p.tasks, 1);
    p.wpart = t.wpart;
    p.bn_part = t.bn_part;
    p.P = t.P;
    p.ksize = int(t.ksize);
    p.gconv = grad_store(t.gconv);
    p.gbn_w = grad_store(t.gbn_w);
    p.gbn_b = grad_store(t.gbn_b);
  }
  return p;
}

bool empty(const Shape& s) { return s.N == 0 || s.C == 0 || s.HW == 0; }

}  // namespace

int64_t splits(Shape s, In x, bool over_hw) {
  return split_of(s.N, s.C, s.HW, over_hw, over_hw != channels_inner(x)).S;
}

void pool_hw(DType dt, Shape s, In x, Partials p, cudaStream_t stream) {
  if (empty(s)) return;
  const bool cl = channels_inner(x);
  dispatch(dt, vec_bytes(dt, cl, s, {x}, {}), cl, [&]<typename T, int V, int L>() {
    const XCa<T, V, L> value{orient<L, T>(x), nullptr, dims<L>(s)};
    const Sink sink{p.sum, p.max, p.arg, s.N, s.C, 1.f / float(s.HW)};
    if (p.max != nullptr)
      reduce<true, true, V, L>(value, sink, stream);
    else
      reduce<false, true, V, L>(value, sink, stream);
  });
}

void channel_pool(DType dt, Shape s, In x, const Small& f, Partials p, cudaStream_t stream) {
  if (empty(s)) return;
  const bool cl = channels_inner(x);
  dispatch(dt, vec_bytes(dt, cl, s, {x}, {f.ca}), cl, [&]<typename T, int V, int L>() {
    const XCa<T, V, L> value{orient<L, T>(x), f.ca, dims<L>(s)};
    const Sink sink{p.sum, p.max, p.arg, s.N, s.HW, 1.f / float(s.C)};
    reduce<true, false, V, L>(value, sink, stream);
  });
}

void apply_gates(DType dt, Shape s, In x, const Small& f, In residual, Out y,
                 cudaStream_t stream) {
  if (empty(s)) return;
  const auto [layout, bytes] =
      elementwise_layout(dt, channels_inner(x), s, {x, residual, as_in(y)}, {f.ca, f.sa});
  dispatch<true>(dt, bytes, layout, [&]<typename T, int V, int L>() {
    elementwise<V>(ApplyGates<T, V, L>{orient<L, T>(x), orient<L, T>(residual),
                                       orient<L, T>(y), f, dims<L>(s)},
                   stream);
  });
}

void grad_spatial(DType dt, Shape s, In gy, In x, const Small& f, EpilogueGrad e, float* sum,
                  cudaStream_t stream) {
  if (empty(s)) return;
  const bool cl = channels_inner(x);
  const int bytes = vec_bytes(dt, cl, s, {x, gy, e.out, as_in(e.gres)}, {f.ca});
  dispatch(dt, bytes, cl, [&]<typename T, int V, int L>() {
    const GyXCa<T, V, L> value{epilogue_gy<L, T, V>(gy, e), orient<L, T>(x), f.ca, dims<L>(s)};
    reduce<false, false, V, L>(value, Sink{sum, nullptr, nullptr, s.N, s.HW, 1.f}, stream);
  });
}

void grad_channel(DType dt, Shape s, In gy, In x, const Small& f, EpilogueGrad e, float* sum,
                  cudaStream_t stream) {
  if (empty(s)) return;
  const bool cl = channels_inner(x);
  const int bytes =
      vec_bytes(dt, cl, s, {x, gy, e.out, as_in(e.gres)}, {f.sa, f.gp, f.cstar});
  dispatch(dt, bytes, cl, [&]<typename T, int V, int L>() {
    const Gx1X<T, V, L> value{epilogue_gy<L, T, V>(gy, e), orient<L, T>(x), f, dims<L>(s)};
    reduce<false, true, V, L>(value, Sink{sum, nullptr, nullptr, s.N, s.C, 1.f}, stream);
  });
}

void grad_input(DType dt, Shape s, In gy, const Small& f, const ParamTail& tail, Out gx,
                cudaStream_t stream) {
  if (empty(s)) return;
  const auto [layout, bytes] =
      elementwise_layout(dt, channels_inner(as_in(gx)), s, {gy, as_in(gx)},
                         {f.ca, f.sa, f.gp, f.cstar, f.ga, f.gm, f.pstar});
  const ParamTasks params = param_tasks(tail);
  dispatch<true>(dt, bytes, layout, [&]<typename T, int V, int L>() {
    elementwise<V>(
        GradInput<T, V, L>{orient<L, T>(gy), orient<L, T>(gx), f, dims<L>(s), params}, stream,
        params.tasks);
  });
}

bool has_kernel_image() {
  cudaFuncAttributes attr;
  const cudaError_t err =
      cudaFuncGetAttributes(&attr, elementwise_kernel<1, GradInput<float, 1, kNchw>>);
  if (err != cudaSuccess) (void)cudaGetLastError();  // not sticky; clear it
  return err == cudaSuccess;
}

}  // namespace cbam
