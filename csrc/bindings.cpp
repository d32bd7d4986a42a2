// Torch bindings of the six passes: op schemas (TORCH_LIBRARY), CUDA implementations
// (TORCH_LIBRARY_IMPL) that check their arguments, allocate the results and call the launchers of
// passes.cu on the current stream of x's device. The math and conventions are those of
// cbam_kernels/passes_torch.py; the Python side is cbam_kernels/passes_cuda.py.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

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

using at::Tensor;
using OptTensor = std::optional<Tensor>;

cbam::DType dtype_of(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kHalf: return cbam::DType::kHalf;
    case at::kBFloat16: return cbam::DType::kBFloat16;
    case at::kFloat: return cbam::DType::kFloat;
    default:
      TORCH_CHECK(false, "cbam_kernels_cuda: x must be float16, bfloat16 or float32, got ",
                  x.scalar_type());
  }
}

// Strides of a 4-D tensor seen as (N, C, H*W), 0 for a dimension of size 1; nullopt when H and
// W do not merge into one strided dimension.
std::optional<cbam::Out> view3(const Tensor& t) {
  auto st = [&](int d) { return t.size(d) == 1 ? int64_t(0) : t.stride(d); };
  const int64_t sH = st(2), sW = st(3);
  int64_t sHW;
  if (t.size(2) == 1)
    sHW = sW;
  else if (t.size(3) == 1 || sH == sW * t.size(3))
    sHW = t.size(3) == 1 ? sH : sW;
  else
    return std::nullopt;
  return cbam::Out{t.data_ptr(), st(0), st(1), sHW};
}

// A full-size input: itself when its H and W merge, else one contiguous copy.
Tensor mergeable(const Tensor& t) { return view3(t) ? t : t.contiguous(); }

cbam::In in(const Tensor& t) {
  const cbam::Out v = *view3(t);
  return {v.data, v.sN, v.sC, v.sHW};
}

cbam::Shape shape_of(const Tensor& x) { return {x.size(0), x.size(1), x.size(2) * x.size(3)}; }

void check_x(const Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "cbam_kernels_cuda: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "cbam_kernels_cuda: x must be 4-D (N, C, H, W), got ", x.dim(),
              "-D");
  dtype_of(x);
  TORCH_CHECK(x.size(1) < INT32_MAX && x.size(2) * x.size(3) < INT32_MAX,
              "cbam_kernels_cuda: C and H*W must be below 2**31 (int32 arg-max), got ",
              x.sizes());
}

// A second full-size input (gy, residual): x's shape, dtype and device, any layout.
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
  void fill(cbam::Small& f) const {
    f.sa = ptr<float>(sa);
    f.gp = ptr<float>(gp);
    f.cstar = ptr<int32_t>(cstar);
    f.ga = ptr<float>(ga);
    f.gm = ptr<float>(gm);
    f.pstar = ptr<int32_t>(pstar);
  }
};

Tensor channel_gate(const OptTensor& ca, const Tensor& x) {
  return small(ca, x, {x.size(0), x.size(1)}, at::kFloat, "ca");
}

// Partials buffers, allocated from torch's caching allocator (safe under CUDA graph capture).
class Scratch {
 public:
  explicit Scratch(const Tensor& x) : options_(x.options().dtype(at::kByte)) {}
  cbam::Workspace workspace() {
    return [this](size_t bytes) {
      keep_.push_back(at::empty({int64_t(bytes)}, options_));
      return keep_.back().data_ptr();
    };
  }

 private:
  at::TensorOptions options_;
  std::vector<Tensor> keep_;
};

// A float32 sum over `terms` terms: zeros when there are none (the kernels are not launched).
Tensor sum_output(at::IntArrayRef shape, int64_t terms, const Tensor& x) {
  const auto f32 = x.options().dtype(at::kFloat);
  return terms == 0 ? at::zeros(shape, f32) : at::empty(shape, f32);
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// A full-size output laid out like torch.empty_like(x), and the tensor the kernel writes: the
// output itself, or a contiguous buffer copied into it when its H and W do not merge.
std::pair<Tensor, Tensor> full_output(const Tensor& x) {
  Tensor out = at::empty_like(x);
  return {out, view3(out) ? out : at::empty_like(out, at::MemoryFormat::Contiguous)};
}

Tensor finish(const Tensor& out, const Tensor& dst) {
  if (!dst.is_same(out)) out.copy_(dst);
  return out;
}

std::tuple<Tensor, Tensor, Tensor> pool_hw(const Tensor& x_, bool with_max) {
  check_x(x_);
  TORCH_CHECK(x_.size(2) * x_.size(3) > 0 || x_.size(0) * x_.size(1) == 0,
              "cbam_kernels_cuda: pool_hw over an empty H*W, x has shape ", x_.sizes());
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = mergeable(x_);
  const auto f32 = x.options().dtype(at::kFloat), i32 = x.options().dtype(at::kInt);
  const int64_t N = x.size(0), C = x.size(1);
  Tensor avg = at::empty({N, C}, f32), mx = at::empty({0}, f32), arg = at::empty({0}, i32);
  if (with_max) {
    mx = at::empty({N, C}, f32);
    arg = at::empty({N, C}, i32);
  }
  Scratch scratch(x);
  cbam::pool_hw(dtype_of(x), shape_of(x), in(x), avg.data_ptr<float>(),
                with_max ? mx.data_ptr<float>() : nullptr,
                with_max ? arg.data_ptr<int32_t>() : nullptr, scratch.workspace(), stream());
  return {avg, mx, arg};
}

std::tuple<Tensor, Tensor> channel_pool(const Tensor& x_, const OptTensor& ca_, bool max_first) {
  check_x(x_);
  TORCH_CHECK(x_.size(1) > 0 || x_.size(0) * x_.size(2) * x_.size(3) == 0,
              "cbam_kernels_cuda: channel_pool over an empty C, x has shape ", x_.sizes());
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = mergeable(x_), ca = channel_gate(ca_, x);
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  Tensor p = at::empty({N, 2, H, W}, x.options().dtype(at::kFloat));
  Tensor cstar = at::empty({N, H, W}, x.options().dtype(at::kInt));
  cbam::Small f;
  f.ca = ptr<float>(ca);
  f.max_first = max_first;
  Scratch scratch(x);
  cbam::channel_pool(dtype_of(x), shape_of(x), in(x), f, p.data_ptr<float>(),
                     cstar.data_ptr<int32_t>(), scratch.workspace(), stream());
  return {p, cstar};
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
  cbam::Small f;
  g.fill(f);
  f.ca = ptr<float>(ca);
  const auto [out, dst] = full_output(x_);
  const cbam::In res = with_residual ? in(residual) : cbam::In{nullptr, 0, 0, 0};
  cbam::apply_gates(dtype_of(x), shape_of(x), in(x), f, res, *view3(dst), stream());
  return finish(out, dst);
}

Tensor grad_spatial(const Tensor& gy_, const Tensor& x_, const OptTensor& ca_) {
  check_x(x_);
  check_like_x(gy_, x_, "gy");
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = mergeable(x_), gy = mergeable(gy_), ca = channel_gate(ca_, x);
  Tensor gsa = sum_output({x.size(0), x.size(2), x.size(3)}, x.size(1), x);
  cbam::Small f;
  f.ca = ptr<float>(ca);
  Scratch scratch(x);
  cbam::grad_spatial(dtype_of(x), shape_of(x), in(gy), in(x), f, gsa.data_ptr<float>(),
                     scratch.workspace(), stream());
  return gsa;
}

Tensor grad_channel(const Tensor& gy_, const Tensor& x_, const OptTensor& sa_,
                    const OptTensor& gp_, const OptTensor& cstar_, bool max_first) {
  check_x(x_);
  check_like_x(gy_, x_, "gy");
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = mergeable(x_), gy = mergeable(gy_);
  const SmallInputs g(x, sa_, gp_, cstar_);
  cbam::Small f;
  g.fill(f);
  f.max_first = max_first;
  Tensor gca = sum_output({x.size(0), x.size(1)}, x.size(2) * x.size(3), x);
  Scratch scratch(x);
  cbam::grad_channel(dtype_of(x), shape_of(x), in(gy), in(x), f, gca.data_ptr<float>(),
                     scratch.workspace(), stream());
  return gca;
}

Tensor grad_input(const Tensor& gy_, const Tensor& x_, const OptTensor& ca_, const OptTensor& sa_,
                  const OptTensor& gp_, const OptTensor& cstar_, bool max_first,
                  const OptTensor& ga_, const OptTensor& gm_, const OptTensor& pstar_) {
  check_x(x_);
  check_like_x(gy_, x_, "gy");
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor gy = mergeable(gy_), ca = channel_gate(ca_, x_);  // x itself is not read
  const SmallInputs g(x_, sa_, gp_, cstar_, ga_, gm_, pstar_);
  cbam::Small f;
  g.fill(f);
  f.ca = ptr<float>(ca);
  f.max_first = max_first;
  const auto [out, dst] = full_output(x_);
  cbam::grad_input(dtype_of(x_), shape_of(x_), in(gy), f, *view3(dst), stream());
  return finish(out, dst);
}

bool has_kernel_image(int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  return cbam::has_kernel_image();
}

}  // namespace

TORCH_LIBRARY(cbam_kernels_cuda, m) {
  m.def("pool_hw(Tensor x, bool with_max) -> (Tensor, Tensor, Tensor)");
  m.def("channel_pool(Tensor x, Tensor? ca, bool max_first) -> (Tensor, Tensor)");
  m.def("apply_gates(Tensor x, Tensor? ca, Tensor? sa, Tensor? residual=None) -> Tensor");
  m.def("grad_spatial(Tensor gy, Tensor x, Tensor? ca) -> Tensor");
  m.def("grad_channel(Tensor gy, Tensor x, Tensor? sa, Tensor? gp, Tensor? cstar, "
        "bool max_first) -> Tensor");
  m.def("grad_input(Tensor gy, Tensor x, Tensor? ca, Tensor? sa, Tensor? gp, Tensor? cstar, "
        "bool max_first, Tensor? ga, Tensor? gm, Tensor? pstar) -> Tensor");
  m.def("has_kernel_image(int device) -> bool", &has_kernel_image);
}

TORCH_LIBRARY_IMPL(cbam_kernels_cuda, CUDA, m) {
  m.impl("pool_hw", &pool_hw);
  m.impl("channel_pool", &channel_pool);
  m.impl("apply_gates", &apply_gates);
  m.impl("grad_spatial", &grad_spatial);
  m.impl("grad_channel", &grad_channel);
  m.impl("grad_input", &grad_input);
}
