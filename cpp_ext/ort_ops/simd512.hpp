// AVX-512 helpers shared by the bfloat16 product files (amx_bf16.cpp, avx512_bf16.cpp), which are
// compiled with AVX-512 enabled; include only from such files.
#pragma once

#include <immintrin.h>

#include <cstddef>
#include <cstdint>

namespace edgetune {

// The 16 x 16 transpose of 32-bit elements, r[i] a row in, r[i] a column out.
static inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// Rows [0, 16) of x (float32, row stride K; rows from `rows` on read as zero) rounded to bfloat16
// (nearest even) into B tiles for pairs of k: out[kb][16 pairs][16 rows][2], KB = ceil(K / 32)
// tiles of 512 values, zero past K. Built from 32 values per row at a time by a 16 x 16 transpose of
// the (k, k + 1) pairs.
static inline void interleave_rows16(const float* x, size_t rows, size_t K, uint16_t* out) {
  const size_t KB = (K + 31) / 32;
  for (size_t kb = 0; kb < KB; ++kb) {
    const size_t k0 = kb * 32, left = K - k0;
    const __mmask16 lo = left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1);
    const __mmask16 hi = left >= 32 ? 0xffff : left <= 16 ? 0 : static_cast<__mmask16>((1u << (left - 16)) - 1);
    __m512i r[16];
    for (size_t c = 0; c < 16; ++c) {
      if (c < rows) {
        const float* src = x + c * K + k0;
        r[c] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, src + 16), _mm512_maskz_loadu_ps(lo, src));
      } else {
        r[c] = _mm512_setzero_si512();
      }
    }
    transpose16(r);
    uint16_t* t = out + kb * 512;
    for (size_t kp = 0; kp < 16; ++kp) _mm512_storeu_si512(t + kp * 32, r[kp]);
  }
}

}  // namespace edgetune
