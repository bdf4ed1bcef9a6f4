// Block-sparse Conv2d (and Linear, as a 1x1 conv over one row of M pixels) in bf16 on AMX: the implicit GEMM of
// bsr_float.cpp with each stored block's products done by tile multiplies (tdpbf16ps: 16 pixels x 16 outputs x 32
// inputs per instruction, fp32 sums).
//
// The input is channels_last x [N, H, W, C] bf16, read in place: the zero padding is never materialised. A stored
// block of tap (kh, kw) whose input row falls in the padding is skipped (its products are zero); for 16 consecutive
// output pixels of one output row whose window columns all lie inside x, the block's inputs are 16 rows of x sw*C
// apart (one tile load); a group reaching into the left or right padding is first copied, zeros for the padding, into
// a small buffer of the thread's. The weight [O, C, KH, KW] is W [O, KH*KW*C] in (kh, kw, c) order, block-sparse
// with B x B blocks, C % B == 0, packed [nnz][B/2][B][2] bf16 (two consecutive inputs of one output together: the
// B operand of tdpbf16ps, a row per input pair). y[m, o] = sum + bias[o], rounded once to bf16 (o < O).
//
// Tiles (amx_tiles.h): 2 pixel groups (A, 16 rows each) x 2 groups of 16 outputs (B) -> 4 accumulators (C, 16 x 16).
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "amx_tiles.h"
#include "bf16.h"
#include "nonfinite.h"
#include "transpose.h"

namespace {

using accel_amx::block_products;
using accel_amx::configure;
using accel_amx::load_sums;
using accel_amx::store_sums;
using accel_amx::TileConfig;
using accel_amx::zero_sums;

struct Geometry {
  int64_t h, w, c;  // input NHWC (per image h * w * c)
  int64_t ph, pw;   // zero padding (top and bottom, left and right)
  int64_t oh, ow;
  int64_t sh, sw, dh, dw, kw;
  int64_t ncb;  // C / B
  int64_t nnz;  // stored blocks
  // Prefetch each next stored block: where each is read by few items (one output row, a Linear's tokens: 1.15x at one
  // token on a 4096^2 layer at 90%, cold), not where many pixel rows reuse them from cache (a conv: 0.93-0.99x).
  bool prefetch;
};

// `bytes` bytes from src to dst, or zeros (src null): 64-byte vector moves (a call to memcpy per row costs more)
__attribute__((target("avx512f,avx512bw"))) inline void copy_row(char* dst, const char* src, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) {
    const __mmask64 m = bytes - i >= 64 ? ~0ULL : (1ULL << (bytes - i)) - 1;
    _mm512_mask_storeu_epi8(dst + i, m, src ? _mm512_maskz_loadu_epi8(m, src + i) : _mm512_setzero_si512());
  }
}

// The A operands of one stored block (tap `tap`, channels [c0, c0 + B)) for output row (n, oh), pixels [ow0, ow0 + r0
// + r1): false when the tap's input row is padding (no products), else a[g] / as[g], the first A row of pixel group g
// and the bytes between its rows: in x itself, or in stage[g] (16 rows of `row` bytes) where the group's window
// columns reach into the padding. T: the element type of x (its padding value is 0 in these bits).
template <typename T>
__attribute__((target("avx512f,avx512bw"))) inline bool a_groups(const T* x, const Geometry& g, int64_t tap,
                                                                 int64_t c0, int64_t n, int64_t oh, int64_t ow0,
                                                                 int r0, int r1, int64_t row,
                                                                 char (*stage)[16 * 256], const char** a,
                                                                 int64_t* as) {
  const int64_t ih = oh * g.sh - g.ph + (tap / g.kw) * g.dh;
  if (ih < 0 || ih >= g.h) return false;
  const T* xrow = x + (n * g.h + ih) * g.w * g.c + c0;  // pixel iw of the input row at xrow + iw * c
  const int64_t iw0 = ow0 * g.sw - g.pw + (tap % g.kw) * g.dw;
  for (int gr = 0; gr < (r1 ? 2 : 1); ++gr) {
    const int64_t rows = gr ? r1 : r0, first = iw0 + 16 * gr * g.sw, last = first + (rows - 1) * g.sw;
    if (first >= 0 && last < g.w) {
      a[gr] = reinterpret_cast<const char*>(xrow + first * g.c);
      as[gr] = g.sw * g.c * static_cast<int64_t>(sizeof(T));
      continue;
    }
    for (int64_t j = 0; j < rows; ++j) {
      const int64_t iw = first + j * g.sw;
      copy_row(stage[gr] + j * row, iw >= 0 && iw < g.w ? reinterpret_cast<const char*>(xrow + iw * g.c) : nullptr,
               row);
    }
    a[gr] = stage[gr];
    as[gr] = row;
  }
  if (!r1) a[1] = a[0], as[1] = as[0];  // (unused)
  return true;
}

// store_rows for outputs [o, o + 32) from the sums of two output groups: one 64-byte store per row
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))) inline void store_pairs(
    const float* lo, const float* hi, int64_t rows, int64_t o, const float* bias, uint16_t* y, int64_t ldy) {
  const __m512 b0 = bias ? _mm512_loadu_ps(bias + o) : _mm512_setzero_ps();
  const __m512 b1 = bias ? _mm512_loadu_ps(bias + o + 16) : _mm512_setzero_ps();
  for (int64_t t = 0; t < rows; ++t) {
    accel_bf16::store_pair(y + t * ldy + o, _mm512_add_ps(_mm512_loadu_ps(lo + t * 16), b0),
                           _mm512_add_ps(_mm512_loadu_ps(hi + t * 16), b1));
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))) inline void store_rows(
    const float* acc, int64_t rows, int64_t o, int64_t nout, const float* bias, uint16_t* y, int64_t ldy) {
  if (o >= nout) return;
  const __mmask16 k = nout - o >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (nout - o)) - 1);
  const __m512 b = bias ? _mm512_maskz_loadu_ps(k, bias + o) : _mm512_setzero_ps();
  for (int64_t t = 0; t < rows; ++t)
    _mm256_mask_storeu_epi16(y + t * ldy + o, k, accel_bf16::fast(_mm512_add_ps(_mm512_loadu_ps(acc + t * 16), b)));
}

// One item: the output pixels [ow0, ow0 + np) of output row (n, oh), block row r, outputs [o0, o0 + 16 * og).
// og: output groups of 16 in this pass (1 or 2).
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))) void item(
    const uint16_t* x, const Geometry& g, const uint16_t* w, int64_t bs, const int64_t* col, int64_t p0, int64_t p1,
    int64_t n, int64_t oh, int64_t ow0, int64_t np, int64_t o0, int og, const float* bias, uint16_t* y, int64_t ldy,
    int64_t nout, TileConfig& cur, char (*stage)[16 * 256]) {
  const int r0 = static_cast<int>(np < 16 ? np : 16), r1 = static_cast<int>(np - r0);
  const int64_t kbytes = (bs < 32 ? bs : 32) * 2;  // 32 inputs per tile multiply
  configure(cur, r0, r1, static_cast<int>(kbytes));
  zero_sums();
  for (int64_t p = p0; p < p1; ++p) {
    const char* a[2];
    int64_t as[2];
    if (!a_groups(x, g, col[p] / g.ncb, (col[p] % g.ncb) * bs, n, oh, ow0, r0, r1, bs * 2, stage, a, as)) continue;
    const uint16_t* wb = w + p * bs * bs + o0 % bs * 2;
    if (g.prefetch && p + 1 < g.nnz) {  // the next stored block (this row's, or the next row's) into L1
      const char* next = reinterpret_cast<const char*>(w + (p + 1) * bs * bs);
      for (int64_t b = 0; b < bs * bs * 2; b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
    }
    block_products<false>(a[0], as[0], a[1], as[1], reinterpret_cast<const char*>(wb), bs * 4, bs * 2, kbytes, r1, og);
  }
  alignas(64) float acc[2][16 * 16];
  const int64_t m0 = (n * g.oh + oh) * g.ow + ow0;
  for (int gr = 0; gr < (r1 ? 2 : 1); ++gr) {
    uint16_t* yg = y + (m0 + 16 * gr) * ldy;
    const int64_t rows = gr ? r1 : r0;
    if (og == 2 && o0 + 32 <= nout) {  // both output groups whole: one 64-byte row of 32 bf16 per pixel
      store_sums(gr, 0, acc[0]);
      store_sums(gr, 1, acc[1]);
      store_pairs(acc[0], acc[1], rows, o0, bias, yg, ldy);
      continue;
    }
    for (int h = 0; h < og; ++h) {
      store_sums(gr, h, acc[0]);
      store_rows(acc[0], rows, o0 + 16 * h, nout, bias, yg, ldy);
    }
  }
}

// ---------------------------------------------------------------------------------------------- int8 (tdpbusd)
// The same implicit GEMM for accel's int8 conv: the input quantized per image to uint8 (integers + 128; the
// padding 128, i.e. zero), the weight int8 [O, KH*KW*C] as (dense) blocks packed [nnz][B/4][B][4], int32 sums,
// y[m, o] = fma(float(acc - comp[o]) * w_scale[o], scale[image], bias[o]) in fp32: the eager engines' order (their
// GEMM returns acc * w_scale, then torch.addcmul(bias, y, scale)); stored as fp32, or rounded once to bf16.
struct I8Out {
  const float* scale;   // [N] per image
  const float* wscale;  // [O]
  const float* bias;    // [O] or null
  const int32_t* comp;  // [nbr * B]: 128 * sum of each output's weights
  void* y;              // [M, ldy] fp32, or bf16 with bf16 = 1; with nchw [N, ldy, OH*OW] (planes of `plane` pixels)
  int64_t ldy, nout;
  int bf16;
  int nchw;
  int64_t plane;  // OH * OW
};

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))) inline void store_i8(
    const int32_t* acc, int64_t rows, int64_t o, int64_t ob, float s, const I8Out& out, int64_t m0) {
  if (o >= out.nout) return;
  const __mmask16 k = out.nout - o >= 16 ? static_cast<__mmask16>(0xFFFF)
                                         : static_cast<__mmask16>((1u << (out.nout - o)) - 1);
  const __m512 ws = _mm512_maskz_loadu_ps(k, out.wscale + o);
  const __m512 b = out.bias ? _mm512_maskz_loadu_ps(k, out.bias + o) : _mm512_setzero_ps();
  const __m512i c = _mm512_loadu_si512(out.comp + ob);
  const __m512 vs = _mm512_set1_ps(s);
  __m512 r[16];  // (NCHW: the rows' values, transposed before they are stored)
  for (int64_t t = 0; t < rows; ++t) {
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_loadu_si512(acc + t * 16), c)), ws);
    v = out.bias ? _mm512_fmadd_ps(v, vs, b) : _mm512_mul_ps(v, vs);
    if (out.nchw) {
      r[t] = v;
      continue;
    }
    const int64_t at = (m0 + t) * out.ldy + o;
    if (out.bf16)
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out.y) + at, k, accel_bf16::fast(v));
    else
      _mm512_mask_storeu_ps(static_cast<float*>(out.y) + at, k, v);
  }
  if (!out.nchw) return;
  // NCHW: the rows are consecutive pixels of one output row (an item never crosses one), so each output's values are
  // `rows` consecutive pixels of its plane
  accel_transpose::store_planes(r, rows, static_cast<int>(out.nout - o < 16 ? out.nout - o : 16), out.y, out.bf16,
                                m0 / out.plane, out.ldy, o, out.plane, m0 % out.plane);
}

// int8 sums kept for a few output rows at once, so that a stretch of the weight is read once from L2 for all of them
// (the int8 conv's weight is dense: every item walks all K): the pixels [ow0, ow0 + np) of output rows oh0 ..
// oh0 + nrows - 1 (nrows <= kRows) of image n, block row r (blocks p0 .. p1), outputs [o0, o0 + 16 * og). The blocks
// go in stretches of kStretch; each row's sums are stored to `acc` after a stretch and loaded back for the next.
constexpr int kRows = 4;
constexpr int64_t kStretch = 8;  // (8 blocks of 64 x 32 int8 outputs: 16 KB of weight, L1 with the sums)

__attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))) void item_i8(
    const uint8_t* xp, const Geometry& g, const int8_t* w, int64_t bs, const int64_t* col, int64_t p0, int64_t p1,
    int64_t n, int64_t oh0, int nrows, int64_t ow0, int64_t np, int64_t o0, int og, const I8Out& out,
    TileConfig& cur, char (*stage)[16 * 256]) {
  const int r0 = static_cast<int>(np < 16 ? np : 16), r1 = static_cast<int>(np - r0);
  const int64_t kbytes = bs < 64 ? bs : 64;  // 64 inputs per tile multiply
  alignas(64) int32_t acc[kRows * 4 * 256];
  configure(cur, r0, r1, static_cast<int>(kbytes));
  for (int64_t pk = p0; pk < p1 || pk == p0; pk += kStretch) {
    const int64_t pe = pk + kStretch < p1 ? pk + kStretch : p1;
    for (int j = 0; j < nrows; ++j) {
      int32_t* aj = acc + j * 4 * 256;
      if (pk == p0) {
        zero_sums();
      } else {
        for (int gr = 0; gr < (r1 ? 2 : 1); ++gr)
          for (int h = 0; h < og; ++h) load_sums(gr, h, aj + (2 * gr + h) * 256);
      }
      for (int64_t p = pk; p < pe; ++p) {
        const char* a[2];
        int64_t as[2];  // (the padded input: always in place)
        if (!a_groups(xp, g, col[p] / g.ncb, (col[p] % g.ncb) * bs, n, oh0 + j, ow0, r0, r1, bs, stage, a, as))
          continue;
        const int8_t* wb = w + p * bs * bs + (o0 % bs) * 4;
        block_products<true>(a[0], as[0], a[1], as[1], reinterpret_cast<const char*>(wb), bs * 4, bs, kbytes, r1, og);
      }
      for (int gr = 0; gr < (r1 ? 2 : 1); ++gr)
        for (int h = 0; h < og; ++h) store_sums(gr, h, aj + (2 * gr + h) * 256);
    }
  }
  const float s = out.scale[n];
  for (int j = 0; j < nrows; ++j) {
    const int64_t m0 = (n * g.oh + oh0 + j) * g.ow + ow0;
    for (int gr = 0; gr < (r1 ? 2 : 1); ++gr)
      for (int h = 0; h < og; ++h)  // (comp is per output)
        store_i8(acc + j * 4 * 256 + (2 * gr + h) * 256, gr ? r1 : r0, o0 + 16 * h, o0 + 16 * h, s, out,
                 m0 + 16 * gr);
  }
}

// Every item of a conv call, on each thread's own tiles and staging buffer: f(cur, stage, image, oh0, nrows, ow0, np,
// r, o0, og) for the pixels [ow0, ow0 + np) (np <= 32) of output rows oh0 .. oh0 + nrows - 1 (nrows <= `group`), block
// row r, outputs [o0, o0 + 16 * og). Consecutive items: the same pixels, the next outputs. Before a thread's first
// item of a group of output rows: rows(image, oh0, nrows), where the caller may look at the input rows they read (a
// thread's groups come in order).
template <typename F, typename R>
void for_items(int64_t n, int64_t oh, int64_t ow, int64_t nbr, int64_t bs, int64_t nout, int nthreads, int group,
               F&& f, R&& rows) {
  const int og = bs >= 32 ? 2 : 1;                // output groups of 16 per item
  const int64_t passes = bs / (16 * og);          // items per block row and pixel chunk
  const int64_t chunks_per_row = (ow + 31) / 32;  // pixel chunks of 32 (two groups of 16) per output row
  const int64_t groups = (oh + group - 1) / group;
  const int64_t items = n * groups * chunks_per_row * nbr * passes;
#pragma omp parallel num_threads(nthreads)
  {
    TileConfig cur;
    std::memset(&cur, 0, sizeof(cur));
    alignas(64) char stage[2][16 * 256];  // (two pixel groups of 16 rows of up to 128 bf16 inputs)
    int64_t last = -1;
    std::decay_t<R> on_rows = rows;  // (the thread's own copy: it may keep state)
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      int64_t rest = it;
      const int64_t q = rest % passes;
      rest /= passes;
      const int64_t r = rest % nbr;
      rest /= nbr;
      const int64_t ch = rest % chunks_per_row, gi = rest / chunks_per_row;  // (gi: image * groups + group)
      const int64_t img = gi / groups, oh0 = (gi % groups) * group;
      const int nrows = static_cast<int>(oh - oh0 < group ? oh - oh0 : group);
      if (gi != last) on_rows(img, oh0, nrows), last = gi;
      const int64_t ow0 = ch * 32, np = ow - ow0 < 32 ? ow - ow0 : 32;
      const int64_t o0 = r * bs + q * 16 * og;
      if (o0 < nout) f(cur, stage, img, oh0, nrows, ow0, np, r, o0, og);
    }
    if (cur.palette_id) accel_amx::release();
  }
}

// The entry points' argument check: 1 for a block size the kernels lack, 2 for a refused geometry, else 0.
int refuse(int64_t n, int64_t c, int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t oh, int64_t ow,
           int64_t nbr, int64_t bs, int64_t ldy, int64_t nout, int nthreads) {
  if (bs != 16 && bs != 32 && bs != 64 && bs != 128) return 1;
  if (c % bs || n < 0 || oh < 0 || ow < 0 || kw < 1 || sh < 1 || sw < 1 || dh < 1 || dw < 1 || nout > nbr * bs ||
      ldy < nout || nthreads < 1)
    return 2;
  return 0;
}

}  // namespace

// Ask Linux for the AMX tile state (once per process; oneDNN asks the same). 0: granted.
extern "C" int accel_amx_init() { return accel_amx::request_tiles(); }

// x: NHWC bf16 [n, h, w, c] (contiguous), zero padding ph, pw around each image (not stored), kh x kw taps; y: bf16
// [n*oh*ow, ldy]. nonfinite (or null): set to 1 when an input row spanned by the windows (from an output row's first
// tap row to its last, whole rows) holds a NaN or an inf (each thread scans the rows of its output rows just before
// reading them: the sparse conv's check, and a prefetch of rows the tile loads read a few channels of), else left.
// Returns 0, or a code for refused arguments.
extern "C" int accel_bsr_conv_amx(const void* x, int64_t n, int64_t h, int64_t w, int64_t c, int64_t kh, int64_t kw,
                                  int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t oh,
                                  int64_t ow, const void* wpack, const int64_t* crow, const int64_t* col, int64_t nbr,
                                  int64_t bs, const float* bias, void* y, int64_t ldy, int64_t nout, int* nonfinite,
                                  int nthreads) {
  const int refused = refuse(n, c, kw, sh, sw, dh, dw, oh, ow, nbr, bs, ldy, nout, nthreads);
  if (refused) return refused;
  if (ph < 0 || pw < 0 || h < 0 || w < 0 || kh < 1) return 2;
  if (n == 0 || oh == 0 || ow == 0 || nbr == 0) return 0;
  const Geometry g{h, w, c, ph, pw, oh, ow, sh, sw, dh, dw, kw, c / bs, crow[nbr], n * oh == 1};
  const uint16_t* x16 = static_cast<const uint16_t*>(x);
  const uint16_t* w16 = static_cast<const uint16_t*>(wpack);
  uint16_t* y16 = static_cast<uint16_t*>(y);
  int found = 0;
  for_items(
      n, oh, ow, nbr, bs, nout, nthreads, 1,
      [&](TileConfig& cur, char(*stage)[16 * 256], int64_t img, int64_t orow, int, int64_t ow0, int64_t np, int64_t r,
          int64_t o0, int og) {
        item(x16, g, w16, bs, col, crow[r], crow[r + 1], img, orow, ow0, np, o0, og, bias, y16, ldy, nout, cur, stage);
      },
      [&, next = int64_t{-1}](int64_t img, int64_t orow, int) mutable {  // (a copy per thread: next is its own)
        if (!nonfinite) return;
        const int64_t lo = orow * sh - ph, hi = lo + (kh - 1) * dh;  // the input rows of this output row's windows
        for (int64_t ih = lo < 0 ? 0 : lo; ih <= hi && ih < h; ++ih) {
          const int64_t at = img * h + ih;  // (rows of earlier output rows scanned already)
          if (at < next) continue;
          if (accel_rows::row_nonfinite(reinterpret_cast<const char*>(x16 + at * w * c), 1, w * c))
            __atomic_store_n(&found, 1, __ATOMIC_RELAXED);
          next = at + 1;
        }
      });
  if (nonfinite && found) *nonfinite = 1;
  return 0;
}

// accel's int8 conv on tiles. xp: the padded per-image-quantized input NHWC uint8 [n, hp, wp, c] (padding 128);
// w: int8 blocks [nnz][B/4][B][4] of W [O, KH*KW*C]; comp [nbr * B]; scale [n]; y [n*oh*ow, ldy] fp32, or bf16 with
// y_bf16; with y_nchw, y [n, ldy, oh, ow] instead (NCHW: no copy of a channels_last result for an NCHW layer).
extern "C" int accel_int8_conv_amx(const uint8_t* xp, int64_t n, int64_t hp, int64_t wp, int64_t c, int64_t kw,
                                   int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t oh, int64_t ow,
                                   const int8_t* w, const int64_t* crow, const int64_t* col, int64_t nbr, int64_t bs,
                                   const int32_t* comp, const float* scale, const float* wscale, const float* bias,
                                   void* y, int y_bf16, int64_t ldy, int64_t nout, int y_nchw, int nthreads) {
  const int refused = refuse(n, c, kw, sh, sw, dh, dw, oh, ow, nbr, bs, ldy, nout, nthreads);
  if (refused) return refused;
  if (y_nchw != 0 && y_nchw != 1) return 2;
  if (n == 0 || oh == 0 || ow == 0 || nbr == 0) return 0;
  const Geometry g{hp, wp, c, 0, 0, oh, ow, sh, sw, dh, dw, kw, c / bs, crow[nbr], false};  // (padding in xp)
  const I8Out out{scale, wscale, bias, comp, y, ldy, nout, y_bf16 != 0, y_nchw, oh * ow};
  for_items(
      n, oh, ow, nbr, bs, nout, nthreads, kRows,
      [&](TileConfig& cur, char(*stage)[16 * 256], int64_t img, int64_t oh0, int nrows, int64_t ow0, int64_t np,
          int64_t r, int64_t o0, int og) {
        item_i8(xp, g, w, bs, col, crow[r], crow[r + 1], img, oh0, nrows, ow0, np, o0, og, out, cur, stage);
      },
      [](int64_t, int64_t, int) {});
  return 0;
}
