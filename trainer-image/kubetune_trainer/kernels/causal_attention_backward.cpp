// Causal attention backward for bf16 on x86 CPUs with AMX: kubetune::causal_attention_backward.
//
// torch's CPU flash-attention backward computes the whole L x L square up to 512 keys, causal or
// not, and makes five small GEMM calls per 32-64 query rows; in a LoRA step it is a quarter of the
// time (docs/benchmarks.md). This kernel computes the same gradients (FlashAttention-2's
// backward, recomputing P from the forward's logsumexp) over the lower triangle only, with
// oneDNN's AMX micro-kernels (torch's cpublas::brgemm) on 128 x 128 blocks:
//
//   for each (batch, KV head):            dK, dV accumulate in fp32 over the heads sharing it (GQA)
//     for each query head of the group:   Q, dO, Q^T, dO^T packed once in the VNNI layout AMX reads
//       for each key block n, query block m >= n:
//         S^T  = K_n Q_m^T,  dP^T = V_n dO_m^T                           (fp32)
//         P^T  = exp(scale S^T - lse),  dS^T = P^T (dP^T - rowsum(dO * O))  (masked above the diagonal)
//         dV_n += P^T dO_m,  dK_n += dS^T Q_m,  dQ_m^T += K_n^T dS^T
//
// Inputs are [batch, heads, tokens, head_dim] tensors of any strides (transformers hands sdpa
// views of [batch, tokens, heads, head_dim]); the sequence is padded to an even length inside
// (VNNI pairs rows). Needs AVX-512 (F, BW, VL, DQ, BF16) and AMX.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

namespace {

namespace blas = at::native::cpublas;
using bf16 = at::BFloat16;
using Vec = at::vec::Vectorized<float>;

constexpr int64_t kBlock = 128;  // query and key rows per block

// One block's element-wise work, two key rows at a time (fp32 in, bf16 out, 16 queries a vector):
//   P^T = exp(scale S^T - lse), zero where the key comes after the query (diagonal blocks);
//   dS^T = P^T (dP^T - delta), written row-major for dK and VNNI-packed for dQ^T.
void block_softmax_grad(const float* st, const float* dpt, const float* lse, const float* delta, int64_t nb,
                        int64_t mb, bool diagonal, float scale, bf16* pt, bf16* dst, bf16* dstv) {
  alignas(64) static const int16_t pairs[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i interleave = _mm512_load_si512(pairs);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t r = 0; r < nb; r += 2) {
    for (int64_t j = 0; j < mb; j += 16) {
      const int64_t count = std::min<int64_t>(16, mb - j);
      const __mmask16 lanes = static_cast<__mmask16>((1u << count) - 1);
      const __m512 l = _mm512_maskz_loadu_ps(lanes, lse + j), d = _mm512_maskz_loadu_ps(lanes, delta + j);
      __m256i ds_bf16[2];
      for (int64_t i = 0; i < 2; ++i) {
        const int64_t row = r + i;
        const __m512 s = _mm512_maskz_loadu_ps(lanes, st + row * kBlock + j);
        __m512 p = Vec(_mm512_fmsub_ps(s, vscale, l)).exp_u20();
        if (diagonal) {  // query m + j + c sees key n + row only if j + c >= row
          const __mmask16 seen =
              _mm512_cmp_epi32_mask(_mm512_add_epi32(iota, _mm512_set1_epi32(j)), _mm512_set1_epi32(row), _MM_CMPINT_NLT);
          p = _mm512_maskz_mov_ps(seen, p);
        }
        const __m512 ds = _mm512_mul_ps(p, _mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, dpt + row * kBlock + j), d));
        _mm256_mask_storeu_epi16(pt + row * kBlock + j, lanes, (__m256i)_mm512_cvtneps_pbh(p));
        ds_bf16[i] = (__m256i)_mm512_cvtneps_pbh(ds);
        _mm256_mask_storeu_epi16(dst + row * kBlock + j, lanes, ds_bf16[i]);
      }
      const __m512i packed = _mm512_permutex2var_epi16(_mm512_castsi256_si512(ds_bf16[0]), interleave,
                                                       _mm512_castsi256_si512(ds_bf16[1]));
      const __mmask32 lanes2 = static_cast<__mmask32>((count == 16) ? 0xFFFFFFFFu : ((1u << (2 * count)) - 1));
      _mm512_mask_storeu_epi16(dstv + (r / 2) * kBlock * 2 + 2 * j, lanes2, packed);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& logsumexp, double scale_d) {
  TORCH_CHECK(query.scalar_type() == at::kBFloat16 && key.scalar_type() == at::kBFloat16 &&
                  value.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16 &&
                  grad_out.scalar_type() == at::kBFloat16,
              "causal_attention_backward: bf16 tensors only");
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4, "causal_attention_backward: 4-d inputs");
  const int64_t B = query.size(0), H = query.size(1), L = query.size(2), D = query.size(3), KV = key.size(1);
  TORCH_CHECK(key.size(2) == L && value.size(2) == L, "causal_attention_backward: self-attention only");
  TORCH_CHECK(H % KV == 0 && D % 2 == 0 && key.size(3) == D && value.size(3) == D,
              "causal_attention_backward: unsupported head layout");
  const int64_t G = H / KV, Lp = L + (L & 1);
  const float scale = static_cast<float>(scale_d);
  // Operands in the layouts the micro-kernels read, padded to Lp rows, made by torch's own
  // (vectorized, threaded) copies: row-major K and V, K^T, and Q and dO VNNI-packed both ways
  // (the transposed VNNI layout is a transpose of bf16 pairs, done as one of int32).
  auto pad_rows = [&](const at::Tensor& t) {
    return (Lp == L ? t : at::constant_pad_nd(t, {0, 0, 0, Lp - L})).contiguous();
  };
  const at::Tensor qp = pad_rows(query), dop = pad_rows(grad_out), kp = pad_rows(key), vp = pad_rows(value);
  const at::Tensor kt = kp.transpose(2, 3).contiguous();                                          // B KV D Lp
  const at::Tensor qv = qp.view({B, H, Lp / 2, 2, D}).transpose(3, 4).contiguous();             // B H Lp/2 D 2
  const at::Tensor dov = dop.view({B, H, Lp / 2, 2, D}).transpose(3, 4).contiguous();
  const at::Tensor qtv = qp.view(at::kInt).transpose(2, 3).contiguous();                        // B H D/2 Lp (2)
  const at::Tensor dotv = dop.view(at::kInt).transpose(2, 3).contiguous();
  const at::Tensor lse = logsumexp.to(at::kFloat).contiguous();                                   // B H L
  const at::Tensor o = out.stride(-1) == 1 ? out : out.contiguous();
  at::Tensor dq = at::empty_like(query), dk = at::empty_like(key), dv = at::empty_like(value);

  const bf16 *kp_d = kp.const_data_ptr<bf16>(), *vp_d = vp.const_data_ptr<bf16>(), *kt_d = kt.const_data_ptr<bf16>(),
             *qv_d = qv.const_data_ptr<bf16>(), *dov_d = dov.const_data_ptr<bf16>(),
             *dop_d = dop.const_data_ptr<bf16>(), *o_d = o.const_data_ptr<bf16>();
  const bf16* qtv_d = reinterpret_cast<const bf16*>(qtv.const_data_ptr<int32_t>());
  const bf16* dotv_d = reinterpret_cast<const bf16*>(dotv.const_data_ptr<int32_t>());
  const float* lse_d = lse.const_data_ptr<float>();
  bf16 *dq_d = dq.data_ptr<bf16>(), *dk_d = dk.data_ptr<bf16>(), *dv_d = dv.data_ptr<bf16>();
  const int64_t LD = Lp * D;

  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    constexpr int64_t BB = kBlock * kBlock;
    std::vector<float> st(BB), dpt(BB), dqt(LD), dk_acc(LD), dv_acc(LD), lse_row(Lp), delta(Lp);
    std::vector<bf16> pt(BB), dst(BB), dstv(BB);
    for (int64_t task = begin; task < end; ++task) {  // task = b * KV + g
      const int64_t b = task / KV, g = task % KV;
      const bf16 *k0 = kp_d + task * LD, *v0 = vp_d + task * LD, *kt0 = kt_d + task * LD;
      std::fill(dk_acc.begin(), dk_acc.end(), 0.f);
      std::fill(dv_acc.begin(), dv_acc.end(), 0.f);
      for (int64_t head = task * G; head < (task + 1) * G; ++head) {  // head = b * H + h
        const int64_t h = head % H;
        const bf16 *qv0 = qv_d + head * LD, *qtv0 = qtv_d + head * LD, *dov0 = dov_d + head * LD,
                   *dotv0 = dotv_d + head * LD, *do0 = dop_d + head * LD;
        const bf16* o0 = o_d + b * o.stride(0) + h * o.stride(1);
        for (int64_t l = 0; l < Lp; ++l) {  // padded query rows: an infinite logsumexp makes P zero
          lse_row[l] = l < L ? lse_d[head * L + l] : std::numeric_limits<float>::infinity();
          delta[l] = l < L ? at::vec::map2_reduce_all<bf16>([](Vec x, Vec y) { return x * y; },
                                                            [](Vec x, Vec y) { return x + y; }, do0 + l * D,
                                                            o0 + l * o.stride(2), D)
                           : 0.f;
        }
        std::fill(dqt.begin(), dqt.end(), 0.f);
        for (int64_t n = 0; n < Lp; n += kBlock) {
          const int64_t nb = std::min(kBlock, Lp - n);
          for (int64_t m = n; m < Lp; m += kBlock) {
            const int64_t mb = std::min(kBlock, Lp - m);
            blas::brgemm(nb, mb, D, D, Lp, kBlock, false, k0 + n * D, qtv0 + 2 * m, st.data());   // S^T
            blas::brgemm(nb, mb, D, D, Lp, kBlock, false, v0 + n * D, dotv0 + 2 * m, dpt.data());  // dP^T
            block_softmax_grad(st.data(), dpt.data(), lse_row.data() + m, delta.data() + m, nb, mb, m == n, scale,
                               pt.data(), dst.data(), dstv.data());
            blas::brgemm(nb, D, mb, kBlock, D, D, true, pt.data(), dov0 + m * D, dv_acc.data() + n * D);   // dV_n
            blas::brgemm(nb, D, mb, kBlock, D, D, true, dst.data(), qv0 + m * D, dk_acc.data() + n * D);   // dK_n
            blas::brgemm(D, mb, nb, Lp, kBlock, Lp, true, kt0 + n, dstv.data(), dqt.data() + m);          // dQ^T_m
          }
        }
        bf16* dq0 = dq_d + b * dq.stride(0) + h * dq.stride(1);
        for (int64_t l = 0; l < L; ++l) {
          bf16* row = dq0 + l * dq.stride(2);
          for (int64_t d = 0; d < D; ++d) row[d] = bf16(dqt[d * Lp + l] * scale);
        }
      }
      bf16* dk0 = dk_d + b * dk.stride(0) + g * dk.stride(1);
      bf16* dv0 = dv_d + b * dv.stride(0) + g * dv.stride(1);
      for (int64_t l = 0; l < L; ++l) {
        float* a = dk_acc.data() + l * D;
        at::vec::map<float>([scale](Vec x) { return x * Vec(scale); }, a, a, D);
        at::vec::convert<float, bf16>(a, dk0 + l * dk.stride(2), D);
        at::vec::convert<float, bf16>(dv_acc.data() + l * D, dv0 + l * dv.stride(2), D);
      }
    }
    blas::brgemm_release();
  });
  return {dq, dk, dv};
}

bool supported() { return blas::could_pack(at::kBFloat16); }

}  // namespace

TORCH_LIBRARY(kubetune, m) {
  m.def(
      "causal_attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
      "Tensor logsumexp, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("causal_attention_backward_supported() -> bool", &supported);
}

TORCH_LIBRARY_IMPL(kubetune, CPU, m) { m.impl("causal_attention_backward", &causal_attention_backward); }
