// int8 block-sparse Linear on AVX-512 VNNI: accel's per-token activation quantization, then one pass over the
// stored blocks with the int32 sums dequantized as they are stored. No gather, no GEMM call per block row.
//
// accel_quantize_rows: per row t of x [M, K] (fp32, bf16 or fp16), absmax = max |x|, inv = qmax / absmax and
//   scale = absmax / qmax (IEEE fp32 division), u[t, i] = round_half_even(x * inv) + 128 as uint8, and 128 for
//   i in [K, width). A row holding NaN/inf gets scale NaN and bytes 128; an all-zero row scale 0. These are the
//   integers and scales of accel.cpu.int8.act_scale_inv + round(x * inv), bit for bit.
// accel_int8_bsr_vnni:
//   acc[t, r*B + o] = sum over stored blocks p of block row r, i < B:  q[t, col[p]*B + i] * W[p, o, i]
//   y[t, r*B + o] = fma(float(acc) * scale[t], w_scale[o], bias[o])      (fp32, in this order; o < n only)
//   stored as fp32, or (y_bf16) rounded once to bf16 as PyTorch's conversion rounds (nearest even, NaN 0x7FC0)
//   with q = u - 128 (u from accel_quantize_rows; or int8 x with x_is_u8 = 0). W: the blocks packed
//   [nnz][B/4][B][4] (four consecutive inputs of one output together: vpdpbusd's operand order); comp[r*B + o]
//   = 128 * (sum of W[p, o, :] over the block row's blocks). vpdpbusd multiplies unsigned by signed bytes: the
//   activation enters as u = q + 128 and comp takes the 128 back out. int32 sums wrap (vpdpbusd does not
//   saturate): exact modulo 2^32, so exact whenever the true sum fits in int32 (the caller's K bound). Rows with
//   scale > 2^96 (acc * scale could overflow fp32) take the same formula in fp64. dense_order: the dense int8
//   engines' epilogue instead, fma(float(acc) * w_scale[o], scale[t], bias[o]) in fp32 for every row (a dense weight
//   as every block stored: accel.cpu.int8's vnni_tiles and amx_tiles engines).
//
// Built with -ffp-contract=off: no fused multiply-adds but the one written, every step rounds like the PyTorch ops it
// replaces (accel.cpu.int8_bsr.epilogue: a mul, then torch.addcmul's fused multiply-add).
#include <immintrin.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>

#include <unistd.h>

#include "amx_tiles.h"
#include "bf16.h"

namespace {

constexpr float kHugeScale = 79228162514264337593543950336.0f;  // 2^96

// 16 values of x from i as fp32 (fp32, bf16 or fp16), lanes m only (the others 0)
inline __m512 load16_masked(const void* x, int dtype, int64_t i, __mmask16 m) {
  if (dtype == 0) return _mm512_maskz_loadu_ps(m, static_cast<const float*>(x) + i);
  const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(x) + i);
  if (dtype == 1) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));  // bf16
  return _mm512_cvtph_ps(h);                                                                      // fp16
}

inline __m512 load16(const void* x, int dtype, int64_t i) {
  return load16_masked(x, dtype, i, static_cast<__mmask16>(0xFFFF));
}

inline float load1(const void* x, int dtype, int64_t i) {
  if (dtype == 0) return static_cast<const float*>(x)[i];
  uint16_t h = static_cast<const uint16_t*>(x)[i];
  if (dtype == 1) {
    uint32_t b = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &b, 4);
    return f;
  }
  return _cvtsh_ss(h);
}

// max |x[i]| for i in [lo, hi); false when a value there is NaN or inf. Taken on the bits with the sign cleared: for
// IEEE values of one format, integer order is the order of magnitudes, and inf and NaN lie above every finite value
// (the same maximum as a float max of |x|; two vector maxima per 16 fp32 or 32 bf16/fp16).
bool span_absmax(const void* x, int dtype, int64_t lo, int64_t hi, float* absmax) {
  int64_t i = lo;
  if (dtype == 0) {
    const uint32_t* b = static_cast<const uint32_t*>(x);
    const __m512i mag = _mm512_set1_epi32(0x7FFFFFFF);
    __m512i m0 = _mm512_setzero_si512(), m1 = _mm512_setzero_si512();
    for (; i + 32 <= hi; i += 32) {
      m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_loadu_si512(b + i), mag));
      m1 = _mm512_max_epu32(m1, _mm512_and_si512(_mm512_loadu_si512(b + i + 16), mag));
    }
    uint32_t m = _mm512_reduce_max_epu32(_mm512_max_epu32(m0, m1));
    for (; i < hi; ++i) m = (b[i] & 0x7FFFFFFFu) > m ? (b[i] & 0x7FFFFFFFu) : m;
    std::memcpy(absmax, &m, 4);
    return m < 0x7F800000u;
  }
  const uint16_t* h = static_cast<const uint16_t*>(x);
  const __m512i mag = _mm512_set1_epi16(0x7FFF);
  __m512i m0 = _mm512_setzero_si512(), m1 = _mm512_setzero_si512();
  for (; i + 64 <= hi; i += 64) {
    m0 = _mm512_max_epu16(m0, _mm512_and_si512(_mm512_loadu_si512(h + i), mag));
    m1 = _mm512_max_epu16(m1, _mm512_and_si512(_mm512_loadu_si512(h + i + 32), mag));
  }
  const __m512i m01 = _mm512_max_epu16(m0, m1);
  uint32_t m = _mm512_reduce_max_epu32(_mm512_max_epu32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(m01)),
                                                        _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(m01, 1))));
  for (; i < hi; ++i) m = (h[i] & 0x7FFFu) > m ? (h[i] & 0x7FFFu) : m;
  if (dtype == 1) {
    const uint32_t f = m << 16;
    std::memcpy(absmax, &f, 4);
    return m < 0x7F80u;
  }
  *absmax = _cvtsh_ss(static_cast<uint16_t>(m));
  return m < 0x7C00u;
}

// x * inv clamped to [-lim, lim] (lim = qmax: a static scale saturates; a dynamic row's values lie within qmax * (1 +
// 2^-23), where the clamp changes no rounded integer), then rounded half to even: accel's rule in either case
inline __m512i scaled_int(__m512 x, __m512 vinv, __m512 vlim) {
  const __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x, vinv), _mm512_sub_ps(_mm512_setzero_ps(), vlim)), vlim);
  return _mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// u[i] = round_half_even(clamp(x[i] * inv, -lim, lim)) + 128 for i in [lo, hi), with a finite row's inv (so every
// integer lies in [-lim, lim], lim <= 127): 64 values per step, their int32 integers narrowed by two saturating packs
// (exact in this range) and put back in order by one permutation; + 128 as the sign bit flipped.
void quantize_span(const void* x, int dtype, int64_t lo, int64_t hi, float inv, float lim, uint8_t* u) {
  const __m512 vinv = _mm512_set1_ps(inv), vlim = _mm512_set1_ps(lim);
  // the packs leave 4-byte groups ordered (128-bit lane l, vector j) as 4l + j; output group 4j + l
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  int64_t i = lo;
  for (; i + 64 <= hi; i += 64) {
    __m512i q[4];
    for (int j = 0; j < 4; ++j) q[j] = scaled_int(load16(x, dtype, i + 16 * j), vinv, vlim);
    const __m512i bytes = _mm512_packs_epi16(_mm512_packs_epi32(q[0], q[1]), _mm512_packs_epi32(q[2], q[3]));
    _mm512_storeu_si512(u + i, _mm512_xor_si512(_mm512_permutexvar_epi32(order, bytes), flip));
  }
  const __m512i zp = _mm512_set1_epi32(128);
  for (; i + 16 <= hi; i += 16) {
    const __m512i v = scaled_int(load16(x, dtype, i), vinv, vlim);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(u + i), _mm512_cvtepi32_epi8(_mm512_add_epi32(v, zp)));
  }
  for (; i < hi; ++i)
    u[i] = static_cast<uint8_t>(static_cast<int32_t>(std::nearbyint(std::fmin(std::fmax(load1(x, dtype, i) * inv, -lim),
                                                                              lim))) + 128);
}

// Rows a[0..16) of 16 bytes transposed in place (a[i] byte j <-> a[j] byte i): four rounds of interleaves, each
// doubling the width of the elements that hold consecutive rows.
inline void transpose16_bytes(__m128i* a) {
  __m128i l1[8], h1[8], p2[4][4], p3[2][8];
  for (int i = 0; i < 8; ++i) {  // 16-bit element j of l1[i] / h1[i]: (a[2i][j], a[2i+1][j]), j < 8 / j >= 8
    l1[i] = _mm_unpacklo_epi8(a[2 * i], a[2 * i + 1]);
    h1[i] = _mm_unpackhi_epi8(a[2 * i], a[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // 32-bit element e of p2[i][g]: rows 4i .. 4i+3 of column 4g + e
    p2[i][0] = _mm_unpacklo_epi16(l1[2 * i], l1[2 * i + 1]);
    p2[i][1] = _mm_unpackhi_epi16(l1[2 * i], l1[2 * i + 1]);
    p2[i][2] = _mm_unpacklo_epi16(h1[2 * i], h1[2 * i + 1]);
    p2[i][3] = _mm_unpackhi_epi16(h1[2 * i], h1[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i)  // 64-bit element e of p3[i][k]: rows 8i .. 8i+7 of column 2k + e
    for (int g = 0; g < 4; ++g) {
      p3[i][2 * g] = _mm_unpacklo_epi32(p2[2 * i][g], p2[2 * i + 1][g]);
      p3[i][2 * g + 1] = _mm_unpackhi_epi32(p2[2 * i][g], p2[2 * i + 1][g]);
    }
  for (int k = 0; k < 8; ++k) {  // column 2k and 2k + 1: all 16 rows
    a[2 * k] = _mm_unpacklo_epi64(p3[0][k], p3[1][k]);
    a[2 * k + 1] = _mm_unpackhi_epi64(p3[0][k], p3[1][k]);
  }
}

// One image row of an NCHW input quantized into NHWC bytes: out[p * c + ch] = round_half_even(clamp(x[ch * plane + p]
// * inv, -lim, lim)) + 128 for p < w, ch < c (c a multiple of 16; x at the row's first value of channel 0; inv and lim
// as quantize_span's): 16 channels x 16 pixels at a time, each channel's 16 values quantized to bytes, then the 16 x
// 16 bytes transposed.
void quantize_row_nchw(const void* x, int dtype, int64_t c, int64_t plane, int64_t w, float inv, float lim,
                       uint8_t* out) {
  const __m512 vinv = _mm512_set1_ps(inv), vlim = _mm512_set1_ps(lim);
  const __m128i flip = _mm_set1_epi8(static_cast<char>(0x80));
  for (int64_t p0 = 0; p0 < w; p0 += 16) {
    const int np = static_cast<int>(w - p0 < 16 ? w - p0 : 16);
    const __mmask16 m = np == 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << np) - 1);
    for (int64_t c0 = 0; c0 < c; c0 += 16) {
      __m128i a[16];
      for (int i = 0; i < 16; ++i)
        a[i] = _mm512_cvtepi32_epi8(scaled_int(load16_masked(x, dtype, (c0 + i) * plane + p0, m), vinv, vlim));
      transpose16_bytes(a);
      for (int j = 0; j < np; ++j)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + (p0 + j) * c + c0), _mm_xor_si128(a[j], flip));
    }
  }
}

// accel's rule from a row's absmax: (scale, inv); a row holding NaN/inf gets (NaN, 0)
inline void row_scale(float absmax, bool finite, float qmax, float* scale, float* inv) {
  if (!finite) {
    *scale = NAN;
    *inv = 0.0f;
    return;
  }
  *scale = absmax / qmax;
  const float r = absmax > 0.0f ? qmax / absmax : 0.0f;
  *inv = r < INFINITY ? r : 0.0f;  // (qmax / absmax overflows for absmax below qmax / FLT_MAX: 0, as accel's rule)
}

// accel's static rule (accel.cpu.int8.scale_inv) for a row: scale s and inv = 1 / s (inf -> 0, -inf -> -FLT_MAX, NaN
// -> 0) when the row is finite, (NaN, 0) when it holds NaN/inf; the scale is 0 + s, the rule's poison + s (-0.0 is
// +0.0 there)
inline void static_scale_inv(bool finite, float s, float* scale, float* inv) {
  const float r = 1.0f / s;
  *scale = finite ? 0.0f + s : NAN;
  *inv = !finite || r != r || r == INFINITY ? 0.0f : (r == -INFINITY ? -FLT_MAX : r);
}

// A row's (scale, inv): accel's rule from its max |x| (row_scale), or with static_scale that scale's rule
inline void rule(float absmax, bool finite, float q, const float* static_scale, float* scale, float* inv) {
  if (static_scale)
    static_scale_inv(finite, *static_scale, scale, inv);
  else
    row_scale(absmax, finite, q, scale, inv);
}

// Row t of x [m, k] quantized (accel_quantize_rows with whole rows): its max, then its bytes while the row is still in
// L1/L2; scale[t], and u's row t (bytes k .. width 128). static_scale: that scale's rule instead of the row's own.
void quantize_row(const void* x, int dtype, int64_t t, int64_t k, int64_t ldx, float q, const float* static_scale,
                  uint8_t* u, int64_t ldu, int64_t width, float* scale) {
  const int64_t elem = dtype == 0 ? 4 : 2;
  const void* xt = static_cast<const char*>(x) + t * ldx * elem;
  uint8_t* ut = u + t * ldu;
  float absmax = 0.0f, inv = 0.0f;
  const bool finite = span_absmax(xt, dtype, 0, k, &absmax);
  rule(absmax, finite, q, static_scale, scale + t, &inv);
  if (scale[t] != scale[t])  // NaN: bytes 128
    std::memset(ut, 128, k);
  else
    quantize_span(xt, dtype, 0, k, inv, q, ut);
  if (width > k) std::memset(ut + k, 128, width - k);
}

// Rows quantized in pieces spread over threads: each piece's max |x| and finiteness, then each row's (scale, inv)
// from its `per` pieces (max is exact in any order).
struct Pieces {
  std::unique_ptr<float[]> max;
  std::unique_ptr<bool[]> finite;
  std::unique_ptr<float[]> inv;  // per row
  Pieces(int64_t pieces, int64_t rows)
      : max(new (std::nothrow) float[pieces > 0 ? pieces : 1]),
        finite(new (std::nothrow) bool[pieces > 0 ? pieces : 1]),
        inv(new (std::nothrow) float[rows > 0 ? rows : 1]) {}
  bool ok() const { return max && finite && inv; }
  void settle(int64_t t, int64_t per, float q, const float* static_scale, float* scale) {
    float absmax = 0.0f;
    bool fin = true;
    for (int64_t j = t * per; j < (t + 1) * per; ++j) {
      absmax = max[j] > absmax ? max[j] : absmax;
      fin = fin && finite[j];
    }
    rule(absmax, fin, q, static_scale, scale + t, inv.get() + t);
  }
};

struct Epilogue {
  const float* scale;   // [M]
  const float* wscale;  // [N]
  const float* bias;    // [N] or null
  void* y;              // [M, ldy] fp32, or bf16 with bf16 = 1
  int64_t ldy, n;
  int bf16;
  int dense_order;  // the dense int8 engines' epilogue order (scaled()), without store()'s fp64 rows
};

// fp32 -> bf16, round to nearest even, NaN -> 0x7FC0: PyTorch's conversion, bit for bit (accel_bf16::exact, one value)
inline uint16_t to_bf16(float f) {
  if (f != f) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

// y[t, o .. o + 16) under mask m
inline void put(const Epilogue& e, int64_t t, int64_t o, __mmask16 m, __m512 v) {
  if (e.bf16)
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(e.y) + t * e.ldy + o, m, accel_bf16::exact(v));
  else
    _mm512_mask_storeu_ps(static_cast<float*>(e.y) + t * e.ldy + o, m, v);
}

// The fp32 outputs of sums a (int32, the zero point's share taken out) of a token of scale s, outputs' scales ws and
// bias b (with e.bias): fma(float(a) * s, ws, b), with a bias one fused multiply-add as torch.addcmul (bias, y,
// w_scale) computes it on the CPU; e.dense_order: the dense int8 engines' order, (a * ws), then torch.addcmul(bias, .,
// s).
inline __m512 scaled(const Epilogue& e, __m512i a, float s, __m512 ws, __m512 b) {
  const __m512 vs = _mm512_set1_ps(s);
  const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(a), e.dense_order ? ws : vs);
  const __m512 f = e.dense_order ? vs : ws;
  return e.bias ? _mm512_fmadd_ps(v, f, b) : _mm512_mul_ps(v, f);
}

inline void store(const Epilogue& e, int64_t t, int64_t o, __m512i acc) {
  if (o >= e.n) return;
  const __mmask16 m = e.n - o >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (e.n - o)) - 1);
  const float s = e.scale[t];
  if (e.dense_order || !(s > kHugeScale)) {  // (NaN scales here: NaN outputs)
    const __m512 b = e.bias ? _mm512_maskz_loadu_ps(m, e.bias + o) : _mm512_setzero_ps();
    put(e, t, o, m, scaled(e, acc, s, _mm512_maskz_loadu_ps(m, e.wscale + o), b));
    return;
  }
  alignas(64) int32_t a[16];
  _mm512_store_si512(a, acc);
  for (int j = 0; j < 16 && o + j < e.n; ++j) {
    double v = (static_cast<double>(a[j]) * s) * e.wscale[o + j];  // (the eager epilogue's fp64 rows: no fma)
    if (e.bias) v += e.bias[o + j];
    const float f = static_cast<float>(v);  // (then bf16: the eager path's fp32 result, converted)
    if (e.bf16)
      static_cast<uint16_t*>(e.y)[t * e.ldy + o + j] = to_bf16(f);
    else
      static_cast<float*>(e.y)[t * e.ldy + o + j] = f;
  }
}

// store() for the rows of one accumulator tile (``acc`` [rows][16]), the output group's scales and bias loaded once
inline void store_tile(const Epilogue& e, int64_t t0, int rows, int64_t o, const int32_t* acc, __m512i comp) {
  if (o >= e.n) return;
  const __mmask16 m = e.n - o >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (e.n - o)) - 1);
  const __m512 ws = _mm512_maskz_loadu_ps(m, e.wscale + o);
  const __m512 b = e.bias ? _mm512_maskz_loadu_ps(m, e.bias + o) : _mm512_setzero_ps();
  for (int t = 0; t < rows; ++t) {
    const __m512i a = _mm512_sub_epi32(_mm512_load_si512(acc + t * 16), comp);
    const float s = e.scale[t0 + t];
    if (!e.dense_order && s > kHugeScale)  // (rare: store()'s fp64 rows)
      store(e, t0 + t, o, a);
    else
      put(e, t0 + t, o, m, scaled(e, a, s, ws, b));
  }
}

template <int NB, int T>
inline void tile(const uint8_t* x, int64_t ldx, uint32_t flip, const int8_t* w, int64_t bs, const int64_t* col,
                 int64_t p0, int64_t p1, int64_t g, const int32_t* comp, const Epilogue& e, int64_t t0, int64_t o0) {
  __m512i acc[T][NB];
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < NB; ++j) acc[t][j] = _mm512_setzero_si512();
  const __m512i vflip = _mm512_set1_epi32(static_cast<int32_t>(flip));
  const int64_t k4 = bs / 4;
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* xb = x + col[p] * bs;
    const int8_t* wb = w + p * bs * bs + g * 4;
    for (int64_t kk = 0; kk < k4; ++kk) {
      __m512i wv[NB];
      for (int j = 0; j < NB; ++j) wv[j] = _mm512_loadu_si512(wb + kk * bs * 4 + j * 64);
      for (int t = 0; t < T; ++t) {
        int32_t xi;
        std::memcpy(&xi, xb + t * ldx + kk * 4, 4);
        __m512i xv = _mm512_set1_epi32(xi);
        if (flip) xv = _mm512_xor_si512(xv, vflip);
        for (int j = 0; j < NB; ++j) acc[t][j] = _mm512_dpbusd_epi32(acc[t][j], xv, wv[j]);
      }
    }
  }
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < NB; ++j)
      store(e, t0 + t, o0 + g + j * 16, _mm512_sub_epi32(acc[t][j], _mm512_loadu_si512(comp + g + j * 16)));
}

template <int NB, int T>
void tiles(const uint8_t* x, int64_t ldx, uint32_t flip, const int8_t* w, int64_t bs, const int64_t* col, int64_t p0,
           int64_t p1, int64_t g, const int32_t* comp, const Epilogue& e, int64_t t0, int64_t o0, int64_t nt) {
  if (nt == T) {
    tile<NB, T>(x, ldx, flip, w, bs, col, p0, p1, g, comp, e, t0, o0);
  } else if constexpr (T > 1) {  // the last tile of tokens may be short
    tiles<NB, T - 1>(x, ldx, flip, w, bs, col, p0, p1, g, comp, e, t0, o0, nt);
  }
}

template <int NB, int T>
void block_row(const uint8_t* x, int64_t ldx, uint32_t flip, const int8_t* w, int64_t bs, const int64_t* col,
               int64_t p0, int64_t p1, const int32_t* comp, const Epilogue& e, int64_t t0, int64_t o0, int64_t nt) {
  for (int64_t g = 0; g < bs; g += NB * 16)  // output groups of NB*16 (two for B = 128)
    if (o0 + g < e.n) tiles<NB, T>(x, ldx, flip, w, bs, col, p0, p1, g, comp, e, t0, o0, nt);
}


// store_tile for the 32 outputs [o, o + 32) of two tiles (lo, hi), bf16 output: each row's two halves computed as
// store_tile computes them, then one 64-byte store (accel_bf16::store_pair; store()'s fp64 rows for huge scales
// unless dense_order). AMX
// CPUs have AVX512_BF16.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"), noinline)) void store_tile_pair(
    const Epilogue& e, int64_t t0, int rows, int64_t o, const int32_t* lo, const int32_t* hi, const int32_t* comp) {
  const __m512 ws0 = _mm512_loadu_ps(e.wscale + o), ws1 = _mm512_loadu_ps(e.wscale + o + 16);
  const __m512 b0 = e.bias ? _mm512_loadu_ps(e.bias + o) : _mm512_setzero_ps();
  const __m512 b1 = e.bias ? _mm512_loadu_ps(e.bias + o + 16) : _mm512_setzero_ps();
  const __m512i c0 = _mm512_loadu_si512(comp), c1 = _mm512_loadu_si512(comp + 16);
  for (int t = 0; t < rows; ++t) {
    const __m512i a0 = _mm512_sub_epi32(_mm512_load_si512(lo + t * 16), c0);
    const __m512i a1 = _mm512_sub_epi32(_mm512_load_si512(hi + t * 16), c1);
    const float s = e.scale[t0 + t];
    if (!e.dense_order && s > kHugeScale) {
      store(e, t0 + t, o, a0);
      store(e, t0 + t, o + 16, a1);
      continue;
    }
    accel_bf16::store_pair(static_cast<uint16_t*>(e.y) + (t0 + t) * e.ldy + o, scaled(e, a0, s, ws0, b0),
                           scaled(e, a1, s, ws1, b1));
  }
}

// ---------------------------------------------------------------------------------------------- AMX (tdpbusd)
// The same product on AMX tiles: for 16 tokens x 16 outputs, C += A (tokens x kc uint8) . B (kc/4 input quads x 16
// outputs x 4 int8), kc = min(B, 64) inputs per tile multiply; the packed blocks [nnz][B/4][B][4] are B's layout.
// Tiles (amx_tiles.h): A tmm0, tmm1 (two groups of 16 tokens), B tmm2, tmm3 (two groups of 16 outputs), C tmm4..7.
// tokens [t0, t0 + nt) (nt <= 32), block row r, outputs [o0, o0 + 16 * og)
__attribute__((target("amx-tile,amx-int8"))) void amx_item(const uint8_t* u, int64_t ldu, const int8_t* w,
                                                           int64_t bs, const int64_t* col, int64_t p0, int64_t p1,
                                                           int64_t t0, int64_t nt, int64_t o0, int og,
                                                           const int32_t* comp, const Epilogue& e,
                                                           accel_amx::TileConfig& cur) {
  const int r0 = static_cast<int>(nt < 16 ? nt : 16), r1 = static_cast<int>(nt - r0);
  const int64_t kbytes = bs < 64 ? bs : 64;  // 64 inputs per tile multiply
  accel_amx::configure(cur, r0, r1, static_cast<int>(kbytes));
  accel_amx::zero_sums();
  const uint8_t* ut = u + t0 * ldu;
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* a = ut + col[p] * bs;
    const int8_t* wb = w + p * bs * bs + (o0 % bs) * 4;
    accel_amx::block_products<true>(reinterpret_cast<const char*>(a), ldu, reinterpret_cast<const char*>(a + 16 * ldu),
                                    ldu, reinterpret_cast<const char*>(wb), bs * 4, bs, kbytes, r1, og);
  }
  alignas(64) int32_t acc[2][16 * 16];
  const int64_t ob = o0 % bs;  // (comp is the block row's)
  for (int g = 0; g < (r1 ? 2 : 1); ++g) {
    if (og == 2 && e.bf16 && o0 + 32 <= e.n) {  // two whole output groups: rows of 32 bf16
      accel_amx::store_sums(g, 0, acc[0]);
      accel_amx::store_sums(g, 1, acc[1]);
      store_tile_pair(e, t0 + 16 * g, g ? r1 : r0, o0, acc[0], acc[1], comp + ob);
      continue;
    }
    for (int h = 0; h < og; ++h) {
      accel_amx::store_sums(g, h, acc[0]);
      store_tile(e, t0 + 16 * g, g ? r1 : r0, o0 + h * 16, acc[0], _mm512_loadu_si512(comp + ob + h * 16));
    }
  }
}

}  // namespace

// dtype: 0 fp32, 1 bf16, 2 fp16. is_static: every row's scale static_scale (static_scale_inv, values clamped to
// +-qmax). Returns 0, or a code for refused arguments.
extern "C" int accel_quantize_rows(const void* x, int dtype, int64_t m, int64_t k, int64_t ldx, int qmax, int is_static,
                                   float static_scale, uint8_t* u, int64_t ldu, int64_t width, float* scale,
                                   int nthreads) {
  if (dtype < 0 || dtype > 2 || m < 0 || k < 0 || width < k || ldu < width || qmax < 1 || qmax > 127 ||
      nthreads < 1)
    return 1;
  const int64_t elem = dtype == 0 ? 4 : 2;
  const float q = static_cast<float>(qmax);
  const float* st = is_static ? &static_scale : nullptr;
  // spans of a row per work item: whole rows when there are enough of them, else pieces of long rows (a conv's
  // per-image rows: one image would otherwise be one thread's work)
  const int64_t span = (m >= nthreads || k < (1 << 16)) ? (k > 0 ? k : 1) : (int64_t{1} << 15);
  const int64_t per_row = (k + span - 1) / span > 0 ? (k + span - 1) / span : 1;
  if (per_row == 1) {  // whole rows per item
#pragma omp parallel for num_threads(nthreads) schedule(static) if (m * k >= 65536)
    for (int64_t t = 0; t < m; ++t) quantize_row(x, dtype, t, k, ldx, q, st, u, ldu, width, scale);
    return 0;
  }
  const int64_t items = m * per_row;
  Pieces pc(items, m);
  if (!pc.ok()) return 3;
#pragma omp parallel num_threads(nthreads) if (m * k >= 65536)
  {
#pragma omp for schedule(static)
    for (int64_t j = 0; j < items; ++j) {
      const int64_t t = j / per_row, lo = (j % per_row) * span, hi = lo + span < k ? lo + span : k;
      pc.finite[j] = span_absmax(static_cast<const char*>(x) + t * ldx * elem, dtype, lo, hi, &pc.max[j]);
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < m; ++t) pc.settle(t, per_row, q, st, scale);
#pragma omp for schedule(static)
    for (int64_t j = 0; j < items; ++j) {
      const int64_t t = j / per_row, lo = (j % per_row) * span, hi = lo + span < k ? lo + span : k;
      uint8_t* ut = u + t * ldu;
      if (scale[t] != scale[t])  // NaN: bytes 128
        std::memset(ut + lo, 128, hi - lo);
      else
        quantize_span(static_cast<const char*>(x) + t * ldx * elem, dtype, lo, hi, pc.inv[t], q, ut);
      if (hi == k && width > k) std::memset(ut + k, 128, width - k);
    }
  }
  return 0;
}

// accel_quantize_rows for the images of a conv: x [n, h, w, c] (NHWC, contiguous), or with nchw x [n, c, h, w] (NCHW,
// contiguous, c a multiple of 16), quantized per image (one row of h * w * c values each: the same integers and
// scales) straight into up [n, h + 2 ph, w + 2 pw, c] (NHWC), the padding the zero point 128: no padded copy of a
// quantized image, and no NHWC copy of an NCHW input. is_static: every image's scale static_scale instead (the
// saturating static rule of accel.cpu.int8: inv = 1 / s, values clamped to +-qmax; an image holding NaN/inf scale NaN
// and bytes 128 as in the dynamic rule). Returns 0, or a code for refused arguments.
extern "C" int accel_quantize_images_padded(const void* x, int dtype, int nchw, int64_t n, int64_t h, int64_t w,
                                            int64_t c, int qmax, int is_static, float static_scale, uint8_t* up,
                                            int64_t ph, int64_t pw, float* scale, int nthreads) {
  if (dtype < 0 || dtype > 2 || n < 0 || h < 0 || w < 0 || c < 0 || ph < 0 || pw < 0 || qmax < 1 || qmax > 127 ||
      nthreads < 1 || (nchw && c % 16 != 0))
    return 1;
  const int64_t elem = dtype == 0 ? 4 : 2, row = w * c, hp = h + 2 * ph, prow = (w + 2 * pw) * c;
  const float q = static_cast<float>(qmax);
  // an image's maximum from pieces of it: its rows (NHWC) or its channel planes (NCHW), plen values each
  const int64_t per = nchw ? c : h, plen = nchw ? h * w : row;
  Pieces pc(n * per, n);
  if (!pc.ok()) return 3;
  const char* xb = static_cast<const char*>(x);
  const float* st = is_static ? &static_scale : nullptr;
  auto put_row = [&](int64_t j) {  // padded row j
    const int64_t b = j / hp, r = j % hp - ph;
    uint8_t* ur = up + j * prow;
    if (r < 0 || r >= h || scale[b] != scale[b]) {  // a padding row, or an image holding NaN/inf: bytes 128
      std::memset(ur, 128, prow);
      return;
    }
    std::memset(ur, 128, pw * c);
    if (nchw)
      quantize_row_nchw(xb + (b * c * h + r) * w * elem, dtype, c, h * w, w, pc.inv[b], q, ur + pw * c);
    else
      quantize_span(xb + (b * h + r) * row * elem, dtype, 0, row, pc.inv[b], q, ur + pw * c);
    std::memset(ur + pw * c + row, 128, pw * c);
  };
  // Whole images per thread when a thread's share of the input outgrows half its L2 (the two passes below would then
  // read it twice from L3 or memory): an image's bytes right after its maximum, while the image is in L2. Smaller
  // inputs, and fewer images than threads, take the two passes over pieces (rows or channel planes) spread over the
  // threads (two streams in parallel, the second pass mostly from L2).
  const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
  const int64_t share = (n + nthreads - 1) / nthreads * h * row * elem;
  if (n >= nthreads && share > (l2 > 0 ? l2 : int64_t{1} << 20) / 2) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (n * h * row >= 65536)
    for (int64_t b = 0; b < n; ++b) {
      for (int64_t j = b * per; j < (b + 1) * per; ++j)
        pc.finite[j] = span_absmax(xb + j * plen * elem, dtype, 0, plen, &pc.max[j]);
      pc.settle(b, per, q, st, scale);
      for (int64_t j = b * hp; j < (b + 1) * hp; ++j) put_row(j);
    }
    return 0;
  }
#pragma omp parallel num_threads(nthreads) if (n * h * row >= 65536)
  {
#pragma omp for schedule(static)
    for (int64_t j = 0; j < n * per; ++j) pc.finite[j] = span_absmax(xb + j * plen * elem, dtype, 0, plen, &pc.max[j]);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < n; ++b) pc.settle(b, per, q, st, scale);
#pragma omp for schedule(static)
    for (int64_t j = 0; j < n * hp; ++j) put_row(j);
  }
  return 0;
}

namespace {

// The products' argument check: 1 for a block size the kernels lack, 2 for refused shapes, else 0.
int refuse(int64_t bs, int64_t m, int64_t nbr, int64_t n, int64_t ldy, int nthreads) {
  if (bs != 16 && bs != 32 && bs != 64 && bs != 128) return 1;
  if (m < 0 || nbr < 0 || n > nbr * bs || ldy < n || nthreads < 1) return 2;
  return 0;
}

}  // namespace

extern "C" int accel_int8_bsr_vnni(const void* x, int x_is_u8, int64_t m, int64_t ldx, const int8_t* w,
                                   const int64_t* crow, const int64_t* col, int64_t nbr, int64_t bs,
                                   const int32_t* comp, const float* scale, const float* wscale, const float* bias,
                                   void* y, int y_bf16, int64_t ldy, int64_t n, int nthreads, int dense_order) {
  if (const int refused = refuse(bs, m, nbr, n, ldy, nthreads)) return refused;
  const Epilogue e{scale, wscale, bias, y, ldy, n, y_bf16 != 0, dense_order != 0};
  const uint8_t* xu = static_cast<const uint8_t*>(x);
  const uint32_t flip = x_is_u8 ? 0u : 0x80808080u;
  const int64_t T = bs <= 32 ? 8 : 4;  // tokens per tile: T * NB accumulators + NB weights in 32 registers
  const int64_t ntile = (m + T - 1) / T;
  const int64_t items = nbr * ntile;
#pragma omp parallel for num_threads(nthreads) schedule(static, 1)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t r = it / ntile, t0 = (it % ntile) * T;
    const int64_t nt = (m - t0 < T) ? (m - t0) : T;
    const uint8_t* xt = xu + t0 * ldx;
    const int32_t* cr = comp + r * bs;
    const int64_t p0 = crow[r], p1 = crow[r + 1];
    switch (bs) {
      case 16: block_row<1, 8>(xt, ldx, flip, w, bs, col, p0, p1, cr, e, t0, r * bs, nt); break;
      case 32: block_row<2, 8>(xt, ldx, flip, w, bs, col, p0, p1, cr, e, t0, r * bs, nt); break;
      default: block_row<4, 4>(xt, ldx, flip, w, bs, col, p0, p1, cr, e, t0, r * bs, nt); break;
    }
  }
  return 0;
}

// Ask Linux for the AMX tile state (once per process; oneDNN asks the same). 0: granted.
extern "C" int accel_amx_init() { return accel_amx::request_tiles(); }

namespace {

// The AMX product's items (token chunks x block rows x passes) on the calling team's threads (inside a parallel
// region), each thread on its own tiles.
void amx_items(const uint8_t* u, int64_t m, int64_t ldu, const int8_t* w, const int64_t* crow, const int64_t* col,
               int64_t nbr, int64_t bs, const int32_t* comp, const Epilogue& e, int64_t n) {
  const int og = bs >= 32 ? 2 : 1;            // output groups of 16 per item
  const int64_t passes = bs / (16 * og);      // items per block row and token chunk
  const int64_t chunks = (m + 31) / 32;       // token chunks of 32 (two groups of 16)
  const int64_t items = chunks * nbr * passes;
  accel_amx::TileConfig cur;
  std::memset(&cur, 0, sizeof(cur));
#pragma omp for schedule(static)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t q = it % passes, r = (it / passes) % nbr, ch = it / (passes * nbr);
    const int64_t t0 = ch * 32, nt = m - t0 < 32 ? m - t0 : 32;
    const int64_t o0 = r * bs + q * 16 * og;
    if (o0 >= n) continue;
    amx_item(u, ldu, w, bs, col, crow[r], crow[r + 1], t0, nt, o0, og, comp + r * bs, e, cur);
  }
  if (cur.palette_id) accel_amx::release();
}

}  // namespace

// accel_int8_bsr_vnni's product and epilogue on AMX tiles, for uint8 activations u [M, ldu] (integers + 128);
// dense_order and y (fp32, or bf16 with y_bf16) as accel_int8_bsr_vnni's.
extern "C" int accel_int8_bsr_amx(const uint8_t* u, int64_t m, int64_t ldu, const int8_t* w, const int64_t* crow,
                                  const int64_t* col, int64_t nbr, int64_t bs, const int32_t* comp, const float* scale,
                                  const float* wscale, const float* bias, void* y, int y_bf16, int64_t ldy, int64_t n,
                                  int nthreads, int dense_order) {
  if (const int refused = refuse(bs, m, nbr, n, ldy, nthreads)) return refused;
  if (m == 0 || nbr == 0) return 0;
  const Epilogue e{scale, wscale, bias, y, ldy, n, y_bf16 != 0, dense_order != 0};
#pragma omp parallel num_threads(nthreads)
  amx_items(u, m, ldu, w, crow, col, nbr, bs, comp, e, n);
  return 0;
}

// accel_quantize_rows (whole rows) and accel_int8_bsr_amx in one parallel region: the threads quantize their rows,
// meet, then take the product's items (one fork and join per call instead of two). Arguments as theirs; 0, or the
// code of the first refusal.
extern "C" int accel_int8_linear_amx(const void* x, int dtype, int64_t m, int64_t k, int64_t ldx, int qmax, uint8_t* u,
                                     int64_t ldu, int64_t width, float* scale, const int8_t* w, const int64_t* crow,
                                     const int64_t* col, int64_t nbr, int64_t bs, const int32_t* comp,
                                     const float* wscale, const float* bias, void* y, int y_bf16, int64_t ldy,
                                     int64_t n, int nthreads, int dense_order) {
  if (dtype < 0 || dtype > 2 || m < 0 || k < 0 || width < k || ldu < width || qmax < 1 || qmax > 127 || nthreads < 1)
    return 1;
  if (const int refused = refuse(bs, m, nbr, n, ldy, nthreads)) return refused;
  if (m == 0) return 0;
  const Epilogue e{scale, wscale, bias, y, ldy, n, y_bf16 != 0, dense_order != 0};
  const float q = static_cast<float>(qmax);
#pragma omp parallel num_threads(nthreads)
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < m; ++t) quantize_row(x, dtype, t, k, ldx, q, nullptr, u, ldu, width, scale);
    // (the loop's barrier: every row quantized before any product)
    if (nbr > 0) amx_items(u, m, ldu, w, crow, col, nbr, bs, comp, e, n);
  }
  return 0;
}
