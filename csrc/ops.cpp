// The torch ops of the six passes: they check their arguments, allocate the results and call the
// launchers of passes.cu on the current stream of x's device. The math and conventions are those
// of cbam_kernels/ops/torch/passes.py; the Python side is cbam_kernels/ops/cuda/passes.py. The ops check
// that all their tensors are on x's device; the library they are registered in picks which
// device that is (see ops.h).
#include "ops.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "passes.h"

namespace cbam {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
// A reduction's partials: sum, max and arg (S, N, K); max and arg absent without a max.
using PartialsResult = std::tuple<Tensor, OptTensor, OptTensor>;

// The kernels' dtype of tensor `t` (x, or a parameter gradient called `name`).
DType dtype_of(const Tensor& t, const char* name = "x") {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat;
    default:
      TORCH_CHECK(false, "cbam_kernels_cuda: ", name, " must be float16, bfloat16 or float32, "
                  "got ", t.scalar_type());
  }
}

// Strides of a 4-D tensor seen as (N, C, H*W), 0 for a dimension of size 1; nullopt when H and
// W do not merge into one strided dimension.
std::optional<Out> view3(const Tensor& t) {
  auto st = [&](int d) { return t.size(d) == 1 ? int64_t(0) : t.stride(d); };
  const int64_t sH = st(2), sW = st(3);
  int64_t sHW;
  if (t.size(2) == 1)
    sHW = sW;
  else if (t.size(3) == 1 || sH == sW * t.size(3))
    sHW = t.size(3) == 1 ? sH : sW;
  else
    return std::nullopt;
  return Out{t.data_ptr(), st(0), st(1), sHW};
}

// A full-size input: itself when its H and W merge, else one contiguous copy.
Tensor mergeable(const Tensor& t) { return view3(t) ? t : t.contiguous(); }

In in(const Tensor& t) {
  const Out v = *view3(t);
  return {v.data, v.sN, v.sC, v.sHW};
}

Shape shape_of(const Tensor& x) { return {x.size(0), x.size(1), x.size(2) * x.size(3)}; }

void check_x(const Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "cbam_kernels_cuda: x must be 4-D (N, C, H, W), got ", x.dim(),
              "-D");
  dtype_of(x);
  TORCH_CHECK(x.size(1) < INT32_MAX && x.size(2) * x.size(3) < INT32_MAX,
              "cbam_kernels_cuda: C and H*W must be below 2**31 (int32 arg-max), got ",
              x.sizes());
}

// A second full-size input (gy, residual, out): x's shape, dtype and device, any layout.
void check_like_x(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes(), "cbam_kernels_cuda: ", name, " has shape ", t.sizes(),
              ", x has ", x.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "cbam_kernels_cuda: ", name, " is ",
              t.scalar_type(), ", x is ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "cbam_kernels_cuda: ", name, " is on ", t.device(),
              ", x on ", x.device());
}

// A small tensor of shape `shape` and dtype `dtype` on x's device, made contiguous; undefined
// when absent.
Tensor small(const OptTensor& t, const Tensor& x, at::IntArrayRef shape, at::ScalarType dtype,
             const char* name) {
  if (!t.has_value() || !t->defined()) return Tensor();
  TORCH_CHECK(t->sizes() == shape, "cbam_kernels_cuda: ", name, " must have shape ", shape,
              ", got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == dtype, "cbam_kernels_cuda: ", name, " must be ", dtype,
              ", got ", t->scalar_type());
  TORCH_CHECK(t->device() == x.device(), "cbam_kernels_cuda: ", name, " is on ", t->device(),
              ", x on ", x.device());
  return t->contiguous();
}

template <typename U>
const U* ptr(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<U>() : nullptr;
}

template <typename U>
U* ptr(const OptTensor& t) {
  return t ? t->data_ptr<U>() : nullptr;
}

// The small inputs besides ca, checked and contiguous; they must outlive the launches.
struct SmallInputs {
  Tensor sa, gp, cstar, ga, gm, pstar;
  SmallInputs(const Tensor& x, const OptTensor& sa_, const OptTensor& gp_,
              const OptTensor& cstar_, const OptTensor& ga_ = std::nullopt,
              const OptTensor& gm_ = std::nullopt, const OptTensor& pstar_ = std::nullopt) {
    const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
    sa = small(sa_, x, {N, H, W}, at::kFloat, "sa");
    gp = small(gp_, x, {N, 2, H, W}, at::kFloat, "gp");
    cstar = small(cstar_, x, {N, H, W}, at::kInt, "cstar");
    ga = small(ga_, x, {N, C}, at::kFloat, "ga");
    gm = small(gm_, x, {N, C}, at::kFloat, "gm");
    pstar = small(pstar_, x, {N, C}, at::kInt, "pstar");
    TORCH_CHECK(!gp.defined() || cstar.defined(), "cbam_kernels_cuda: gp needs cstar");
    TORCH_CHECK(!gm.defined() || pstar.defined(), "cbam_kernels_cuda: gm needs pstar");
  }
  void fill(Small& f) const {
    f.sa = ptr<float>(sa);
    f.gp = ptr<float>(gp);
    f.cstar = ptr<int32_t>(cstar);
    f.ga = ptr<float>(ga);
    f.gm = ptr<float>(gm);
    f.pstar = ptr<int32_t>(pstar);
  }
};

// A parameter gradient the grad-input launch writes, checked to have shape `shape` (a 1x1 conv
// kernel's (R, C, 1, 1) for an (R, C) matrix) and to be on x's device.
ParamGrad param_grad(const OptTensor& g, const Tensor& x, std::vector<int64_t> shape,
                     const char* name) {
  if (!g.has_value() || !g->defined()) return {};
  TORCH_CHECK(g->device() == x.device(), "cbam_kernels_cuda: ", name, " is on ", g->device(),
              ", x on ", x.device());
  auto sizes = g->sizes().vec();
  if (sizes.size() == 4 && shape.size() == 2 && sizes[2] == 1 && sizes[3] == 1) sizes.resize(2);
  TORCH_CHECK(sizes == shape, "cbam_kernels_cuda: ", name, " must have shape ",
              at::IntArrayRef(shape), ", got ", g->sizes());
  ParamGrad out{g->data_ptr(), dtype_of(*g, name)};
  for (int64_t d = 0; d < std::min<int64_t>(g->dim(), 4); ++d) out.strides[d] = g->stride(d);
  return out;
}

// The parameter-gradient work of grad_input: the inputs (gz, ghidden, pooled, hidden, wpart,
// bn_part; none, or six entries, each optional) and the gradients to fill (none, or gw1, gb1,
// gw2, gb2, gconv, gbn_w, gbn_b), checked; the inputs must outlive the launch.
struct TailInputs {
  Tensor gz, ghidden, pooled, hidden, wpart, bn_part;
  ParamTail tail;
  TailInputs(const c10::List<OptTensor>& in, const c10::List<OptTensor>& grads, bool silu,
             const Tensor& x) {
    if (in.empty() && grads.empty()) return;
    TORCH_CHECK(in.size() == 6 && grads.size() == 7, "cbam_kernels_cuda: grad_input takes 6 "
                "parameter-gradient inputs and 7 gradients, got ", in.size(), " and ",
                grads.size());
    const auto input = [&](int i) { return OptTensor(in.get(i)); };
    const OptTensor gz_ = input(0), wpart_ = input(4);
    const int64_t N = x.size(0), C = x.size(1);
    if (gz_ && gz_->defined()) {
      const OptTensor pooled_ = input(2), hidden_ = input(3);
      TORCH_CHECK(pooled_ && hidden_ && pooled_->dim() == 3 && hidden_->dim() == 3,
                  "cbam_kernels_cuda: the channel gate's tail needs pooled and hidden (K, N, *)");
      const int64_t K = pooled_->size(0), R = hidden_->size(2);
      gz = small(gz_, x, {N, C}, at::kFloat, "gz");
      ghidden = small(input(1), x, {K, N, R}, at::kFloat, "ghidden");
      pooled = small(pooled_, x, {K, N, C}, at::kFloat, "pooled");
      hidden = small(hidden_, x, {K, N, R}, at::kFloat, "hidden");
      TORCH_CHECK(ghidden.defined(), "cbam_kernels_cuda: the channel gate's tail needs ghidden");
      tail.gz = gz.const_data_ptr<float>();
      tail.ghidden = ghidden.const_data_ptr<float>();
      tail.pooled = pooled.const_data_ptr<float>();
      tail.hidden = hidden.const_data_ptr<float>();
      tail.N = N;
      tail.C = C;
      tail.R = R;
      tail.K = K;
      tail.silu = silu;
      tail.gw1 = param_grad(grads.get(0), x, {R, C}, "gw1");
      tail.gb1 = param_grad(grads.get(1), x, {R}, "gb1");
      tail.gw2 = param_grad(grads.get(2), x, {C, R}, "gw2");
      tail.gb2 = param_grad(grads.get(3), x, {C}, "gb2");
      TORCH_CHECK(tail.gw1.data && tail.gw2.data, "cbam_kernels_cuda: gw1 and gw2 are needed");
    }
    if (wpart_ && wpart_->defined()) {
      const OptTensor gconv_ = grads.get(4);
      TORCH_CHECK(gconv_ && gconv_->dim() == 4 && wpart_->dim() == 2,
                  "cbam_kernels_cuda: the spatial gate's tail needs gconv and wpart");
      const int64_t k = gconv_->size(3), P = wpart_->size(0);
      wpart = small(wpart_, x, {P, 2 * k * k}, at::kFloat, "wpart");
      bn_part = small(input(5), x, {P, 2}, at::kFloat, "bn_part");
      TORCH_CHECK(bn_part.defined(), "cbam_kernels_cuda: the spatial gate's tail needs bn_part");
      tail.wpart = wpart.const_data_ptr<float>();
      tail.bn_part = bn_part.const_data_ptr<float>();
      tail.P = P;
      tail.ksize = k;
      tail.gconv = param_grad(gconv_, x, {1, 2, k, k}, "gconv");
      tail.gbn_w = param_grad(grads.get(5), x, {1}, "gbn_w");
      tail.gbn_b = param_grad(grads.get(6), x, {1}, "gbn_b");
    }
  }
};

Tensor channel_gate(const OptTensor& ca, const Tensor& x) {
  return small(ca, x, {x.size(0), x.size(1)}, at::kFloat, "ca");
}

// The (S, N, K) partials of a reduction of x over H*W (over_hw) or over C: the sums, and with
// with_max the max and arg. Over an empty axis (S = 1) the sums are final: 0, or NaN for a mean
// (as torch's mean of nothing).
PartialsResult partials_for(const Tensor& x, bool over_hw, bool with_max, bool mean) {
  const Shape s = shape_of(x);
  const int64_t S = splits(s, in(x), over_hw), K = over_hw ? s.C : s.HW;
  const auto f32 = x.options().dtype(at::kFloat);
  const bool nothing = (over_hw ? s.HW : s.C) == 0;
  const std::vector<int64_t> shape{S, s.N, K};
  Tensor sum = nothing ? at::full(shape, mean ? NAN : 0.f, f32) : at::empty(shape, f32);
  if (!with_max) return {sum, std::nullopt, std::nullopt};
  return {sum, at::empty(shape, f32), at::empty(shape, x.options().dtype(at::kInt))};
}

Partials sink(const PartialsResult& r) {
  return {std::get<0>(r).data_ptr<float>(), ptr<float>(std::get<1>(r)),
          ptr<int32_t>(std::get<2>(r))};
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// A full-size output laid out like torch.empty_like(x), and the tensor the kernel writes: the
// output itself, or a contiguous buffer copied into it (finish) when its H and W do not merge.
struct FullOutput {
  Tensor out, dst;
  explicit FullOutput(const Tensor& x) : out(at::empty_like(x)) {
    dst = view3(out) ? out : at::empty_like(out, at::MemoryFormat::Contiguous);
  }
  Tensor finish() const {
    if (!dst.is_same(out)) out.copy_(dst);
    return out;
  }
};

// The backward of the epilogue relu(... + residual) when its output `out` is given: out itself
// (checked, mergeable) and gres, the masked gy the reduction writes.
struct Epilogue {
  Tensor out;
  std::optional<FullOutput> gres;
  Epilogue(const OptTensor& out_, const Tensor& x_) {
    if (!out_.has_value() || !out_->defined()) return;
    check_like_x(*out_, x_, "out");
    out = mergeable(*out_);
    gres.emplace(x_);
  }
  EpilogueGrad view() const {
    if (!gres) return {{nullptr, 0, 0, 0}, {nullptr, 0, 0, 0}};
    return {in(out), *view3(gres->dst)};
  }
  OptTensor result() const { return gres ? OptTensor(gres->finish()) : std::nullopt; }
};

// The ops; each calls the launcher of the same name in namespace cbam.
namespace op {

PartialsResult pool_hw(const Tensor& x_, bool with_max) {
  check_x(x_);
  TORCH_CHECK(!with_max || x_.size(2) * x_.size(3) > 0 || x_.size(0) * x_.size(1) == 0,
              "cbam_kernels_cuda: pool_hw: a max over an empty H*W, x has shape ", x_.sizes());
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = mergeable(x_);
  PartialsResult out = partials_for(x, true, with_max, true);
  cbam::pool_hw(dtype_of(x), shape_of(x), in(x), sink(out), stream());
  return out;
}

PartialsResult channel_pool(const Tensor& x_, const OptTensor& ca_) {
  check_x(x_);
  TORCH_CHECK(x_.size(1) > 0 || x_.size(0) * x_.size(2) * x_.size(3) == 0,
              "cbam_kernels_cuda: channel_pool: a max over an empty C, x has shape ",
              x_.sizes());
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = mergeable(x_), ca = channel_gate(ca_, x);
  PartialsResult out = partials_for(x, false, true, true);
  Small f;
  f.ca = ptr<float>(ca);
  cbam::channel_pool(dtype_of(x), shape_of(x), in(x), f, sink(out), stream());
  return out;
}

Tensor apply_gates(const Tensor& x_, const OptTensor& ca_, const OptTensor& sa_,
                   const OptTensor& residual_) {
  check_x(x_);
  const bool with_residual = residual_.has_value() && residual_->defined();
  if (with_residual) check_like_x(*residual_, x_, "residual");
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = mergeable(x_), ca = channel_gate(ca_, x);
  const Tensor residual = with_residual ? mergeable(*residual_) : Tensor();
  const SmallInputs g(x, sa_, std::nullopt, std::nullopt);
  Small f;
  g.fill(f);
  f.ca = ptr<float>(ca);
  const FullOutput y(x_);
  const In res = with_residual ? in(residual) : In{nullptr, 0, 0, 0};
  cbam::apply_gates(dtype_of(x), shape_of(x), in(x), f, res, *view3(y.dst), stream());
  return y.finish();
}

std::tuple<Tensor, OptTensor> grad_spatial(const Tensor& gy_, const Tensor& x_,
                                           const OptTensor& ca_, const OptTensor& out_) {
  check_x(x_);
  check_like_x(gy_, x_, "gy");
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = mergeable(x_), gy = mergeable(gy_), ca = channel_gate(ca_, x);
  const Epilogue e(out_, x_);
  const Tensor sum = std::get<0>(partials_for(x, false, false, false));
  Small f;
  f.ca = ptr<float>(ca);
  cbam::grad_spatial(dtype_of(x), shape_of(x), in(gy), in(x), f, e.view(),
                     sum.data_ptr<float>(), stream());
  return {sum, e.result()};
}

std::tuple<Tensor, OptTensor> grad_channel(const Tensor& gy_, const Tensor& x_,
                                           const OptTensor& sa_, const OptTensor& gp_,
                                           const OptTensor& cstar_, bool max_first,
                                           const OptTensor& out_) {
  check_x(x_);
  check_like_x(gy_, x_, "gy");
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = mergeable(x_), gy = mergeable(gy_);
  const SmallInputs g(x, sa_, gp_, cstar_);
  const Epilogue e(out_, x_);
  Small f;
  g.fill(f);
  f.max_first = max_first;
  const Tensor sum = std::get<0>(partials_for(x, true, false, false));
  cbam::grad_channel(dtype_of(x), shape_of(x), in(gy), in(x), f, e.view(),
                     sum.data_ptr<float>(), stream());
  return {sum, e.result()};
}

Tensor grad_input(const Tensor& gy_, const Tensor& x_, const OptTensor& ca_, const OptTensor& sa_,
                  const OptTensor& gp_, const OptTensor& cstar_, bool max_first,
                  const OptTensor& ga_, const OptTensor& gm_, const OptTensor& pstar_,
                  const c10::List<OptTensor>& tail_, const c10::List<OptTensor>& grads,
                  bool silu) {
  check_x(x_);
  check_like_x(gy_, x_, "gy");
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor gy = mergeable(gy_), ca = channel_gate(ca_, x_);  // x itself is not read
  const SmallInputs g(x_, sa_, gp_, cstar_, ga_, gm_, pstar_);
  const TailInputs tail(tail_, grads, silu, x_);
  Small f;
  g.fill(f);
  f.ca = ptr<float>(ca);
  f.max_first = max_first;
  const FullOutput gx(x_);
  cbam::grad_input(dtype_of(x_), shape_of(x_), in(gy), f, tail.tail, *view3(gx.dst), stream());
  return gx.finish();
}

}  // namespace op
}  // namespace

void define_ops(torch::Library& m) {
  m.def("pool_hw(Tensor x, bool with_max) -> (Tensor, Tensor?, Tensor?)");
  m.def("channel_pool(Tensor x, Tensor? ca) -> (Tensor, Tensor?, Tensor?)");
  m.def("apply_gates(Tensor x, Tensor? ca, Tensor? sa, Tensor? residual=None) -> Tensor");
  m.def("grad_spatial(Tensor gy, Tensor x, Tensor? ca, Tensor? out=None) -> (Tensor, Tensor?)");
  m.def("grad_channel(Tensor gy, Tensor x, Tensor? sa, Tensor? gp, Tensor? cstar, "
        "bool max_first, Tensor? out=None) -> (Tensor, Tensor?)");
  m.def("grad_input(Tensor gy, Tensor x, Tensor? ca, Tensor? sa, Tensor? gp, Tensor? cstar, "
        "bool max_first, Tensor? ga, Tensor? gm, Tensor? pstar, Tensor?[] tail, "
        "Tensor(a!)?[] grads, bool silu) -> Tensor");
}

void impl_ops(torch::Library& m) {
  m.impl("pool_hw", &op::pool_hw);
  m.impl("channel_pool", &op::channel_pool);
  m.impl("apply_gates", &op::apply_gates);
  m.impl("grad_spatial", &op::grad_spatial);
  m.impl("grad_channel", &op::grad_channel);
  m.impl("grad_input", &op::grad_input);
}

}  // namespace cbam
