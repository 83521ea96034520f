// Llama-style RMSNorm for bf16 on CPU, forward and backward in one pass over each row:
// kubetune::rms_norm_forward and kubetune::rms_norm_backward.
//
// The arithmetic is transformers' LlamaRMSNorm, rounding for rounding except the order of the
// sum of squares: y = bf16(w * bf16(x * rstd)), rstd = 1 / sqrt(mean(x^2) + eps) in fp32. The
// backward is fused_norm.py's closed form, dx = rstd * (g - xhat * mean(g * xhat)) with
// g = bf16(dy * w) and xhat = x * rstd in fp32. torch's op-by-op version makes about ten
// full-size passes (and fp32 copies) per norm in a training step; this makes one each way.
// Needs AVX-512 BF16 (compiled with the flags in kernels/__init__.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>

#include "bf16_vec.h"

namespace {

using namespace kubetune::bf16_vec;

std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "rms_norm_forward: bf16 only");
  const at::Tensor x = x_in.contiguous(), w = weight.contiguous();
  const int64_t H = x.size(-1), rows = x.numel() / H;
  TORCH_CHECK(w.numel() == H, "rms_norm_forward: weight size");
  at::Tensor y = at::empty_like(x);
  auto rstd_sizes = x.sizes().vec();
  rstd_sizes.back() = 1;
  at::Tensor rstd = at::empty(rstd_sizes, x.options().dtype(at::kFloat));
  const bf16 *xd = x.const_data_ptr<bf16>(), *wd = w.const_data_ptr<bf16>();
  bf16* yd = y.data_ptr<bf16>();
  float* rd = rstd.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const bf16* xr = xd + r * H;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < H; i += 16) {
        const __m512 v = load_bf16(xr + i, lanes_at(i, H));
        acc = _mm512_fmadd_ps(v, v, acc);
      }
      const float inv = 1.0f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(H) + static_cast<float>(eps));
      rd[r] = inv;
      const __m512 vinv = _mm512_set1_ps(inv);
      for (int64_t i = 0; i < H; i += 16) {
        const __mmask16 m = lanes_at(i, H);
        const __m512 normed = round_bf16(_mm512_mul_ps(load_bf16(xr + i, m), vinv));
        store_bf16(yd + r * H + i, m, _mm512_mul_ps(load_bf16(wd + i, m), normed));
      }
    }
  });
  return {y, rstd};
}

at::Tensor rms_norm_backward(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& weight,
                             const at::Tensor& rstd_in) {
  TORCH_CHECK(grad_in.scalar_type() == at::kBFloat16 && x_in.scalar_type() == at::kBFloat16 &&
                  weight.scalar_type() == at::kBFloat16 && rstd_in.scalar_type() == at::kFloat,
              "rms_norm_backward: bf16 tensors and an fp32 rstd");
  const at::Tensor g = grad_in.contiguous(), x = x_in.contiguous(), w = weight.contiguous(),
                   rstd = rstd_in.contiguous();
  const int64_t H = x.size(-1), rows = x.numel() / H;
  at::Tensor dx = at::empty_like(x);
  const bf16 *gd = g.const_data_ptr<bf16>(), *xd = x.const_data_ptr<bf16>(), *wd = w.const_data_ptr<bf16>();
  const float* rd = rstd.const_data_ptr<float>();
  bf16* dxd = dx.data_ptr<bf16>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const bf16 *gr = gd + r * H, *xr = xd + r * H;
      const __m512 vr = _mm512_set1_ps(rd[r]);
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < H; i += 16) {  // mean(g * xhat)
        const __mmask16 m = lanes_at(i, H);
        const __m512 gw = round_bf16(_mm512_mul_ps(load_bf16(gr + i, m), load_bf16(wd + i, m)));
        acc = _mm512_fmadd_ps(gw, _mm512_mul_ps(load_bf16(xr + i, m), vr), acc);
      }
      const __m512 dot = _mm512_set1_ps(_mm512_reduce_add_ps(acc) / static_cast<float>(H));
      for (int64_t i = 0; i < H; i += 16) {
        const __mmask16 m = lanes_at(i, H);
        const __m512 gw = round_bf16(_mm512_mul_ps(load_bf16(gr + i, m), load_bf16(wd + i, m)));
        const __m512 xhat = _mm512_mul_ps(load_bf16(xr + i, m), vr);
        store_bf16(dxd + r * H + i, m, _mm512_mul_ps(_mm512_sub_ps(gw, _mm512_mul_ps(xhat, dot)), vr));
      }
    }
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kubetune, m) {
  m.def("rms_norm_forward(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor grad, Tensor x, Tensor weight, Tensor rstd) -> Tensor");
}

TORCH_LIBRARY_IMPL(kubetune, CPU, m) {
  m.impl("rms_norm_forward", &rms_norm_forward);
  m.impl("rms_norm_backward", &rms_norm_backward);
}
