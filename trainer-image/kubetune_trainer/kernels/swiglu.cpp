// Llama's SwiGLU, silu(gate) * up, for bf16 on CPU: one pass forward, one pass backward
// (kubetune::swiglu_forward and kubetune::swiglu_backward).
//
// The roundings are those of torch's op-by-op version in bf16: s = bf16(silu(g)), h = bf16(s * u);
// backward du = bf16(dh * s), ds = bf16(dh * u), dg = bf16(ds * sig(g) * (1 + g * (1 - sig(g)))).
// torch makes five full-size passes for that (silu, mul; mul's two gradients, silu_backward) and
// keeps silu(g) alive for the backward; this makes one each way and keeps only g and u.
// Needs AVX-512 BF16 (compiled with the flags in kernels/__init__.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>
#include <torch/library.h>

#include "bf16_vec.h"

namespace {

using namespace kubetune::bf16_vec;
using Vec = at::vec::Vectorized<float>;

// 1 + exp(-g): torch's silu divides g by it, its backward takes the sigmoid as 1 over it.
inline __m512 one_plus_exp_neg(__m512 g) {
  return _mm512_add_ps(_mm512_set1_ps(1.0f), Vec(_mm512_sub_ps(_mm512_setzero_ps(), g)).exp());
}

void check(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16, what, ": bf16 only");
  TORCH_CHECK(a.sizes() == b.sizes(), what, ": gate and up differ in shape");
}

constexpr int64_t kGrain = 16384;  // elements per task: parallel_for's tasks stay large

at::Tensor swiglu_forward(const at::Tensor& gate_in, const at::Tensor& up_in) {
  check(gate_in, up_in, "swiglu_forward");
  const at::Tensor g = gate_in.contiguous(), u = up_in.contiguous();
  at::Tensor h = at::empty_like(g);
  const bf16 *gd = g.const_data_ptr<bf16>(), *ud = u.const_data_ptr<bf16>();
  bf16* hd = h.data_ptr<bf16>();
  const int64_t n = g.numel();
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += 16) {
      const __mmask16 m = lanes_at(i, end);
      const __m512 gv = load_bf16(gd + i, m);
      const __m512 s = round_bf16(_mm512_div_ps(gv, one_plus_exp_neg(gv)));
      store_bf16(hd + i, m, _mm512_mul_ps(s, load_bf16(ud + i, m)));
    }
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& grad_in, const at::Tensor& gate_in,
                                                   const at::Tensor& up_in) {
  check(gate_in, up_in, "swiglu_backward");
  check(grad_in, gate_in, "swiglu_backward");
  const at::Tensor dh = grad_in.contiguous(), g = gate_in.contiguous(), u = up_in.contiguous();
  at::Tensor dg = at::empty_like(g), du = at::empty_like(u);
  const bf16 *dhd = dh.const_data_ptr<bf16>(), *gd = g.const_data_ptr<bf16>(), *ud = u.const_data_ptr<bf16>();
  bf16 *dgd = dg.data_ptr<bf16>(), *dud = du.data_ptr<bf16>();
  const int64_t n = g.numel();
  const __m512 one = _mm512_set1_ps(1.0f);
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += 16) {
      const __mmask16 m = lanes_at(i, end);
      const __m512 gv = load_bf16(gd + i, m), dhv = load_bf16(dhd + i, m);
      const __m512 denom = one_plus_exp_neg(gv);
      const __m512 sig = _mm512_div_ps(one, denom);
      store_bf16(dud + i, m, _mm512_mul_ps(dhv, round_bf16(_mm512_div_ps(gv, denom))));
      const __m512 ds = round_bf16(_mm512_mul_ps(dhv, load_bf16(ud + i, m)));
      // (ds * sig) * (1 + g * (1 - sig)), in torch's order
      const __m512 slope = _mm512_add_ps(one, _mm512_mul_ps(gv, _mm512_sub_ps(one, sig)));
      store_bf16(dgd + i, m, _mm512_mul_ps(_mm512_mul_ps(ds, sig), slope));
    }
  });
  return {dg, du};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kubetune, m) {
  m.def("swiglu_forward(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kubetune, CPU, m) {
  m.impl("swiglu_forward", &swiglu_forward);
  m.impl("swiglu_backward", &swiglu_backward);
}
