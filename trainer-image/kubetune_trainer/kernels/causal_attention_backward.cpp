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
// Inputs are [batch, heads, tokens, head_dim] views with a contiguous last dimension (the layout
// transformers hands sdpa); the sequence is padded to an even length inside (VNNI pairs rows),
// with an infinite logsumexp so padded rows contribute nothing.
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

// Rows [0, K) of a row-major K x N matrix (ld) as VNNI pairs: dst[k / 2][n][k % 2], ldd pairs a row.
void pack_vnni(const bf16* src, int64_t ld, int64_t K, int64_t N, bf16* dst, int64_t ldd) {
  alignas(64) static const int16_t lo[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                             8,  40, 9,  41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const int16_t hi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                             24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i ilo = _mm512_load_si512(lo), ihi = _mm512_load_si512(hi);
  for (int64_t k = 0; k < K; k += 2) {
    const bf16* r0 = src + k * ld;
    const bf16* r1 = r0 + ld;
    bf16* d = dst + (k / 2) * ldd * 2;
    int64_t n = 0;
    for (; n + 32 <= N; n += 32) {
      const __m512i a = _mm512_loadu_si512(r0 + n), b = _mm512_loadu_si512(r1 + n);
      _mm512_storeu_si512(d + 2 * n, _mm512_permutex2var_epi16(a, ilo, b));
      _mm512_storeu_si512(d + 2 * n + 32, _mm512_permutex2var_epi16(a, ihi, b));
    }
    for (; n < N; ++n) {
      d[2 * n] = r0[n];
      d[2 * n + 1] = r1[n];
    }
  }
}

// The transpose of a row-major R x C matrix (ld, C even), VNNI-packed: dst[c / 2][r][c % 2].
void pack_vnni_transposed(const bf16* src, int64_t ld, int64_t R, int64_t C, bf16* dst, int64_t ldd) {
  for (int64_t r = 0; r < R; ++r) {
    const uint32_t* s = reinterpret_cast<const uint32_t*>(src + r * ld);
    uint32_t* d = reinterpret_cast<uint32_t*>(dst) + r;
    for (int64_t c2 = 0; c2 < C / 2; ++c2) d[c2 * ldd] = s[c2];
  }
}

// Rows [0, L) of a [tokens, D] matrix (row stride ld) into a dense Lp x D buffer, zero rows after.
void copy_padded(const bf16* src, int64_t ld, int64_t L, int64_t Lp, int64_t D, bf16* dst) {
  for (int64_t l = 0; l < L; ++l) std::memcpy(dst + l * D, src + l * ld, D * sizeof(bf16));
  std::fill(dst + L * D, dst + Lp * D, bf16(0));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward(
    const at::Tensor& grad_out_in, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& logsumexp, double scale_d) {
  TORCH_CHECK(query.scalar_type() == at::kBFloat16 && key.scalar_type() == at::kBFloat16 &&
                  value.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16,
              "causal_attention_backward: bf16 tensors only");
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4, "causal_attention_backward: 4-d inputs");
  const int64_t B = query.size(0), H = query.size(1), L = query.size(2), D = query.size(3), KV = key.size(1);
  TORCH_CHECK(key.size(2) == L && value.size(2) == L, "causal_attention_backward: self-attention only");
  TORCH_CHECK(H % KV == 0 && D % 2 == 0 && key.size(3) == D && value.size(3) == D,
              "causal_attention_backward: unsupported head layout");
  auto last_contig = [](const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); };
  const at::Tensor q = last_contig(query), k = last_contig(key), v = last_contig(value), o = last_contig(out),
                   dout = last_contig(grad_out_in);
  const at::Tensor lse = logsumexp.to(at::kFloat).contiguous();  // [B, H, L]
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  const int64_t G = H / KV, Lp = L + (L & 1);
  const float scale = static_cast<float>(scale_d);
  const bf16 *q_data = q.const_data_ptr<bf16>(), *k_data = k.const_data_ptr<bf16>(),
             *v_data = v.const_data_ptr<bf16>(), *o_data = o.const_data_ptr<bf16>(),
             *do_data = dout.const_data_ptr<bf16>();
  bf16 *dq_data = dq.data_ptr<bf16>(), *dk_data = dk.data_ptr<bf16>(), *dv_data = dv.data_ptr<bf16>();
  const float* lse_data = lse.const_data_ptr<float>();

  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    const int64_t LD = Lp * D, BB = kBlock * kBlock;
    std::vector<bf16> kb(LD), vb(LD), kt(LD), qv(LD), qtv(LD), dov(LD), dotv(LD), rows(LD);
    std::vector<bf16> pt(BB), dst(BB), dstv(BB);
    std::vector<float> dk_acc(LD), dv_acc(LD), dqt(LD), st(BB), dpt(BB), lse_row(Lp), delta(Lp);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KV, g = task % KV;
      copy_padded(k_data + b * k.stride(0) + g * k.stride(1), k.stride(2), L, Lp, D, kb.data());
      copy_padded(v_data + b * v.stride(0) + g * v.stride(1), v.stride(2), L, Lp, D, vb.data());
      for (int64_t l = 0; l < Lp; ++l)
        for (int64_t d = 0; d < D; ++d) kt[d * Lp + l] = kb[l * D + d];
      std::fill(dk_acc.begin(), dk_acc.end(), 0.f);
      std::fill(dv_acc.begin(), dv_acc.end(), 0.f);
      for (int64_t h = g * G; h < (g + 1) * G; ++h) {
        copy_padded(q_data + b * q.stride(0) + h * q.stride(1), q.stride(2), L, Lp, D, rows.data());
        pack_vnni(rows.data(), D, Lp, D, qv.data(), D);
        pack_vnni_transposed(rows.data(), D, Lp, D, qtv.data(), Lp);
        copy_padded(do_data + b * dout.stride(0) + h * dout.stride(1), dout.stride(2), L, Lp, D, rows.data());
        pack_vnni(rows.data(), D, Lp, D, dov.data(), D);
        pack_vnni_transposed(rows.data(), D, Lp, D, dotv.data(), Lp);
        const bf16* o_head = o_data + b * o.stride(0) + h * o.stride(1);
        for (int64_t l = 0; l < Lp; ++l) {
          if (l < L) {
            lse_row[l] = lse_data[(b * H + h) * L + l];
            delta[l] = at::vec::map2_reduce_all<bf16>([](Vec x, Vec y) { return x * y; },
                                                      [](Vec x, Vec y) { return x + y; }, rows.data() + l * D,
                                                      o_head + l * o.stride(2), D);
          } else {
            lse_row[l] = std::numeric_limits<float>::infinity();  // exp(-inf) = 0: padding adds nothing
            delta[l] = 0.f;
          }
        }
        std::fill(dqt.begin(), dqt.end(), 0.f);
        for (int64_t n = 0; n < Lp; n += kBlock) {
          const int64_t nb = std::min(kBlock, Lp - n);
          for (int64_t m = n; m < Lp; m += kBlock) {
            const int64_t mb = std::min(kBlock, Lp - m);
            blas::brgemm(nb, mb, D, D, Lp, kBlock, false, kb.data() + n * D, qtv.data() + 2 * m, st.data());
            blas::brgemm(nb, mb, D, D, Lp, kBlock, false, vb.data() + n * D, dotv.data() + 2 * m, dpt.data());
            const bool on_diagonal = m == n;
            for (int64_t r = 0; r < nb; ++r) {
              float* s = st.data() + r * kBlock;
              float* dp = dpt.data() + r * kBlock;
              at::vec::map2<float>([scale](Vec x, Vec l) { return (x * Vec(scale) - l).exp_u20(); }, s, s,
                                   lse_row.data() + m, mb);
              if (on_diagonal) std::fill(s, s + std::min(r, mb), 0.f);  // key n + r is after queries m .. n + r - 1
              at::vec::map3<float>([](Vec p, Vec dpv, Vec d) { return p * (dpv - d); }, dp, s, dp,
                                   delta.data() + m, mb);
              at::vec::convert<float, bf16>(s, pt.data() + r * kBlock, mb);
              at::vec::convert<float, bf16>(dp, dst.data() + r * kBlock, mb);
            }
            pack_vnni(dst.data(), kBlock, nb, mb, dstv.data(), kBlock);
            blas::brgemm(nb, D, mb, kBlock, D, D, true, pt.data(), dov.data() + m * D, dv_acc.data() + n * D);
            blas::brgemm(nb, D, mb, kBlock, D, D, true, dst.data(), qv.data() + m * D, dk_acc.data() + n * D);
            blas::brgemm(D, mb, nb, Lp, kBlock, Lp, true, kt.data() + n, dstv.data(), dqt.data() + m);
          }
        }
        bf16* dq_head = dq_data + b * dq.stride(0) + h * dq.stride(1);
        for (int64_t l = 0; l < L; ++l) {
          bf16* row = dq_head + l * dq.stride(2);
          for (int64_t d = 0; d < D; ++d) row[d] = bf16(dqt[d * Lp + l] * scale);
        }
      }
      bf16* dk_head = dk_data + b * dk.stride(0) + g * dk.stride(1);
      bf16* dv_head = dv_data + b * dv.stride(0) + g * dv.stride(1);
      for (int64_t l = 0; l < L; ++l) {
        float* a = dk_acc.data() + l * D;
        at::vec::map<float>([scale](Vec x) { return x * Vec(scale); }, a, a, D);
        at::vec::convert<float, bf16>(a, dk_head + l * dk.stride(2), D);
        at::vec::convert<float, bf16>(dv_acc.data() + l * D, dv_head + l * dv.stride(2), D);
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
