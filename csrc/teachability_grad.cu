// d loss / d student logits for the kept rows (docs/math.md, Loss and gradients), the same formula as
// backends/pytorch.py logit_grad_tile, on logits x = z * inv_tau (row_coef already holds grad_out / normalizer / tau):
//     full:    g = (p_s * ((x_s - x_t) - E_ps[x_s - x_t])) * coef   (0 where p_s == 0; cancellation-free)
//     sampled: g = (1[v == y] - p_s) * (coef * w),  w = logp_s(y) - logp_t(y)
// Columns >= vocab (up to out_cols) get 0. Grid: x = row, y = column blocks; 16-byte loads where aligned.
#include "common.cuh"

namespace taopd {
namespace {

constexpr int kThreads = 256;

template <DType DT>
__global__ void __launch_bounds__(kThreads) grad_kernel(const GradParams p, const bool vector, const bool out_vec) {
  using Tr = Elem<DT>;
  using Raw = typename Tr::raw;
  constexpr int E = Tr::kVec;
  static_assert(E % 4 == 0, "output is stored as float4");
  const int64_t row = blockIdx.x;
  const Raw* __restrict__ zs = static_cast<const Raw*>(p.zs) + row * p.stride_s;
  const Raw* __restrict__ zt = p.sampled_estimator ? nullptr : static_cast<const Raw*>(p.zt) + row * p.stride_t;
  float* __restrict__ out = p.out + row * static_cast<int64_t>(p.out_cols);
  const int vocab = p.vocab;
  const float inv_tau = p.inv_tau;
  const float row_max = p.row_max[row], log_s0 = p.log_s0[row];
  const float coef = p.row_coef[row];
  float eg = 0.f, cw = 0.f;
  int64_t y = -1;
  if (p.sampled_estimator) {
    y = p.sampled[row];
    cw = coef * p.sampled_weight[row];
  } else {
    eg = p.expected_gap[row];
  }
  const int step = gridDim.y * kThreads * E;
  for (int col = (blockIdx.y * kThreads + threadIdx.x) * E; col < p.out_cols; col += step) {
    float g[E];
    if (col < vocab) {
      Pack<Raw, E> ps, pt;
      load_pack(vector, zs, col, vocab, ps);
      if (!p.sampled_estimator) load_pack(vector, zt, col, vocab, pt);
#pragma unroll
      for (int j = 0; j < E; ++j) {
        const float xs = Tr::to_float(ps.v[j]) * inv_tau;
        // (x_s - max) - log S0, never x_s - lse: that would subtract two numbers of size |x| (eps |x| lost).
        const float prob = expf((xs - row_max) - log_s0);
        float v;
        if (p.sampled_estimator) {
          v = ((static_cast<int64_t>(col + j) == y ? 1.f : 0.f) - prob) * cw;
        } else {
          const float xt = Tr::to_float(pt.v[j]) * inv_tau;
          v = (prob > 0.f ? prob * ((xs - xt) - eg) : 0.f) * coef;
        }
        g[j] = (col + j < vocab) ? v : 0.f;
      }
    } else {
#pragma unroll
      for (int j = 0; j < E; ++j) g[j] = 0.f;
    }
    if (out_vec && col + E <= p.out_cols) {
#pragma unroll
      for (int j = 0; j < E; j += 4) {
        *reinterpret_cast<float4*>(out + col + j) = make_float4(g[j], g[j + 1], g[j + 2], g[j + 3]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < E; ++j) {
        if (col + j < p.out_cols) out[col + j] = g[j];
      }
    }
  }
}

template <DType DT>
cudaError_t launch_dt(const GradParams& p, bool vector, bool out_vec, cudaStream_t stream) {
  constexpr int E = Elem<DT>::kVec;
  const int64_t blocks_per_row = (static_cast<int64_t>(p.out_cols) + kThreads * E - 1) / (kThreads * E);
  const dim3 grid(static_cast<unsigned>(p.rows), static_cast<unsigned>(blocks_per_row < 65535 ? blocks_per_row : 65535));
  grad_kernel<DT><<<grid, kThreads, 0, stream>>>(p, vector, out_vec);
  return cudaGetLastError();
}

bool aligned16(const void* ptr, int64_t stride_elems, int64_t elem_bytes, int64_t rows) {
  if (ptr == nullptr) return true;
  const bool base = (reinterpret_cast<uintptr_t>(ptr) % 16) == 0;
  return base && (rows <= 1 || (stride_elems * elem_bytes) % 16 == 0);
}

}  // namespace

cudaError_t launch_teachability_logit_grad(const GradParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.out_cols <= 0) return cudaSuccess;
  if (p.rows > 0x7fffffffLL || p.vocab > p.out_cols) return cudaErrorInvalidValue;
  const int64_t es = p.dtype == DType::kFloat32 ? 4 : 2;
  const void* zt = p.sampled_estimator ? nullptr : p.zt;
  const bool vector = aligned16(p.zs, p.stride_s, es, p.rows) && aligned16(zt, p.stride_t, es, p.rows);
  const bool out_vec = (reinterpret_cast<uintptr_t>(p.out) % 16) == 0 && p.out_cols % 4 == 0;
  switch (p.dtype) {
    case DType::kFloat32: return launch_dt<DType::kFloat32>(p, vector, out_vec, stream);
    case DType::kFloat16: return launch_dt<DType::kFloat16>(p, vector, out_vec, stream);
    case DType::kBFloat16: return launch_dt<DType::kBFloat16>(p, vector, out_vec, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace taopd
