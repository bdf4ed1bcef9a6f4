// The NaN/inf check of a row of inputs, shared by the kernels that scan what they read (bsr_float.cpp, bsr_amx.cpp).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace accel_rows {

// whether row x[0, k) (fp32, or bf16) holds a NaN or an inf (exponent bits all ones)
__attribute__((target("avx512f,avx512bw"))) inline bool row_nonfinite(const char* row, int bf16, int64_t k) {
  __mmask64 bad = 0;
  int64_t i = 0;
  if (bf16) {  // 32 bf16 per vector
    const __m512i expo = _mm512_set1_epi16(0x7F80);
    for (; i + 32 <= k; i += 32)
      bad |= _mm512_cmpeq_epi16_mask(_mm512_and_si512(_mm512_loadu_si512(row + i * 2), expo), expo);
  } else {
    const __m512i expo = _mm512_set1_epi32(0x7F800000);
    for (; i + 16 <= k; i += 16)
      bad |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_loadu_si512(row + i * 4), expo), expo);
  }
  bool tail = false;
  for (; i < k; ++i) {
    uint32_t u;
    if (bf16) {
      uint16_t h;
      std::memcpy(&h, row + i * 2, 2);
      u = static_cast<uint32_t>(h) << 16;
    } else {
      std::memcpy(&u, row + i * 4, 4);
    }
    tail = tail || (u & 0x7F800000u) == 0x7F800000u;
  }
  return bad != 0 || tail;
}

}  // namespace accel_rows
