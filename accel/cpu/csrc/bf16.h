// PyTorch's float -> bf16 rounding on AVX-512, for the kernels that store bf16 (bsr_float.cpp, bsr_amx.cpp,
// int8_bsr_vnni.cpp).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace accel_bf16 {

// 16 floats rounded to nearest even, NaN -> 0x7FC0: PyTorch's float -> bf16 conversion, bit for bit (denormals kept)
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m256i exact(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// Whether the one-instruction rounding (vcvtneps2bf16, nearest even too) would differ from exact() somewhere in v: it
// flushes denormals to zero and keeps a NaN's payload (QNaN, denormal, SNaN)
__attribute__((target("avx512f,avx512dq"))) inline bool needs_exact(__m512 v) {
  return _mm512_fpclass_ps_mask(v, 0x01 | 0x20 | 0x80) != 0;
}

// exact(v), in one instruction where they agree (AVX512_BF16)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))) inline __m256i fast(__m512 v) {
  return needs_exact(v) ? exact(v) : reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
}

// 32 outputs, lo then hi, rounded as exact() rounds and stored at y (64 bytes): one vcvtne2ps2bf16 where it agrees
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))) inline void store_pair(uint16_t* y, __m512 lo,
                                                                                                __m512 hi) {
  if (needs_exact(lo) || needs_exact(hi)) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), exact(lo));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + 16), exact(hi));
  } else {
    _mm512_storeu_si512(y, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
  }
}

}  // namespace accel_bf16
