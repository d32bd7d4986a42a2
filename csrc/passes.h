// Host API of the six full-size passes of CBAM and SE (launchers in passes.cu).
//
// Plain C++: raw pointers, sizes and strides, no torch types, so that bindings.cpp stays a thin
// layer of argument checks. The math of each pass is cbam_kernels/passes_torch.py, argument for
// argument. Full-size tensors are float16, bfloat16 or float32 (4-D tensors seen as (N, C, H*W));
// small ones are float32 or int32, contiguous, 16-byte aligned; nullptr means "absent".
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <functional>

namespace cbam {

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
  const float* ca = nullptr;       // (N, C)       channel gate
  const float* sa = nullptr;       // (N, HW)      spatial gate
  const float* gp = nullptr;       // (N, 2, HW)   gradient of the pooled map p
  const int32_t* cstar = nullptr;  // (N, HW)      channel arg-max (needed with gp)
  const float* ga = nullptr;       // (N, C)       gradient of the average pool
  const float* gm = nullptr;       // (N, C)       gradient of the max pool
  const int32_t* pstar = nullptr;  // (N, C)       spatial arg-max (needed with gm)
  bool max_first = true;           // p[:, 0] holds the max over channels (else p[:, 1])
};

// Device memory for partial results; must stay valid for the work queued on the stream.
using Workspace = std::function<void*(size_t bytes)>;

// avg, mx, arg (N, C) = mean, max and first arg-max of x over H*W; mx and arg may be nullptr.
void pool_hw(DType dt, Shape s, In x, float* avg, float* mx, int32_t* arg, const Workspace& ws,
             cudaStream_t stream);
// p (N, 2, HW) = [max_c, mean_c] (or [mean_c, max_c]) of x * ca; cstar (N, HW) the arg-max.
void channel_pool(DType dt, Shape s, In x, const Small& f, float* p, int32_t* cstar,
                  const Workspace& ws, cudaStream_t stream);
// y = x * ca * sa (uses f.ca, f.sa); with residual.data, relu(x * ca * sa + residual).
void apply_gates(DType dt, Shape s, In x, const Small& f, In residual, Out y,
                 cudaStream_t stream);
// gsa (N, HW) = sum_c gy * x * ca  (uses f.ca).
void grad_spatial(DType dt, Shape s, In gy, In x, const Small& f, float* gsa, const Workspace& ws,
                  cudaStream_t stream);
// gca (N, C) = sum_hw gx1 * x, gx1 = gy * sa + gp_mean / C + gp_max * [c == cstar].
void grad_channel(DType dt, Shape s, In gy, In x, const Small& f, float* gca, const Workspace& ws,
                  cudaStream_t stream);
// gx = gx1 * ca + ga / HW + gm * [hw == pstar]  (uses every field of f; x is not needed).
void grad_input(DType dt, Shape s, In gy, const Small& f, Out gx, cudaStream_t stream);

// Whether the kernels hold an image (SASS or PTX) that runs on the current device.
bool has_kernel_image();

}  // namespace cbam
