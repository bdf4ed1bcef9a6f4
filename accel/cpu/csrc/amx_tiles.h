// The tile layout the AMX kernels share (bsr_amx.cpp: bf16 and int8 conv; int8_bsr_vnni.cpp: int8 Linear), and one
// stored block's tile multiplies.
//
// Tiles: A tmm0, tmm1 (two groups of up to 16 rows: pixels or tokens), B tmm2, tmm3 (two groups of 16 outputs),
// C tmm4..7 (A group g times B group h in tmm 4 + 2g + h: 16 x 16 sums, fp32 for bf16, int32 for int8). A row of A
// holds `kbytes` input bytes per multiply (32 bf16 or 64 int8 inputs when full); a row of B holds 64 bytes: one
// pair of bf16 inputs or one quad of int8 inputs for 16 outputs.
#pragma once

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

namespace accel_amx {

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Ask Linux for the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA; once per process, oneDNN asks
// the same). 0: granted.
inline int request_tiles() { return static_cast<int>(syscall(SYS_arch_prctl, 0x1023, 18)); }

// The tiles for A groups of r0 and r1 rows (r1 may be 0) and multiplies of kbytes input bytes; loaded only when they
// change.
__attribute__((target("amx-tile"))) inline void configure(TileConfig& cur, int r0, int r1, int kbytes) {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  const int rows[2] = {r0, r1 ? r1 : 1};
  for (int g = 0; g < 2; ++g) {
    cfg.rows[g] = static_cast<uint8_t>(rows[g]);  // A: rows x kbytes
    cfg.colsb[g] = static_cast<uint16_t>(kbytes);
    cfg.rows[2 + g] = static_cast<uint8_t>(kbytes / 4);  // B: kbytes / 4 input pairs (bf16) or quads (int8)
    cfg.colsb[2 + g] = 64;
    for (int h = 0; h < 2; ++h) {  // C: rows x 16 sums
      cfg.rows[4 + 2 * g + h] = static_cast<uint8_t>(rows[g]);
      cfg.colsb[4 + 2 * g + h] = 64;
    }
  }
  if (std::memcmp(&cfg, &cur, sizeof(cfg)) != 0) {
    cur = cfg;
    _tile_loadconfig(&cur);
  }
}

// C += A . B over one stored block: `a0` the block's inputs in the first A row of group 0 (its rows `as0` bytes apart),
// `a1` / `as1` the same for group 1 (r1 rows; none when r1 = 0), `wb` the block's B rows for the item's first output
// group (`bstride` bytes apart, the second group 64 bytes on), `row_bytes` input bytes per A row (B times the element
// size), in multiplies of `kbytes`. og: output groups (1 or 2). I8: tdpbusd (uint8 x int8), else tdpbf16ps (bf16
// pairs).
template <bool I8>
__attribute__((target("amx-tile,amx-int8,amx-bf16"))) inline void block_products(const char* a0, int64_t as0,
                                                                                  const char* a1, int64_t as1,
                                                                                  const char* wb, int64_t bstride,
                                                                                  int64_t row_bytes, int64_t kbytes,
                                                                                  int r1, int og) {
  for (int64_t kb = 0; kb < row_bytes; kb += kbytes) {
    const char* b = wb + kb / 4 * bstride;  // (kb input bytes: kb / 4 rows of B)
    _tile_loadd(0, a0 + kb, as0);
    if (r1) _tile_loadd(1, a1 + kb, as1);
    _tile_loadd(2, b, bstride);
    if (og > 1) _tile_loadd(3, b + 64, bstride);
    if constexpr (I8) {
      _tile_dpbusd(4, 0, 2);
      if (og > 1) _tile_dpbusd(5, 0, 3);
      if (r1) {
        _tile_dpbusd(6, 1, 2);
        if (og > 1) _tile_dpbusd(7, 1, 3);
      }
    } else {
      _tile_dpbf16ps(4, 0, 2);
      if (og > 1) _tile_dpbf16ps(5, 0, 3);
      if (r1) {
        _tile_dpbf16ps(6, 1, 2);
        if (og > 1) _tile_dpbf16ps(7, 1, 3);
      }
    }
  }
}

__attribute__((target("amx-tile"))) inline void zero_sums() {
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
}

// C tile of A group g and output group h stored as 16 rows of 64 bytes at acc (tile numbers are immediates).
__attribute__((target("amx-tile"))) inline void store_sums(int g, int h, void* acc) {
  switch (2 * g + h) {
    case 0: _tile_stored(4, acc, 64); break;
    case 1: _tile_stored(5, acc, 64); break;
    case 2: _tile_stored(6, acc, 64); break;
    default: _tile_stored(7, acc, 64); break;
  }
}

// C tile of A group g and output group h loaded from 16 rows of 64 bytes at acc (partial sums kept in memory).
__attribute__((target("amx-tile"))) inline void load_sums(int g, int h, const void* acc) {
  switch (2 * g + h) {
    case 0: _tile_loadd(4, acc, 64); break;
    case 1: _tile_loadd(5, acc, 64); break;
    case 2: _tile_loadd(6, acc, 64); break;
    default: _tile_loadd(7, acc, 64); break;
  }
}

__attribute__((target("amx-tile"))) inline void release() { _tile_release(); }

}  // namespace accel_amx
