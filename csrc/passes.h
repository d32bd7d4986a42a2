// Host API of the six full-size passes of CBAM and SE (launchers in passes.cu).
//
// Plain C++: raw pointers, sizes and strides, no torch types, so that ops.cpp stays a thin
// layer of argument checks. The math of each pass is cbam_kernels/ops/torch/passes.py, argument for
// argument. Full-size tensors are float16, bfloat16 or float32 (4-D tensors seen as (N, C, H*W));
// small ones are float32 or int32, contiguous, 16-byte aligned; nullptr means "absent".
//
// The reductions return partials: the reduced axis is cut into S consecutive ranges (splits()),
// and each range writes its own results, (S, N, K) float32/int32 arrays that the consumer
// combines in range order (cbam_kernels/ops/torch/passes.py, Partials and combine_partials).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace cbam {

// A pointer that the kernels dereference: a plain pointer, or a bounds- and alignment-checked
// one in the CPU emulation of the kernels (tests/cuda_emulation, which defines CBAM_EMULATION).
#ifdef CBAM_EMULATION
template <typename T>
using Ptr = emulation::Checked<T>;
#else
template <typename T>
using Ptr = T*;
#endif

enum class DType { kHalf, kBFloat16, kFloat };

struct Shape {
  int64_t N, C, HW;
};

// A full-size tensor as (N, C, H*W), strides in elements (0 for a dimension of size 1).
struct In {
  const void* data;
  int64_t sN, sC, sHW;
};
struct Out {
  void* data;
  int64_t sN, sC, sHW;
};

// The small per-sample tensors a pass may use (which ones, see each launcher).
struct Small {
  Ptr<const float> ca = nullptr;       // (N, C)       channel gate
  Ptr<const float> sa = nullptr;       // (N, HW)      spatial gate
  Ptr<const float> gp = nullptr;       // (N, 2, HW)   gradient of the pooled map p
  Ptr<const int32_t> cstar = nullptr;  // (N, HW)      channel arg-max (needed with gp)
  Ptr<const float> ga = nullptr;       // (N, C)       gradient of the average pool
  Ptr<const float> gm = nullptr;       // (N, C)       gradient of the max pool
  Ptr<const int32_t> pstar = nullptr;  // (N, C)       spatial arg-max (needed with gm)
  bool max_first = true;               // gp[:, 0] is the gradient of the max over channels
};

// Where a reduction writes its partials, each (S, N, K) contiguous: per range of the reduced
// axis, the sum divided by the reduction's divisor, and (when max is not null) the max and the
// index along the whole axis of its first occurrence.
struct Partials {
  float* sum;
  float* max = nullptr;
  int32_t* arg = nullptr;
};

// The backward of the ResNet epilogue relu(... + residual) in front of a reduction of gy: with
// out.data (the forward's output), g = 0 where out <= 0, else gy (as torch's threshold_backward:
// a NaN in out passes gy), is reduced in place of gy and written to gres, each element once, by
// the thread that reduces it.
struct EpilogueGrad {
  In out;
  Out gres;
};

// A parameter gradient to write: its parameter's dtype and strides; data nullptr: absent.
struct ParamGrad {
  void* data = nullptr;
  DType dt = DType::kFloat;
  int64_t strides[4] = {0, 0, 0, 0};
};

// The parameter gradients that grad_input's launch also computes (sums over the batch; see
// ParamTasks in passes.cuh). Channel gate (gz nullptr: absent): gz (N, C), ghidden and hidden
// (K, N, R), pooled (K, N, C), the MLP's activation (silu, else relu), and gw1 (R, C), gb1 (R),
// gw2 (C, R), gb2 (C). Spatial gate (wpart nullptr: absent): P per-program partials wpart
// (P, 2 k k) and bn_part (P, 2), and gconv (1, 2, k, k), gbn_w (1), gbn_b (1). All inputs are
// float32 and contiguous.
struct ParamTail {
  const float* gz = nullptr;
  const float* ghidden = nullptr;
  const float* pooled = nullptr;
  const float* hidden = nullptr;
  int64_t N = 0, C = 0, R = 0, K = 1;
  bool silu = false;
  ParamGrad gw1, gb1, gw2, gb2;
  const float* wpart = nullptr;
  const float* bn_part = nullptr;
  int64_t P = 0, ksize = 0;
  ParamGrad gconv, gbn_w, gbn_b;
};

// S, the number of ranges that the reduction over H*W (over_hw) or over C of x cuts its axis
// into, as the launchers do: from the shape and which axis of x is contiguous only (not the
// dtype, alignment or GPU); 1 when x is empty.
int64_t splits(Shape s, In x, bool over_hw);

// Partials over H*W of x: sums divided by HW, max and h*w arg-max when p.max; K = C.
void pool_hw(DType dt, Shape s, In x, Partials p, cudaStream_t stream);
// Partials over C of x * ca (uses f.ca): sums divided by C, max and channel arg-max; K = HW.
void channel_pool(DType dt, Shape s, In x, const Small& f, Partials p, cudaStream_t stream);
// y = x * ca * sa (uses f.ca, f.sa); with residual.data, relu(x * ca * sa + residual).
void apply_gates(DType dt, Shape s, In x, const Small& f, In residual, Out y,
                 cudaStream_t stream);
// Partial sums over C of g * x * ca (uses f.ca); K = HW.
void grad_spatial(DType dt, Shape s, In gy, In x, const Small& f, EpilogueGrad e, float* sum,
                  cudaStream_t stream);
// Partial sums over H*W of gx1 * x, gx1 = g * sa + gp_mean / C + gp_max * [c == cstar]; K = C.
void grad_channel(DType dt, Shape s, In gy, In x, const Small& f, EpilogueGrad e, float* sum,
                  cudaStream_t stream);
// gx = gx1 * ca + ga / HW + gm * [hw == pstar]  (uses every field of f; x is not needed); the
// same launch writes the parameter gradients of `tail`.
void grad_input(DType dt, Shape s, In gy, const Small& f, const ParamTail& tail, Out gx,
                cudaStream_t stream);

// Whether the kernels hold an image (SASS or PTX) that runs on the current device.
bool has_kernel_image();

}  // namespace cbam
