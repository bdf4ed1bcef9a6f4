// A 16 x 16 transpose of fp32 (or 32-bit) values in AVX-512 registers, shared by the layout copy (bsr_float.cpp) and
// the int8 conv's NCHW output (bsr_amx.cpp).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "bf16.h"

namespace accel_transpose {

// Rows r[0..16) of 16 fp32 transposed in place (r[i][j] <-> r[j][i]): pairs, quads, then two rounds of 128-bit lanes.
__attribute__((target("avx512f"))) inline void transpose16_ps(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
}


// The values of `rows` consecutive output pixels of one image (r[t]: pixel t's 16 outputs o .. o + 15) stored into
// an NCHW output y [.., ldy, plane] (fp32, or bf16 rounded as PyTorch rounds) from pixel p of image img: r padded with
// zeros and transposed in place, then outputs o .. o + nc - 1 each one masked store of `rows` values in its plane.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void store_planes(__m512* r, int64_t rows, int nc,
                                                                               void* y, int bf16, int64_t img,
                                                                               int64_t ldy, int64_t o, int64_t plane,
                                                                               int64_t p) {
  for (int64_t t = rows; t < 16; ++t) r[t] = _mm512_setzero_ps();
  transpose16_ps(r);
  const __mmask16 pm = rows == 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << rows) - 1);
  for (int j = 0; j < nc; ++j) {
    const int64_t at = (img * ldy + o + j) * plane + p;
    if (bf16)
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(y) + at, pm, accel_bf16::exact(r[j]));
    else
      _mm512_mask_storeu_ps(static_cast<float*>(y) + at, pm, r[j]);
  }
}

}  // namespace accel_transpose
