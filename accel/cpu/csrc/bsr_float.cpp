// Block-sparse Conv2d (and Linear, as a 1x1 conv over one image row) in fp32 or bf16 on AVX-512: an implicit GEMM
// that reads the channels_last input in place, one pass over the stored blocks, no im2col, no gather, no padding
// copy, no GEMM call per block row.
//
// The weight [O, C, KH, KW] is the matrix W [O, KH*KW*C] in (kh, kw, c) order, stored block-sparse (B x B blocks,
// C % B == 0): K block kb is tap kb / (C/B) (kh = tap / KW, kw = tap % KW) and channels (kb % (C/B)) * B .. + B.
// For output pixel m = (n, oh, ow) and stored block p of block row r:
//   y[m, r*B + o] += sum_{i < B} x[n, oh*sh - ph + kh*dh, ow*sw - pw + kw*dw, c0 + i] * W[p, o, i]
// where a tap outside the image reads zeros (the zero padding), then y = acc + bias[o] rounded once to the output
// dtype (o < O only). Sums in fp32: fp32 inputs by fused multiply-adds; bf16 inputs by vdpbf16ps (pairs of bf16
// products added in fp32, AVX512_BF16). Blocks packed [nnz][B][B] (in, out) for fp32 and [nnz][B/2][B][2] for
// bf16 (two consecutive inputs of one output together: vdpbf16ps's operand order).
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16.h"
#include "nonfinite.h"
#include "transpose.h"

namespace {

struct Geometry {
  int64_t n, h, w, c;     // input [n, h, w, c] NHWC, or with nchw [n, c, h, w] (fp32 only)
  int64_t oh, ow;         // output pixels per image
  int64_t sh, sw, ph, pw, dh, dw, kw;
  int64_t ncb;            // C / B
  int nchw;
  int64_t ps, cs;  // elements between an input row's pixels (c, or 1 for NCHW) and between its channels (1, or h * w)
};

struct Out {
  const float* bias;  // [O] or null
  void* y;            // [M, ldy] fp32 or bf16; with nchw [N, ldy, OH*OW] (planes of `plane` pixels)
  int64_t ldy, o;
  int bf16;
  int nchw;
  int64_t plane;  // OH * OW
};

// one output value of pixel m, output o (a conv's NCHW output: the tiles whose pixels cross images)
inline void store_one(const Out& out, int64_t m, int64_t o, float v) {
  const int64_t at = ((m / out.plane) * out.ldy + o) * out.plane + m % out.plane;
  if (out.bf16) {
    const __m256i h = accel_bf16::exact(_mm512_set1_ps(v));
    std::memcpy(static_cast<uint16_t*>(out.y) + at, &h, 2);
  } else {
    static_cast<float*>(out.y)[at] = v;
  }
}

using accel_transpose::transpose16_ps;

alignas(64) const float kZeros[128] = {};
constexpr int T_MAX = 8;  // most output pixels per tile

// A call of one tile of pixels (a Linear of a few tokens) reads each block once, a stream of weights from memory:
// block p + kAhead's bytes are asked for while block p multiplies, for p + kAhead < pf_end (0 for more pixels: the
// blocks are read again, from cache), and blocks of at most kPrefetchBytes. Measured on Sapphire Rapids, weights
// from memory, M = 1: fp32 blocks of 16 and 32 1.4-1.5x; larger blocks, the AMX and the int8 kernels gained
// nothing; with 16 tokens (two tiles) from cache it lost 17%.
constexpr int64_t kAhead = 4;
constexpr int64_t kPrefetchBytes = 4096;

inline void prefetch_block(const void* w, int64_t p, int64_t bytes, int64_t pf_end) {
  if (p + kAhead >= pf_end || bytes > kPrefetchBytes) return;
  const char* c = static_cast<const char*>(w) + (p + kAhead) * bytes;
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
}

// A block's tap and channels: where its window row starts relative to a pixel's window corner.
struct Tap {
  int64_t dy, dx, c0;
};

// where each of a tile's T output pixels reads: its image's first element and its window's top-left corner
struct Pixels {
  int64_t image[T_MAX], ih0[T_MAX], iw0[T_MAX];
};

// The output pixel (n, oh, ow) a tile starts at, advanced pixel by pixel (no divisions per tile).
struct Cursor {
  int64_t n, oh, ow;
  template <int T>
  inline void take(const Geometry& g, int64_t nt, Pixels& px) {
    for (int t = 0; t < T; ++t) {  // a short last tile repeats its last pixel (the same values stored twice)
      px.image[t] = n * g.h * g.w * g.c;
      px.ih0[t] = oh * g.sh - g.ph;
      px.iw0[t] = ow * g.sw - g.pw;
      if (t + 1 < nt && ++ow == g.ow) {
        ow = 0;
        if (++oh == g.oh) oh = 0, ++n;
      }
    }
    if (nt == T && ++ow == g.ow) {  // the next tile's first pixel
      ow = 0;
      if (++oh == g.oh) oh = 0, ++n;
    }
  }
};

// the first element of each pixel's window row for a block at tap tp (zeros outside the image)
template <int T, typename E>
inline void window_rows(const E* x, const Geometry& g, const Pixels& px, const Tap& tp, const E** rows) {
  for (int t = 0; t < T; ++t) {
    const int64_t ih = px.ih0[t] + tp.dy, iw = px.iw0[t] + tp.dx;
    rows[t] = (ih >= 0 && ih < g.h && iw >= 0 && iw < g.w) ? x + px.image[t] + (ih * g.w + iw) * g.ps + tp.c0 * g.cs
                                                           : reinterpret_cast<const E*>(kZeros);
  }
}

template <int NB, int T>
inline void store(const Out& out, int64_t m0, int64_t nt, int64_t o0, __m512 (&acc)[T][NB]) {
  for (int j = 0; j < NB; ++j) {
    const int64_t o = o0 + j * 16;
    if (o >= out.o) break;
    const __mmask16 k = out.o - o >= 16 ? static_cast<__mmask16>(0xFFFF)
                                        : static_cast<__mmask16>((1u << (out.o - o)) - 1);
    const __m512 b = out.bias ? _mm512_maskz_loadu_ps(k, out.bias + o) : _mm512_setzero_ps();
    if (out.nchw) {  // each output's nt pixels: consecutive in its plane unless the tile crosses images
      const int64_t nt_ = T < nt ? T : nt;
      const int nc = static_cast<int>(out.o - o < 16 ? out.o - o : 16);
      __m512 r[16];
      for (int t = 0; t < nt_; ++t) r[t] = _mm512_add_ps(acc[t][j], b);
      if ((m0 + nt_ - 1) / out.plane != m0 / out.plane) {
        for (int t = 0; t < nt_; ++t) {
          alignas(64) float v[16];
          _mm512_store_ps(v, r[t]);
          for (int jj = 0; jj < nc; ++jj) store_one(out, m0 + t, o + jj, v[jj]);
        }
        continue;
      }
      accel_transpose::store_planes(r, nt_, nc, out.y, out.bf16, m0 / out.plane, out.ldy, o, out.plane,
                                    m0 % out.plane);
      continue;
    }
    for (int t = 0; t < T && t < nt; ++t) {
      const __m512 v = _mm512_add_ps(acc[t][j], b);
      if (out.bf16) {
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out.y) + (m0 + t) * out.ldy + o, k, accel_bf16::exact(v));
      } else {
        _mm512_mask_storeu_ps(static_cast<float*>(out.y) + (m0 + t) * out.ldy + o, k, v);
      }
    }
  }
}

// NCHW: a pixel's channels are g.cs apart (the padding's zeros: consecutive, kZeros)
template <int NB, int T, bool NCHW>
void tile_f32(const float* x, const Geometry& g, const float* w, int64_t bs, const Tap* taps, int64_t p0, int64_t p1,
              int64_t grp, const Pixels& px, const Out& out, int64_t m0, int64_t nt, int64_t o0, int64_t pf_end) {
  __m512 acc[T][NB];
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < NB; ++j) acc[t][j] = _mm512_setzero_ps();
  const float* rows[T];
  for (int64_t p = p0; p < p1; ++p) {
    prefetch_block(w, p, bs * bs * 4, pf_end);
    window_rows<T>(x, g, px, taps[p - p0], rows);
    const float* wb = w + p * bs * bs + grp;
    int64_t step[T];
    if constexpr (NCHW)
      for (int t = 0; t < T; ++t) step[t] = rows[t] == kZeros ? 1 : g.cs;
    for (int64_t i = 0; i < bs; ++i) {
      __m512 wv[NB];
      for (int j = 0; j < NB; ++j) wv[j] = _mm512_loadu_ps(wb + i * bs + j * 16);
      for (int t = 0; t < T; ++t) {
        const __m512 xv = _mm512_set1_ps(NCHW ? *rows[t] : rows[t][i]);
        if constexpr (NCHW) rows[t] += step[t];
        for (int j = 0; j < NB; ++j) acc[t][j] = _mm512_fmadd_ps(xv, wv[j], acc[t][j]);
      }
    }
  }
  store<NB, T>(out, m0, nt, o0 + grp, acc);
}

template <int NB, int T>
__attribute__((target("avx512bf16"))) void tile_bf16(const uint16_t* x, const Geometry& g, const uint16_t* w,
                                                     int64_t bs, const Tap* taps, int64_t p0, int64_t p1, int64_t grp,
                                                     const Pixels& px, const Out& out, int64_t m0, int64_t nt,
                                                     int64_t o0, int64_t pf_end) {
  __m512 acc[T][NB];
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < NB; ++j) acc[t][j] = _mm512_setzero_ps();
  const uint16_t* rows[T];
  for (int64_t p = p0; p < p1; ++p) {
    prefetch_block(w, p, bs * bs * 2, pf_end);
    window_rows<T>(x, g, px, taps[p - p0], rows);
    const uint16_t* wb = w + p * bs * bs + grp * 2;
    for (int64_t i = 0; i < bs / 2; ++i) {
      __m512bh wv[NB];
      for (int j = 0; j < NB; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(wb + (i * bs + j * 16) * 2);
      for (int t = 0; t < T; ++t) {
        int32_t pair;
        std::memcpy(&pair, rows[t] + 2 * i, 4);
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
        for (int j = 0; j < NB; ++j) acc[t][j] = _mm512_dpbf16_ps(acc[t][j], xv, wv[j]);
      }
    }
  }
  store<NB, T>(out, m0, nt, o0 + grp, acc);
}

//: tiles of T pixels per work item (amortizes an item's setup: the taps of its block row, its first pixel)
constexpr int64_t kTilesPerItem = 4;

// Whether the input rows that output pixels [first, last)'s windows span (whole rows, from each output row's first tap
// row to its last) hold a NaN or an inf, skipping rows below `next` (this thread's rows already scanned, which come in
// order) and moving it past the rows scanned: the sparse conv's check, each row read just before the tiles read it.
inline bool scan_rows(const void* x, int bf16, const Geometry& g, int64_t kh, int64_t first, int64_t last,
                      int64_t& next) {
  const int64_t elem = bf16 ? 2 : 4;
  bool found = false;
  for (int64_t orow = first / g.ow; orow <= (last - 1) / g.ow; ++orow) {  // (output rows: image * oh + oh)
    const int64_t img = orow / g.oh, lo = (orow % g.oh) * g.sh - g.ph, hi = lo + (kh - 1) * g.dh;
    for (int64_t ih = lo < 0 ? 0 : lo; ih <= hi && ih < g.h; ++ih) {
      const int64_t at = img * g.h + ih;
      if (at < next) continue;
      const char* base = static_cast<const char*>(x) + (img * g.h * g.w * g.c + ih * g.w * g.ps) * elem;
      if (g.nchw)  // (the row's pixels of each channel)
        for (int64_t ch = 0; ch < g.c; ++ch) found |= accel_rows::row_nonfinite(base + ch * g.cs * elem, bf16, g.w);
      else
        found |= accel_rows::row_nonfinite(base, bf16, g.w * g.c);
      next = at + 1;
    }
  }
  return found;
}

template <int NB, int T>
void run(const void* x, int bf16, const Geometry& g, const void* w, int64_t bs, const int64_t* crow,
         const int64_t* col, int64_t nbr, const Out& out, int64_t m, int64_t kh, int* nonfinite, int nthreads) {
  const int64_t span = T * kTilesPerItem;
  const int64_t nchunk = (m + span - 1) / span;
  const int64_t items = nbr * nchunk;
  const int64_t pf_end = m <= T ? crow[nbr] : 0;  // (one tile of pixels: each block read once per call)
#pragma omp parallel num_threads(nthreads)
  {
  int64_t next = 0;  // (the thread's input rows below this are scanned)
  bool started = false, found = false;
#pragma omp for schedule(static)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t chunk = it / nbr, r = it % nbr;  // (consecutive items: the same pixels, the next block row)
    const int64_t p0 = crow[r], p1 = crow[r + 1];
    const int64_t first = chunk * span, last = first + span < m ? first + span : m;
    if (nonfinite && (r == 0 || !started)) found |= scan_rows(x, bf16, g, kh, first, last, next);
    started = true;
    thread_local std::vector<Tap> row_taps;  // (the block row's taps: grown once per thread, not on the stack)
    if (static_cast<int64_t>(row_taps.size()) < p1 - p0) row_taps.resize(p1 - p0);
    Tap* taps = row_taps.data();
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t tap = col[p] / g.ncb;
      taps[p - p0] = Tap{(tap / g.kw) * g.dh, (tap % g.kw) * g.dw, (col[p] % g.ncb) * bs};
    }
    for (int64_t grp = 0; grp < bs && r * bs + grp < out.o; grp += NB * 16) {  // (two groups for B = 128)
      Cursor cur{first / (g.oh * g.ow), (first / g.ow) % g.oh, first % g.ow};
      for (int64_t m0 = first; m0 < last; m0 += T) {
        const int64_t nt = last - m0 < T ? last - m0 : T;
        Pixels px;
        cur.take<T>(g, nt, px);
        if (bf16)
          tile_bf16<NB, T>(static_cast<const uint16_t*>(x), g, static_cast<const uint16_t*>(w), bs, taps, p0, p1, grp,
                           px, out, m0, nt, r * bs, pf_end);
        else if (g.nchw)
          tile_f32<NB, T, true>(static_cast<const float*>(x), g, static_cast<const float*>(w), bs, taps, p0, p1, grp,
                                px, out, m0, nt, r * bs, pf_end);
        else
          tile_f32<NB, T, false>(static_cast<const float*>(x), g, static_cast<const float*>(w), bs, taps, p0, p1, grp,
                                 px, out, m0, nt, r * bs, pf_end);
      }
    }
  }
  if (found) __atomic_store_n(nonfinite, 1, __ATOMIC_RELAXED);
  }
}

}  // namespace

// x: NHWC contiguous [n, h, w, c] fp32 (bf16 = 0) or bf16 (bf16 = 1), or with x_nchw (fp32 only) NCHW contiguous
// [n, c, h, w] read in place (no NHWC copy of an NCHW layer's input: engine native_nchw); y: [n*oh*ow, ldy] in the
// same dtype, or with
// y_nchw [n, ldy, oh, ow] (NCHW: no copy of a channels_last result for an NCHW layer). nonfinite (or null): set to 1
// when an input row spanned by the windows of kh tap rows (from an output row's first tap row to its last, whole rows)
// holds a NaN or an inf, else left (each thread scans the rows of its pixels just before reading them). Returns 0, or
// a code for refused arguments.
extern "C" int accel_bsr_conv_float(const void* x, int bf16, int64_t n, int64_t h, int64_t w, int64_t c, int64_t kw,
                                    int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t oh,
                                    int64_t ow, const void* wpack, const int64_t* crow, const int64_t* col,
                                    int64_t nbr, int64_t bs, const float* bias, void* y, int64_t ldy, int64_t o,
                                    int y_nchw, int64_t kh, int* nonfinite, int x_nchw, int nthreads) {
  if (bs != 16 && bs != 32 && bs != 64 && bs != 128) return 1;
  if (c % bs || n < 0 || h < 0 || w < 0 || oh < 0 || ow < 0 || kw < 1 || kh < 1 || sh < 1 || sw < 1 || dh < 1 ||
      dw < 1 || o > nbr * bs || ldy < o || nthreads < 1 || (bf16 != 0 && bf16 != 1) || (y_nchw != 0 && y_nchw != 1) ||
      (x_nchw != 0 && (x_nchw != 1 || bf16)))
    return 2;
  const int64_t m = n * oh * ow;
  if (m == 0 || nbr == 0) return 0;
  const Geometry g{n, h, w, c, oh, ow, sh, sw, ph, pw, dh, dw, kw, c / bs, x_nchw, x_nchw ? 1 : c, x_nchw ? h * w : 1};
  const Out out{bias, y, ldy, o, bf16, y_nchw, oh * ow};
  switch (bs) {
    case 16: run<1, 8>(x, bf16, g, wpack, bs, crow, col, nbr, out, m, kh, nonfinite, nthreads); break;
    case 32: run<2, 8>(x, bf16, g, wpack, bs, crow, col, nbr, out, m, kh, nonfinite, nthreads); break;
    default: run<4, 4>(x, bf16, g, wpack, bs, crow, col, nbr, out, m, kh, nonfinite, nthreads); break;
  }
  return 0;
}

using accel_rows::row_nonfinite;

// Whether rows x [m, k] (row stride ldx elements; fp32, or bf16 with bf16 = 1) hold a NaN or an inf: 1 or 0. The
// sparse layers' check for inputs whose pruned products the dense layer would turn into NaN.
extern "C" int accel_any_nonfinite(const void* x, int bf16, int64_t m, int64_t k, int64_t ldx, int nthreads) {
  const int64_t elem = bf16 ? 2 : 4;
  int found = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(| : found) if (m * k >= (1 << 18))
  for (int64_t t = 0; t < m; ++t) found |= row_nonfinite(static_cast<const char*>(x) + t * ldx * elem, bf16, k);
  return found;
}

// A sparse Linear's output made like the dense layer's for inputs holding NaN/inf: rows t of x [m, k] with a NaN or
// inf get every finite output y[t, 0 .. n) set to NaN (the dense layer's 0 * inf and NaN products reach every
// output of the row; a sparse product skips the pruned blocks). x_bf16 / y_bf16: bf16 rather than fp32. Returns the
// number of rows changed.
extern "C" int64_t accel_nonfinite_rows(const void* x, int x_bf16, int64_t m, int64_t k, int64_t ldx, void* y,
                                        int y_bf16, int64_t n, int64_t ldy) {
  const int64_t elem = x_bf16 ? 2 : 4;
  int64_t changed = 0;
  for (int64_t t = 0; t < m; ++t) {
    if (!row_nonfinite(static_cast<const char*>(x) + t * ldx * elem, x_bf16, k)) continue;
    ++changed;
    for (int64_t j = 0; j < n; ++j) {
      if (y_bf16) {
        uint16_t& v = static_cast<uint16_t*>(y)[t * ldy + j];
        if ((v & 0x7F80u) != 0x7F80u) v = 0x7FC0;
      } else {
        float& v = static_cast<float*>(y)[t * ldy + j];
        uint32_t u;
        std::memcpy(&u, &v, 4);
        if ((u & 0x7F800000u) != 0x7F800000u) {
          const uint32_t nan = 0x7FC00000u;
          std::memcpy(&v, &nan, 4);
        }
      }
    }
  }
  return changed;
}

// x [n, h, w, c] NHWC (contiguous; fp32, or bf16 with bf16 = 1) copied into xp [n, h + 2ph, w + 2pw, c] with zeros
// around each image (the AMX conv's padded input), every input row scanned as it is copied: returns 1 when x holds a
// NaN or an inf (the sparse conv's check, without another read of x), else 0.
extern "C" int accel_pad_nhwc(const void* x, int bf16, int64_t n, int64_t h, int64_t w, int64_t c, int64_t ph,
                              int64_t pw, void* xp, int nthreads) {
  const int64_t elem = bf16 ? 2 : 4, hp = h + 2 * ph, wp = w + 2 * pw;
  const int64_t row = w * c * elem, prow = wp * c * elem, side = pw * c * elem;
  int found = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(| : found) if (n * h * row >= (1 << 18))
  for (int64_t it = 0; it < n * hp; ++it) {
    const int64_t img = it / hp, r = it % hp;
    char* dst = static_cast<char*>(xp) + it * prow;
    if (r < ph || r >= ph + h) {
      std::memset(dst, 0, prow);
      continue;
    }
    const char* src = static_cast<const char*>(x) + (img * h + (r - ph)) * row;
    std::memset(dst, 0, side);
    std::memcpy(dst + side, src, row);
    std::memset(dst + side + row, 0, side);
    found |= row_nonfinite(src, bf16, w * c);
  }
  return found;
}

// y[b][j][i] = x[b][i][j] for n images of [hw][c] (both contiguous): NHWC -> NCHW, or with (hw, c) = (C, H*W) NCHW
// -> NHWC. 32-bit values, or 16-bit ones (bf16, fp16) with half = 1 (widened to 32-bit lanes for the transpose: the
// bits are only moved): 16 x 16 at a time, loaded as rows, transposed in registers and stored as columns (masked at
// the edges). Conv inputs and outputs between the layouts without PyTorch's strided copy.
extern "C" int accel_transpose_images(const void* x, int half, int64_t n, int64_t hw, int64_t c, void* y,
                                      int nthreads) {
  if (n < 0 || hw < 0 || c < 0 || nthreads < 1) return 1;
  const int64_t pb = (hw + 15) / 16, cb = (c + 15) / 16;
  // one 16 x 16 block per item (a batch-1 NCHW -> NHWC copy of 64 channels has only 4 row blocks per image)
#pragma omp parallel for num_threads(nthreads) schedule(static) if (n * hw * c >= (1 << 16))
  for (int64_t it = 0; it < n * pb * cb; ++it) {
    const int64_t b = it / (pb * cb), p0 = (it / cb % pb) * 16, c0 = (it % cb) * 16;
    const int np = static_cast<int>(hw - p0 < 16 ? hw - p0 : 16);
    const __mmask16 pm = np == 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << np) - 1);
    const int64_t src = (b * hw + p0) * c, dst = b * c * hw + p0;  // (in values)
    const int nc = static_cast<int>(c - c0 < 16 ? c - c0 : 16);
    const __mmask16 cm = nc == 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << nc) - 1);
    __m512 r[16];
    for (int i = 0; i < 16; ++i) {
      if (i >= np)
        r[i] = _mm512_setzero_ps();
      else if (half)
        r[i] = _mm512_castsi512_ps(_mm512_cvtepu16_epi32(
            _mm256_maskz_loadu_epi16(cm, static_cast<const uint16_t*>(x) + src + i * c + c0)));
      else
        r[i] = _mm512_maskz_loadu_ps(cm, static_cast<const float*>(x) + src + i * c + c0);
    }
    transpose16_ps(r);
    for (int j = 0; j < nc; ++j) {
      if (half)
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(y) + dst + (c0 + j) * hw, pm,
                                 _mm512_cvtepi32_epi16(_mm512_castps_si512(r[j])));
      else
        _mm512_mask_storeu_ps(static_cast<float*>(y) + dst + (c0 + j) * hw, pm, r[j]);
    }
  }
  return 0;
}
