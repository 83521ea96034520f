// Llama's rotary position embedding for bf16 on CPU: one pass forward, one pass backward
// (kubetune::rotary_forward and kubetune::rotary_backward).
//
// transformers computes x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1] for the two
// halves of each head, op by op: about five full-size passes forward and five backward, for the
// queries and for the keys. This makes one each way, with torch's roundings (each product
// rounded to bf16, then the sum), so the results are bit-identical:
//   out = [bf16(x1 c1) + bf16(-x2 s1),  bf16(x2 c2) + bf16(x1 s2)]      (each sum rounded)
//   dx  = [bf16(g1 c1) + bf16(g2 s2),   bf16(g2 c2) - bf16(g1 s1)]
// x is [B, L, H, D] contiguous (the projection's own layout), cos and sin [B or 1, L, D].
// Needs AVX-512 BF16 (compiled with the flags in kernels/__init__.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "bf16_vec.h"

namespace {

using namespace kubetune::bf16_vec;

inline __m512 round_mul(__m512 a, __m512 b) { return round_bf16(_mm512_mul_ps(a, b)); }

// backward is the same pass with sin's sign moved to the other half: forward computes
// [x1 c1 - x2 s1, x2 c2 + x1 s2], backward [g1 c1 + g2 s2, g2 c2 - g1 s1].
template <bool kBackward>
at::Tensor rotary(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && cos_in.scalar_type() == at::kBFloat16 &&
                  sin_in.scalar_type() == at::kBFloat16,
              "rotary: bf16 only");
  TORCH_CHECK(x_in.dim() == 4 && cos_in.dim() == 3 && cos_in.sizes() == sin_in.sizes(),
              "rotary: x is [B, L, H, D], cos and sin [B or 1, L, D]");
  const at::Tensor x = x_in.contiguous(), c = cos_in.contiguous(), s = sin_in.contiguous();
  const int64_t B = x.size(0), L = x.size(1), H = x.size(2), D = x.size(3), half = D / 2;
  TORCH_CHECK(D % 2 == 0 && c.size(1) == L && c.size(2) == D && (c.size(0) == B || c.size(0) == 1),
              "rotary: cos and sin do not match x");
  const bool per_batch = c.size(0) == B && B > 1;
  at::Tensor out = at::empty_like(x);
  const bf16 *xd = x.const_data_ptr<bf16>(), *cd = c.const_data_ptr<bf16>(), *sd = s.const_data_ptr<bf16>();
  bf16* od = out.data_ptr<bf16>();
  at::parallel_for(0, B * L, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t crow = (per_batch ? r : r % L) * D;
      for (int64_t h = 0; h < H; ++h) {
        const bf16* xr = xd + (r * H + h) * D;
        bf16* orow = od + (r * H + h) * D;
        for (int64_t i = 0; i < half; i += 16) {
          const __mmask16 m = lanes_at(i, half);
          const __m512 x1 = load_bf16(xr + i, m), x2 = load_bf16(xr + half + i, m);
          const __m512 c1 = load_bf16(cd + crow + i, m), c2 = load_bf16(cd + crow + half + i, m);
          const __m512 s1 = load_bf16(sd + crow + i, m), s2 = load_bf16(sd + crow + half + i, m);
          if (kBackward) {
            store_bf16(orow + i, m, _mm512_add_ps(round_mul(x1, c1), round_mul(x2, s2)));
            store_bf16(orow + half + i, m, _mm512_sub_ps(round_mul(x2, c2), round_mul(x1, s1)));
          } else {
            store_bf16(orow + i, m, _mm512_sub_ps(round_mul(x1, c1), round_mul(x2, s1)));
            store_bf16(orow + half + i, m, _mm512_add_ps(round_mul(x2, c2), round_mul(x1, s2)));
          }
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kubetune, m) {
  m.def("rotary_forward(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("rotary_backward(Tensor grad, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(kubetune, CPU, m) {
  m.impl("rotary_forward", &rotary<false>);
  m.impl("rotary_backward", &rotary<true>);
}
