// Attention with bfloat16 products (AttentionTBF16 and AttentionTBF16Grad, ops.cpp), for bundles
// exported with `--compute bf16`: the seven products of the forward and backward passes (scores,
// probabilities times values, and the five of the gradients) take bfloat16 operands, rounded to
// nearest even, and sum in float32; the mask, the softmax, the row sums and every output stay
// float32. Included after kernels.hpp (which names the namespace, the register width, BR and JT) by
// attn_bf16.cpp, built with AVX512-BF16 (vdpbf16ps: 16 pairs of bfloat16 products into 16 float32
// sums per instruction), and by attn_bf16_generic.cpp, the same sums in plain C++ for CPUs without it.
//
// Layouts (Dp: D rounded up to 32, zero-padded; ld: S rounded up to JT, zero-padded):
// - key panels (k for the scores, v for the gradient of the probabilities): JT keys per panel, at
//   t * JT * Dp; each panel two halves of VW keys (at + h * VW * Dp), each half Dp / 2 pairs of
//   dimensions (at + p * 2 * VW), each key's pair at + 2 c: one vector per half and pair;
// - row pairs (v for the output, k for the gradient of q, and a block's rows of q and dout for the
//   gradients of k and v): rows 2 i and 2 i + 1 interleaved by column, pair i at i * 2 * Dp, column d
//   at + 2 d (+ 1 for the odd row).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define EDGETUNE_ATTN_BF16_SIMD 1
#include <immintrin.h>

#include "simd512.hpp"
#endif

namespace edgetune {
namespace EDGETUNE_ISA_NS {

inline uint16_t bf16_round(float f) {  // nearest even; NaN stays NaN (as _mm512_cvtneps_pbh)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float bf16_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline size_t attn_bf16_dp(size_t D) { return (D + 31) / 32 * 32; }

#if defined(EDGETUNE_ATTN_BF16_SIMD)
// The lanes of the 16 columns from d that lie below D.
inline __mmask16 cols_mask(size_t d, size_t D) {
  return d >= D ? 0 : D - d >= 16 ? 0xffff : static_cast<__mmask16>((1u << (D - d)) - 1);
}
#endif

// n floats times f rounded to bfloat16, then zeros up to m.
inline void round_row(const float* x, size_t n, size_t m, uint16_t* out, float f = 1.0f) {
  size_t i = 0;
#if defined(EDGETUNE_ATTN_BF16_SIMD)
  const __m512 fv = _mm512_set1_ps(f);
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(x + i), fv)));
  if (i < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), fv);
    _mm256_mask_storeu_epi16(out + i, k, (__m256i)_mm512_cvtneps_pbh(v));
    i = n;
  }
#endif
  for (; i < n; ++i) out[i] = bf16_round(x[i] * f);
  if (m > n) std::memset(out + n, 0, (m - n) * sizeof(uint16_t));
}

// x [S, D] (rows D floats apart) as key panels of ld keys.
inline void attn_bf16_panels(const float* x, size_t S, size_t D, size_t ld, uint16_t* out) {
  const size_t Dp = attn_bf16_dp(D);
  for (size_t j0 = 0; j0 < ld; j0 += VW) {
    uint16_t* half = out + j0 * Dp;
    const size_t n = S > j0 ? (S - j0 < VW ? S - j0 : VW) : 0;
#if defined(EDGETUNE_ATTN_BF16_SIMD)
    if (VW == 16) {  // 16 keys by 16 pairs at a time (simd512.hpp)
      interleave_rows16(x + j0 * D, n, D, half);
      continue;
    }
#endif
    for (size_t c = 0; c < VW; ++c)
      for (size_t d = 0; d < Dp; ++d)
        half[(d / 2) * 2 * VW + 2 * c + (d & 1)] = c < n && d < D ? bf16_round(x[(j0 + c) * D + d]) : 0;
  }
}

// rows of x (D floats each, `stride` apart; zero from row n on) as row pairs, `total` rows (even).
inline void attn_bf16_row_pairs(const float* x, size_t n, size_t stride, size_t D, size_t total, uint16_t* out) {
  const size_t Dp = attn_bf16_dp(D);
  for (size_t j = 0; j < total; j += 2) {
    uint16_t* o = out + j * Dp;
    const float* r0 = j < n ? x + j * stride : nullptr;
    const float* r1 = j + 1 < n ? x + (j + 1) * stride : nullptr;
    size_t d = 0;
#if defined(EDGETUNE_ATTN_BF16_SIMD)
    // even positions from the first row, odd from the second
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (; d < Dp; d += 16) {
      const __mmask16 k = cols_mask(d, D);
      const __m512 a = r0 ? _mm512_maskz_loadu_ps(k, r0 + d) : _mm512_setzero_ps();
      const __m512 b = r1 ? _mm512_maskz_loadu_ps(k, r1 + d) : _mm512_setzero_ps();
      _mm512_storeu_si512(o + 2 * d, _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(b, a)));
    }
#endif
    for (; d < Dp; ++d) {
      o[2 * d] = r0 && d < D ? bf16_round(r0[d]) : 0;
      o[2 * d + 1] = r1 && d < D ? bf16_round(r1[d]) : 0;
    }
  }
}

// The block product both score and output products are made of, over P pairs: acc[r][c] = sum_p
// a[r][p] . b[p][c] for r < BR, c < JT (a pair of each, multiplied and summed as vdpbf16ps does,
// the odd product first). Row r's pair p at a + r * lda + 2 p; column c's pair p at b0 + p * bs + 2 c
// for c < VW, and at b1 + p * bs + 2 (c - VW) for the rest.
#if defined(EDGETUNE_ATTN_BF16_SIMD)
inline void pairs_block(const uint16_t* a, size_t lda, const uint16_t* b0, const uint16_t* b1, size_t bs, size_t P,
                        __m512 (&acc)[BR][2]) {
  for (size_t r = 0; r < BR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (size_t p = 0; p < P; ++p) {
    const __m512bh x0 = (__m512bh)_mm512_loadu_si512(b0 + p * bs), x1 = (__m512bh)_mm512_loadu_si512(b1 + p * bs);
#pragma GCC unroll 8
    for (size_t r = 0; r < BR; ++r) {
      int32_t w;
      std::memcpy(&w, a + r * lda + 2 * p, 4);
      const __m512bh y = (__m512bh)_mm512_set1_epi32(w);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], y, x0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], y, x1);
    }
  }
}
#endif
inline void pairs_block(const uint16_t* a, size_t lda, const uint16_t* b0, const uint16_t* b1, size_t bs, size_t P,
                        float (&acc)[BR][JT]) {
  for (size_t r = 0; r < BR; ++r)
    for (size_t c = 0; c < JT; ++c) {
      const uint16_t* b = c < VW ? b0 + 2 * c : b1 + 2 * (c - VW);
      float sum = 0.0f;
      for (size_t p = 0; p < P; ++p) {
        sum += bf16_float(a[r * lda + 2 * p + 1]) * bf16_float(b[p * bs + 1]);
        sum += bf16_float(a[r * lda + 2 * p]) * bf16_float(b[p * bs]);
      }
      acc[r][c] = sum;
    }
}

#if defined(EDGETUNE_ATTN_BF16_SIMD)
// pairs_block for the first VW columns only (acc[r] for c < VW).
inline void pairs_half(const uint16_t* a, size_t lda, const uint16_t* b0, size_t bs, size_t P, __m512 (&acc)[BR]) {
  for (size_t r = 0; r < BR; ++r) acc[r] = _mm512_setzero_ps();
  for (size_t p = 0; p < P; ++p) {
    const __m512bh x0 = (__m512bh)_mm512_loadu_si512(b0 + p * bs);
#pragma GCC unroll 8
    for (size_t r = 0; r < BR; ++r) {
      int32_t w;
      std::memcpy(&w, a + r * lda + 2 * p, 4);
      acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(w), x0);
    }
  }
}
#endif

// out[r][j] = scale * sum_d a[r][d] b[j][d] for r < BR and j < jn (a multiple of VW): a BR rows of Dp
// bfloat16 values, b the key panels from its first key on (a multiple of VW: the panels' halves follow
// one another, so a tile may start at either half). Where fewer than JT keys are left, the last VW
// are one half tile.
inline void block_scores16(const uint16_t* a, size_t Dp, const uint16_t* bt, float* out, size_t ldo, size_t jn,
                           float scale) {
  for (size_t jt = 0; jt < jn; jt += JT) {
    const uint16_t* h0 = bt + jt * Dp;
    const bool half = jn - jt < JT;
#if defined(EDGETUNE_ATTN_BF16_SIMD)
    if (VW == 16) {
      const __m512 sc = _mm512_set1_ps(scale);
      if (half) {
        __m512 acc[BR];
        pairs_half(a, Dp, h0, 2 * VW, Dp / 2, acc);
        for (size_t r = 0; r < BR; ++r) _mm512_storeu_ps(out + r * ldo + jt, _mm512_mul_ps(acc[r], sc));
        continue;
      }
      __m512 acc[BR][2];
      pairs_block(a, Dp, h0, h0 + VW * Dp, 2 * VW, Dp / 2, acc);
      for (size_t r = 0; r < BR; ++r) {
        _mm512_storeu_ps(out + r * ldo + jt, _mm512_mul_ps(acc[r][0], sc));
        _mm512_storeu_ps(out + r * ldo + jt + 16, _mm512_mul_ps(acc[r][1], sc));
      }
      continue;
    }
#endif
    float acc[BR][JT];  // (a half tile's second half sums its first half again, not stored)
    pairs_block(a, Dp, h0, half ? h0 : h0 + VW * Dp, 2 * VW, Dp / 2, acc);
    for (size_t r = 0; r < BR; ++r)
      for (size_t c = 0; c < (half ? VW : JT); ++c) out[r * ldo + jt + c] = acc[r][c] * scale;
  }
}

// out[r][:D] = sum_{j < 2 np} w[r][j] x[j][:] for r < nr: w BR rows of bfloat16 values (ldw apart,
// from an even key), x in row pairs from the same key; out's rows ldout floats apart.
inline void block_pv16(const uint16_t* w, size_t ldw, const uint16_t* x, size_t np, size_t Dp, size_t D, float* out,
                       size_t ldout, size_t nr) {
  for (size_t d0 = 0; d0 < Dp; d0 += 2 * VW) {
    const uint16_t* x0 = x + 2 * d0;
#if defined(EDGETUNE_ATTN_BF16_SIMD)
    if (VW == 16) {
      __m512 acc[BR][2];
      pairs_block(w, ldw, x0, x0 + 2 * VW, 2 * Dp, np, acc);
      const __mmask16 m0 = cols_mask(d0, D), m1 = cols_mask(d0 + 16, D);
      // every row's index a constant (a loop to nr would keep the sums in memory, not registers)
#pragma GCC unroll 8
      for (size_t r = 0; r < BR; ++r)
        if (r < nr) {
          _mm512_mask_storeu_ps(out + r * ldout + d0, m0, acc[r][0]);
          _mm512_mask_storeu_ps(out + r * ldout + d0 + 16, m1, acc[r][1]);
        }
      continue;
    }
#endif
    float acc[BR][JT];
    pairs_block(w, ldw, x0, x0 + 2 * VW, 2 * Dp, np, acc);
    for (size_t r = 0; r < nr; ++r)
      for (size_t c = 0; c < JT && d0 + c < D; ++c) out[r * ldout + d0 + c] = acc[r][c];
  }
}

// y[j][:D] += sum_{r < BR} wt[j][r] a[r][:] for j < nj: wt the keys' BR values each (bfloat16, key
// after key), a the block's BR rows in row pairs; y's rows D floats apart.
inline void block_outer16(const uint16_t* wt, const uint16_t* a, size_t nj, size_t Dp, size_t D, float* y) {
  constexpr size_t RP = BR / 2;
  for (size_t d0 = 0; d0 < Dp; d0 += 2 * VW) {
#if defined(EDGETUNE_ATTN_BF16_SIMD)
    if (VW == 16) {
      __m512bh b[RP][2];
      for (size_t i = 0; i < RP; ++i) {
        b[i][0] = (__m512bh)_mm512_loadu_si512(a + i * 2 * Dp + 2 * d0);
        b[i][1] = (__m512bh)_mm512_loadu_si512(a + i * 2 * Dp + 2 * d0 + 32);
      }
      const __mmask16 m0 = cols_mask(d0, D), m1 = cols_mask(d0 + 16, D);
      // 8 keys at a time: 16 independent sums, each RP vdpbf16ps long
      constexpr size_t U = 8;
      size_t j = 0;
      for (; j + U <= nj; j += U) {
        __m512 acc[U][2];
        for (size_t u = 0; u < U; ++u) {
          acc[u][0] = _mm512_maskz_loadu_ps(m0, y + (j + u) * D + d0);
          acc[u][1] = _mm512_maskz_loadu_ps(m1, y + (j + u) * D + d0 + 16);
        }
#pragma GCC unroll 4
        for (size_t i = 0; i < RP; ++i)
#pragma GCC unroll 8
          for (size_t u = 0; u < U; ++u) {
            int32_t v;
            std::memcpy(&v, wt + (j + u) * BR + 2 * i, 4);
            const __m512bh x = (__m512bh)_mm512_set1_epi32(v);
            acc[u][0] = _mm512_dpbf16_ps(acc[u][0], x, b[i][0]);
            acc[u][1] = _mm512_dpbf16_ps(acc[u][1], x, b[i][1]);
          }
        for (size_t u = 0; u < U; ++u) {
          _mm512_mask_storeu_ps(y + (j + u) * D + d0, m0, acc[u][0]);
          _mm512_mask_storeu_ps(y + (j + u) * D + d0 + 16, m1, acc[u][1]);
        }
      }
      for (; j < nj; ++j) {
        __m512 a0 = _mm512_maskz_loadu_ps(m0, y + j * D + d0), a1 = _mm512_maskz_loadu_ps(m1, y + j * D + d0 + 16);
        for (size_t i = 0; i < RP; ++i) {
          int32_t v;
          std::memcpy(&v, wt + j * BR + 2 * i, 4);
          const __m512bh x = (__m512bh)_mm512_set1_epi32(v);
          a0 = _mm512_dpbf16_ps(a0, x, b[i][0]);
          a1 = _mm512_dpbf16_ps(a1, x, b[i][1]);
        }
        _mm512_mask_storeu_ps(y + j * D + d0, m0, a0);
        _mm512_mask_storeu_ps(y + j * D + d0 + 16, m1, a1);
      }
      continue;
    }
#endif
    for (size_t j = 0; j < nj; ++j)
      for (size_t d = d0; d < d0 + 2 * VW && d < D; ++d) {
        float acc = y[j * D + d];
        for (size_t i = 0; i < RP; ++i) {
          acc += bf16_float(wt[j * BR + 2 * i + 1]) * bf16_float(a[i * 2 * Dp + 2 * d + 1]);
          acc += bf16_float(wt[j * BR + 2 * i]) * bf16_float(a[i * 2 * Dp + 2 * d]);
        }
        y[j * D + d] = acc;
      }
  }
}

// Keys [a0, a1) of BR rows of w (ld floats apart) rounded to bfloat16, key after key (BR values each).
inline void keys_major16(const float* w, size_t ld, size_t a0, size_t a1, uint16_t* out) {
  size_t j = a0;
#if defined(EDGETUNE_ATTN_BF16_SIMD)
  if (BR == 8) {
    // 16 keys at a time: rows 2i and 2i + 1 rounded and interleaved (a pair per key), then the 4 x 16
    // pairs transposed to 16 x 4, keys in order
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (; j + 16 <= a1; j += 16) {
      __m512i v[4];
      for (size_t i = 0; i < 4; ++i)
        v[i] = _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(w + (2 * i + 1) * ld + j),
                                                                          _mm512_loadu_ps(w + 2 * i * ld + j)));
      const __m512i l01 = _mm512_unpacklo_epi32(v[0], v[1]), h01 = _mm512_unpackhi_epi32(v[0], v[1]);
      const __m512i l23 = _mm512_unpacklo_epi32(v[2], v[3]), h23 = _mm512_unpackhi_epi32(v[2], v[3]);
      // t[k], lane L: key 4 L + k
      const __m512i t0 = _mm512_unpacklo_epi64(l01, l23), t1 = _mm512_unpackhi_epi64(l01, l23);
      const __m512i t2 = _mm512_unpacklo_epi64(h01, h23), t3 = _mm512_unpackhi_epi64(h01, h23);
      const __m512i u0 = _mm512_shuffle_i32x4(t0, t1, 0x44), u1 = _mm512_shuffle_i32x4(t2, t3, 0x44);
      const __m512i u2 = _mm512_shuffle_i32x4(t0, t1, 0xee), u3 = _mm512_shuffle_i32x4(t2, t3, 0xee);
      uint16_t* o = out + (j - a0) * 8;
      _mm512_storeu_si512(o, _mm512_shuffle_i32x4(u0, u1, 0x88));
      _mm512_storeu_si512(o + 32, _mm512_shuffle_i32x4(u0, u1, 0xdd));
      _mm512_storeu_si512(o + 64, _mm512_shuffle_i32x4(u2, u3, 0x88));
      _mm512_storeu_si512(o + 96, _mm512_shuffle_i32x4(u2, u3, 0xdd));
    }
  }
#endif
  for (; j < a1; ++j)
    for (size_t r = 0; r < BR; ++r) out[(j - a0) * BR + r] = bf16_round(w[r * ld + j]);
}

// The cache lines of rows [i, i + BR) of x (D floats each, `stride` apart, up to row end), fetched
// while a block is computed: the next block's rows of q (and dout), whose first loads otherwise stall.
inline void prefetch_rows(const float* x, size_t i, size_t end, size_t stride, size_t D) {
  for (size_t r = i; r < i + BR && r < end; ++r)
#if defined(__GNUC__)
    for (size_t d = 0; d < D; d += 16) __builtin_prefetch(x + r * stride + d);
#else
    (void)x, (void)stride, (void)D;
#endif
}

// Floats of work for one call: forward (p, its bfloat16 copy, a block of q) or backward (p, ds, ds
// rounded, p and ds key after key, a block's rows and their pairs).
inline size_t attn_bf16_work(size_t ld, size_t D, bool backward) {
  const size_t Dp = attn_bf16_dp(D);
  return backward ? 2 * BR * ld + 3 * BR * ld / 2 + BR * Dp : BR * ld + BR * ld / 2 + BR * Dp / 2;
}

// attn_forward (kernels.hpp) with bfloat16 products: kt the key panels, vp v in row pairs (both of
// ld keys, from the first).
inline void attn_bf16_forward(const float* q, const uint16_t* kt, const uint16_t* vp, size_t ld, const float* mask,
                              size_t mstride, const uint32_t* ext, size_t r0, size_t r1, float* o, size_t ldo,
                              size_t S, size_t D, float scale, float* work) {
  const size_t Dp = attn_bf16_dp(D);
  float* p = work;
  uint16_t* p16 = reinterpret_cast<uint16_t*>(work + BR * ld);
  uint16_t* q16 = p16 + BR * ld;
  for (size_t i0 = r0; i0 < r1; i0 += BR) {
    const QueryBlock blk = query_block(ext, i0, r1, S, VW);  // keys in half tiles
    const size_t nr = blk.nr, jn = blk.jn, j0 = blk.j0, lim = blk.lim;
    for (size_t r = 0; r < BR; ++r) round_row(q + (i0 + r) * D, r < nr ? D : 0, Dp, q16 + r * Dp);
    prefetch_rows(q, i0 + BR, r1, D, D);
    block_scores16(q16, Dp, kt + j0 * Dp, p + j0, ld, jn - j0, scale);
    // the weights normalized as they are rounded
    float inv[BR];
    block_softmax(p, ld, mask + i0 * mstride, mstride, nr, j0, lim, S, inv);
    const size_t je = (lim + 1) / 2 * 2;  // whole pairs of keys (v's pairs are zero past S)
    for (size_t r = 0; r < BR; ++r) round_row(p + r * ld + j0, lim - j0, je - j0, p16 + r * ld + j0, inv[r]);
    block_pv16(p16 + j0, ld, vp + j0 * Dp, (je - j0) / 2, Dp, D, o + i0 * ldo, ldo, nr);
  }
}

// attn_backward (kernels.hpp) with bfloat16 products: kt and vt k and v as key panels, kp k in row
// pairs. dq's rows D floats apart, as q's.
inline void attn_bf16_backward(const float* dout, size_t lddo, const float* q, const uint16_t* kt,
                               const uint16_t* vt, const uint16_t* kp, size_t ld, const float* mask, size_t mstride,
                               const uint32_t* ext, size_t r0, size_t r1, float* dq, float* dk, float* dv, size_t S,
                               size_t D, float scale, float* work) {
  const size_t Dp = attn_bf16_dp(D);
  float* p = work;
  float* dp = work + BR * ld;
  uint16_t* ds16 = reinterpret_cast<uint16_t*>(work + 2 * BR * ld);
  uint16_t* pt = ds16 + BR * ld;  // key after key
  uint16_t* dst = pt + BR * ld;
  uint16_t* a16 = dst + BR * ld;  // a block's rows of q, then of dout
  uint16_t* ai = a16 + BR * Dp;   // the same rows in pairs
  for (size_t i0 = r0; i0 < r1; i0 += BR) {
    const QueryBlock blk = query_block(ext, i0, r1, S, VW);  // keys in half tiles
    const size_t nr = blk.nr, jn = blk.jn, j0 = blk.j0, lim = blk.lim;
    const bool none = blk.none;
    for (size_t r = 0; r < BR; ++r) round_row(q + (i0 + r) * D, r < nr ? D : 0, Dp, a16 + r * Dp);
    prefetch_rows(q, i0 + BR, r1, D, D);
    prefetch_rows(dout, i0 + BR, r1, lddo, D);
    block_scores16(a16, Dp, kt + j0 * Dp, p + j0, ld, jn - j0, scale);
    for (size_t r = 0; r < BR; ++r) round_row(dout + (i0 + r) * lddo, r < nr ? D : 0, Dp, a16 + r * Dp);
    block_scores16(a16, Dp, vt + j0 * Dp, dp + j0, ld, (none ? (S + JT - 1) / JT * JT : jn) - j0, 1.0f);
    const size_t upto = none ? S : lim;
    block_softmax_grad(p, dp, ld, mask + i0 * mstride, mstride, nr, j0, lim, upto, S, scale);
    size_t a0, a1;
    block_keys(ext + 2 * i0, nr, none, S, &a0, &a1);
    const size_t nj = a1 - a0;
    // dv[j] += sum_r p[r][j] do[r]; dk[j] += sum_r ds[r][j] q[r]
    keys_major16(p, ld, a0, a1, pt);
    keys_major16(dp, ld, a0, a1, dst);
    attn_bf16_row_pairs(dout + i0 * lddo, nr, lddo, D, BR, ai);
    block_outer16(pt, ai, nj, Dp, D, dv + a0 * D);
    attn_bf16_row_pairs(q + i0 * D, nr, D, D, BR, ai);
    block_outer16(dst, ai, nj, Dp, D, dk + a0 * D);
    // dq[r] = sum_j ds[r][j] k[j], over whole pairs of keys (ds is zero outside [a0, a1))
    const size_t e0 = a0 / 2 * 2, e1 = (a1 + 1) / 2 * 2;
    for (size_t r = 0; r < BR; ++r) {
      const size_t have = (upto < e1 ? upto : e1) > e0 ? (upto < e1 ? upto : e1) - e0 : 0;
      round_row(dp + r * ld + e0, have, e1 - e0, ds16 + r * ld + e0);
    }
    block_pv16(ds16 + e0, ld, kp + e0 * Dp, (e1 - e0) / 2, Dp, D, dq + i0 * D, D, nr);
  }
}

// This build's table (fused.hpp).
inline AttnBF16Kernels attn_bf16_kernels(const char* name) {
  return {name, JT, BR, attn_bf16_dp, attn_bf16_panels, attn_bf16_row_pairs, attn_bf16_work, attn_bf16_forward,
          attn_bf16_backward};
}

}  // namespace EDGETUNE_ISA_NS
}  // namespace edgetune
