// Host-side interface between the torch binding (bindings.cpp) and the kernels (*.cu).
//
// Plain C++ with only the CUDA runtime header: the kernels compile standalone with nvcc (no torch
// headers), and the binding never sees device code. All pointers are device pointers.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace taopd {

// Element type of both logit tensors (they must match; the Python side upcasts mixed inputs).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Largest top-K the statistics kernel supports (per-warp lists live in shared memory).
constexpr int kMaxTopK = 64;

// Statistics of docs/math.md, Per-position statistics for `rows` rows; one thread block per row.
struct StatsParams {
  const void* zs = nullptr;  // student logits, row r at zs + r * stride_s (elements), columns unit-stride
  const void* zt = nullptr;  // teacher logits, same dtype
  int64_t stride_s = 0;
  int64_t stride_t = 0;
  DType dtype = DType::kFloat32;
  int64_t rows = 0;
  int vocab = 0;        // only columns [0, vocab) are read
  int k = 1;            // 1 <= k <= min(kMaxTopK, vocab)
  float inv_tau = 1.f;  // logits are multiplied by this (float32) before anything else
  const int64_t* sampled = nullptr;  // optional [rows]; out-of-range ids give NaN log-probs
  // outputs, float32 [rows] unless noted
  float* lse_s = nullptr;
  float* lse_t = nullptr;
  float* entropy_s = nullptr;
  float* kl_rev = nullptr;
  float* kl_fwd = nullptr;
  float* expected_gap = nullptr;  // E_ps[x_s - x_t] (scaled logits): the backward's cancellation-free term
  float* teacher_mass = nullptr;  // C
  float* disagreement = nullptr;  // D
  int64_t* ids_s = nullptr;       // [rows, k], value descending, ties to the lower id
  int64_t* ids_t = nullptr;       // [rows, k]
  float* logp_s_y = nullptr;      // [rows] when sampled != nullptr
  float* logp_t_y = nullptr;
};

// d loss / d student logits (docs/math.md, Loss and gradients) for the rows given, float32 [rows, out_cols] contiguous.
struct GradParams {
  const void* zs = nullptr;
  const void* zt = nullptr;  // nullptr for the sampled estimator
  int64_t stride_s = 0;
  int64_t stride_t = 0;
  DType dtype = DType::kFloat32;
  int64_t rows = 0;
  int vocab = 0;     // columns >= vocab get 0
  int out_cols = 0;  // width of `out` (the student's logit width, >= vocab)
  float inv_tau = 1.f;
  bool sampled_estimator = false;
  const float* row_max = nullptr;   // [rows], max of the scaled student logits x_s
  const float* log_s0 = nullptr;    // [rows], log sum exp(x_s - row_max): p_s = e^((x_s - max) - log_s0)
  const float* expected_gap = nullptr;  // [rows], E_ps[x_s - x_t], full estimator
  const float* row_coef = nullptr;  // [rows], grad_out * m_t / sum(m) / tau
  const int64_t* sampled = nullptr;         // [rows], sampled estimator
  const float* sampled_weight = nullptr;    // [rows], logp_s(y) - logp_t(y), sampled estimator
  float* out = nullptr;
};

// Both return the launch error (cudaSuccess when the launch was queued on `stream`).
cudaError_t launch_teachability_stats(const StatsParams& p, cudaStream_t stream);
cudaError_t launch_teachability_logit_grad(const GradParams& p, cudaStream_t stream);

}  // namespace taopd
