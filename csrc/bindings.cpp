// Torch-facing side of the extension taopd_kernels._C: argument checks, output allocation, the
// launch on the current stream, and the torch.library ops
//     torch.ops.taopd.teachability_stats(zs, zt, vocab_size, top_k, temperature, sampled_ids?)
//         -> (lse_s, lse_t, entropy_s, kl_rev, kl_fwd, ids_s, ids_t, teacher_mass, disagreement,
//             expected_gap, logp_s_y, logp_t_y)   (the last two are empty [0] tensors without sampled_ids)
//     torch.ops.taopd.teachability_logit_grad(zs, zt?, vocab_size, temperature, sampled_estimator,
//         row_max, log_s0, expected_gap?, row_coef, sampled_ids?, sampled_weight?) -> float32 [R, zs.size(1)]
// Fake (meta) implementations are registered from Python (taopd_kernels/backends/cuda.py).
// Host compiler only: no device code here, so the kernels build with nvcc alone (see taopd_launch.h).
#include <cmath>
#include <optional>
#include <tuple>

#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "taopd_launch.h"

namespace taopd {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, "taopd: logits must be float32, float16 or bfloat16, got ", t.scalar_type(),
              "; cast them with .float() first");
  return DType::kFloat32;
}

void check_logits(const char* name, const at::Tensor& z, const at::Tensor& ref, int64_t vocab_size) {
  TORCH_CHECK(z.is_cuda(), "taopd: ", name, " must be a CUDA tensor, got device ", z.device());
  TORCH_CHECK(z.device() == ref.device(), "taopd: ", name, " is on ", z.device(), " but the student logits are on ",
              ref.device(), "; move both to one GPU");
  TORCH_CHECK(z.dim() == 2, "taopd: ", name, " must be 2-D [rows, V], got shape ", z.sizes(),
              "; flatten the leading dimensions with .reshape(-1, V)");
  TORCH_CHECK(z.size(0) == ref.size(0), "taopd: ", name, " has ", z.size(0), " rows but the student logits have ",
              ref.size(0));
  TORCH_CHECK(z.scalar_type() == ref.scalar_type(), "taopd: student and teacher logits must have one dtype, got ",
              ref.scalar_type(), " and ", z.scalar_type(), "; cast one of them (e.g. both .float())");
  TORCH_CHECK(z.size(1) >= vocab_size, "taopd: vocab_size=", vocab_size, " exceeds the width of ", name, " (",
              z.size(1), " columns)");
  TORCH_CHECK(z.size(1) <= 1 || z.stride(1) == 1,
              "taopd: ", name, " must have unit stride in the last dimension (got strides ", z.strides(),
              "); call .contiguous() first (any row stride is fine, e.g. a [:, :V] slice)");
}

void check_vocab(int64_t vocab_size) {
  TORCH_CHECK(vocab_size >= 1 && vocab_size <= (int64_t{1} << 30), "taopd: vocab_size must be in [1, 2^30], got ",
              vocab_size);
}

void check_row_vector(const char* name, const at::Tensor& t, const at::Tensor& ref, at::ScalarType dtype) {
  TORCH_CHECK(t.device() == ref.device(), "taopd: ", name, " is on ", t.device(), " but the logits are on ",
              ref.device());
  TORCH_CHECK(t.scalar_type() == dtype, "taopd: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == ref.size(0), "taopd: ", name, " must have shape [", ref.size(0),
              "] (one per row), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "taopd: ", name, " must be contiguous; call .contiguous() first");
}

float inv_temperature(double temperature) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "taopd: temperature must be a finite number > 0, got ",
              temperature);
  return static_cast<float>(1.0 / temperature);
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "taopd: launching ", what, " failed: ", cudaGetErrorString(err),
              " (was the extension built for this GPU's architecture? see TORCH_CUDA_ARCH_LIST)");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor, at::Tensor>
teachability_stats_cuda(const at::Tensor& zs, const at::Tensor& zt, int64_t vocab_size, int64_t top_k,
                        double temperature, const std::optional<at::Tensor>& sampled_ids) {
  check_vocab(vocab_size);
  check_logits("student logits (zs)", zs, zs, vocab_size);
  check_logits("teacher logits (zt)", zt, zs, vocab_size);
  const DType dt = dtype_of(zs);
  TORCH_CHECK(top_k >= 1 && top_k <= kMaxTopK, "taopd: top_k must be in [1, ", kMaxTopK,
              "] for the CUDA statistics kernel, got ", top_k, " (use backend='torch' for larger K)");
  TORCH_CHECK(top_k <= vocab_size, "taopd: top_k=", top_k, " exceeds vocab_size=", vocab_size);
  TORCH_CHECK(zs.size(0) <= 0x7fffffffLL, "taopd: at most 2^31-1 rows per call, got ", zs.size(0));
  const float inv_tau = inv_temperature(temperature);
  const bool with_y = sampled_ids.has_value() && sampled_ids->defined();
  if (with_y) check_row_vector("sampled_ids", *sampled_ids, zs, at::kLong);

  const c10::cuda::CUDAGuard guard(zs.device());
  const int64_t rows = zs.size(0);
  const auto f32 = zs.options().dtype(at::kFloat);
  const auto i64 = zs.options().dtype(at::kLong);
  at::Tensor lse_s = at::empty({rows}, f32), lse_t = at::empty({rows}, f32), ent = at::empty({rows}, f32);
  at::Tensor kl_rev = at::empty({rows}, f32), kl_fwd = at::empty({rows}, f32);
  at::Tensor ids_s = at::empty({rows, top_k}, i64), ids_t = at::empty({rows, top_k}, i64);
  at::Tensor mass = at::empty({rows}, f32), dis = at::empty({rows}, f32), gap = at::empty({rows}, f32);
  at::Tensor lp_s = at::empty({with_y ? rows : 0}, f32), lp_t = at::empty({with_y ? rows : 0}, f32);
  if (rows > 0) {
    StatsParams p;
    p.zs = zs.data_ptr();
    p.zt = zt.data_ptr();
    p.stride_s = zs.stride(0);
    p.stride_t = zt.stride(0);
    p.dtype = dt;
    p.rows = rows;
    p.vocab = static_cast<int>(vocab_size);
    p.k = static_cast<int>(top_k);
    p.inv_tau = inv_tau;
    p.sampled = with_y ? sampled_ids->data_ptr<int64_t>() : nullptr;
    p.lse_s = lse_s.data_ptr<float>();
    p.lse_t = lse_t.data_ptr<float>();
    p.entropy_s = ent.data_ptr<float>();
    p.kl_rev = kl_rev.data_ptr<float>();
    p.kl_fwd = kl_fwd.data_ptr<float>();
    p.expected_gap = gap.data_ptr<float>();
    p.teacher_mass = mass.data_ptr<float>();
    p.disagreement = dis.data_ptr<float>();
    p.ids_s = ids_s.data_ptr<int64_t>();
    p.ids_t = ids_t.data_ptr<int64_t>();
    p.logp_s_y = with_y ? lp_s.data_ptr<float>() : nullptr;
    p.logp_t_y = with_y ? lp_t.data_ptr<float>() : nullptr;
    check_launch(launch_teachability_stats(p, c10::cuda::getCurrentCUDAStream().stream()), "teachability_stats");
  }
  return {lse_s, lse_t, ent, kl_rev, kl_fwd, ids_s, ids_t, mass, dis, gap, lp_s, lp_t};
}

at::Tensor teachability_logit_grad_cuda(const at::Tensor& zs, const std::optional<at::Tensor>& zt,
                                        int64_t vocab_size, double temperature, bool sampled_estimator,
                                        const at::Tensor& row_max, const at::Tensor& log_s0,
                                        const std::optional<at::Tensor>& expected_gap,
                                        const at::Tensor& row_coef,
                                        const std::optional<at::Tensor>& sampled_ids,
                                        const std::optional<at::Tensor>& sampled_weight) {
  check_vocab(vocab_size);
  check_logits("student logits (zs)", zs, zs, vocab_size);
  const DType dt = dtype_of(zs);
  const float inv_tau = inv_temperature(temperature);
  TORCH_CHECK(zs.size(0) <= 0x7fffffffLL, "taopd: at most 2^31-1 rows per call, got ", zs.size(0));
  TORCH_CHECK(zs.size(1) <= 0x7fffffffLL, "taopd: at most 2^31-1 columns, got ", zs.size(1));
  check_row_vector("row_max", row_max, zs, at::kFloat);
  check_row_vector("log_s0", log_s0, zs, at::kFloat);
  check_row_vector("row_coef", row_coef, zs, at::kFloat);
  auto has = [](const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); };
  if (sampled_estimator) {
    TORCH_CHECK(has(sampled_ids) && has(sampled_weight),
                "taopd: the sampled estimator needs sampled_ids and sampled_weight");
    check_row_vector("sampled_ids", *sampled_ids, zs, at::kLong);
    check_row_vector("sampled_weight", *sampled_weight, zs, at::kFloat);
  } else {
    TORCH_CHECK(has(zt) && has(expected_gap),
                "taopd: the full estimator needs the teacher logits (zt) and expected_gap");
    check_logits("teacher logits (zt)", *zt, zs, vocab_size);
    check_row_vector("expected_gap", *expected_gap, zs, at::kFloat);
  }

  const c10::cuda::CUDAGuard guard(zs.device());
  at::Tensor out = at::empty({zs.size(0), zs.size(1)}, zs.options().dtype(at::kFloat));
  if (out.numel() > 0) {
    GradParams p;
    p.zs = zs.data_ptr();
    p.zt = sampled_estimator ? nullptr : zt->data_ptr();
    p.stride_s = zs.stride(0);
    p.stride_t = sampled_estimator ? 0 : zt->stride(0);
    p.dtype = dt;
    p.rows = zs.size(0);
    p.vocab = static_cast<int>(vocab_size);
    p.out_cols = static_cast<int>(zs.size(1));
    p.inv_tau = inv_tau;
    p.sampled_estimator = sampled_estimator;
    p.row_max = row_max.data_ptr<float>();
    p.log_s0 = log_s0.data_ptr<float>();
    p.expected_gap = sampled_estimator ? nullptr : expected_gap->data_ptr<float>();
    p.row_coef = row_coef.data_ptr<float>();
    p.sampled = sampled_estimator ? sampled_ids->data_ptr<int64_t>() : nullptr;
    p.sampled_weight = sampled_estimator ? sampled_weight->data_ptr<float>() : nullptr;
    p.out = out.data_ptr<float>();
    check_launch(launch_teachability_logit_grad(p, c10::cuda::getCurrentCUDAStream().stream()),
                 "teachability_logit_grad");
  }
  return out;
}

}  // namespace taopd

TORCH_LIBRARY(taopd, m) {
  m.def(
      "teachability_stats(Tensor zs, Tensor zt, int vocab_size, int top_k, float temperature, Tensor? sampled_ids)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "teachability_logit_grad(Tensor zs, Tensor? zt, int vocab_size, float temperature, bool sampled_estimator, "
      "Tensor row_max, Tensor log_s0, Tensor? expected_gap, Tensor row_coef, Tensor? sampled_ids, "
      "Tensor? sampled_weight)"
      " -> Tensor");
}

TORCH_LIBRARY_IMPL(taopd, CUDA, m) {
  m.impl("teachability_stats", &taopd::teachability_stats_cuda);
  m.impl("teachability_logit_grad", &taopd::teachability_logit_grad_cuda);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "taopd-kernels CUDA extension: registers torch.ops.taopd.teachability_stats and teachability_logit_grad";
  m.attr("max_top_k") = taopd::kMaxTopK;
}
