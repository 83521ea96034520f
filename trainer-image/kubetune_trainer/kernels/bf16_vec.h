// bf16 <-> fp32 for 16 lanes at a time (AVX-512 BF16), with masks for rows that end mid-vector:
// the loads, stores and roundings kubetune's element-wise kernels share (rms_norm.cpp,
// swiglu.cpp, rotary.cpp).
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

namespace kubetune::bf16_vec {

using bf16 = at::BFloat16;

inline __m512 load_bf16(const bf16* p, __mmask16 lanes) {
  return _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(lanes, p));
}
// Round to bf16 and back, where torch would store an intermediate in bf16.
inline __m512 round_bf16(__m512 v) { return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(v)); }
inline void store_bf16(bf16* p, __mmask16 lanes, __m512 v) {
  _mm256_mask_storeu_epi16(p, lanes, (__m256i)_mm512_cvtneps_pbh(v));
}
// The lanes of the 16 elements from i that lie before n.
inline __mmask16 lanes_at(int64_t i, int64_t n) {
  return static_cast<__mmask16>(i + 16 <= n ? 0xFFFF : (1u << (n - i)) - 1);
}

}  // namespace kubetune::bf16_vec
