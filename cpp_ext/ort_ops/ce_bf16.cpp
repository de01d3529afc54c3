// The vocabulary loss against a bfloat16 projection (CrossEntropyHeadBF16, ops.cpp) with
// AVX512-BF16's vdpbf16ps, on CPUs that have it (with or without AMX). Built with -mavx512bf16
// (CMakeLists.txt) on x86 only; elsewhere ops.cpp computes the same loss in float32 from a float32
// copy of the weight.
//
// ce_head (kernels.hpp) in bfloat16: the rows of h are rounded to bfloat16 and interleaved by pairs
// of k once per call (the B panels of avx512_bf16.cpp); the vocabulary comes in tiles of 128
// entries, read as stored. Per tile:
// - scores, 8 entries x 32 rows at a time: each entry's (k, k + 1) pair is broadcast from the
//   weight's row, two vectors of h's pairs are loaded, 16 vdpbf16ps;
// - the online softmax by rows, 16 rows per register (kernels.hpp's exp), which also writes the
//   tile's softmax weights in bfloat16, interleaved by pairs of entries;
// - G += P w: the tile's weight rows interleaved by pairs of entries (two rows per vpermt2w), then
//   8 rows of G x 32 columns at a time, the weights' pairs broadcast.
// Sums are float32 throughout; the products are those of the bfloat16 values, as PyTorch's
// bfloat16 autocast computes a language model head and its gradient.
#include "amx_bf16.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(EDGETUNE_X86) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define EDGETUNE_CE_BF16 1
#include <immintrin.h>

#include "simd512.hpp"
#define EDGETUNE_ISA_NS fused_isa_ce_bf16
#define EDGETUNE_VBYTES 64
#define EDGETUNE_BR 8
#include "kernels.hpp"
#endif

namespace edgetune {

#if defined(EDGETUNE_CE_BF16)

namespace {

constexpr size_t VT = 128;  // vocabulary entries per tile

// c[j][0, 32) for j < 8 (row stride ldc) = sum over pairs p < P of entry j's pair p (at w + j ldw +
// 2 p) times 32 columns' pair p (two panels, b and b + bs: pair p of column c at b[32 p + 2 c]).
inline void scores8x32(const uint16_t* w, size_t ldw, const uint16_t* b, size_t bs, size_t P, float* c, size_t ldc) {
  __m512 acc[8][2];
  for (int r = 0; r < 8; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const char* a0 = reinterpret_cast<const char*>(w);
  const size_t L = ldw * 2, L3 = 3 * L;
  const char* a4 = a0 + 4 * L;
  for (size_t p = 0; p < P; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + p * 32), b1 = (__m512bh)_mm512_loadu_si512(b + bs + p * 32);
    const size_t o = p * 4;
#define EDGETUNE_ROW(i, base, off)                                           \
  {                                                                          \
    int32_t v;                                                               \
    std::memcpy(&v, base + off + o, 4);                                      \
    const __m512bh x = (__m512bh)_mm512_set1_epi32(v);                       \
    acc[i][0] = _mm512_dpbf16_ps(acc[i][0], x, b0);                          \
    acc[i][1] = _mm512_dpbf16_ps(acc[i][1], x, b1);                          \
  }
    EDGETUNE_ROW(0, a0, 0) EDGETUNE_ROW(1, a0, L) EDGETUNE_ROW(2, a0, 2 * L) EDGETUNE_ROW(3, a0, L3)
    EDGETUNE_ROW(4, a4, 0) EDGETUNE_ROW(5, a4, L) EDGETUNE_ROW(6, a4, 2 * L) EDGETUNE_ROW(7, a4, L3)
#undef EDGETUNE_ROW
  }
  for (size_t r = 0; r < 8; ++r) {
    _mm512_storeu_ps(c + r * ldc, acc[r][0]);
    _mm512_storeu_ps(c + r * ldc + 16, acc[r][1]);
  }
}

// g[r][0, 32) for r < rows (row stride ldg; the two 16-column halves stored under m0 and m1) +=
// sum over pairs q < Q of row r's pair q (at pq + q lp + 2 r) times 32 columns' pair q (wi + q lw:
// 16 columns' pairs, then the next 16's at + 32).
inline void pv8x32(const uint16_t* pq, size_t lp, const uint16_t* wi, size_t lw, size_t Q, float* g, size_t ldg,
                   size_t rows, __mmask16 m0, __mmask16 m1) {
  __m512 acc[8][2];
  for (size_t r = 0; r < 8; ++r) {
    acc[r][0] = r < rows ? _mm512_maskz_loadu_ps(m0, g + r * ldg) : _mm512_setzero_ps();
    acc[r][1] = r < rows ? _mm512_maskz_loadu_ps(m1, g + r * ldg + 16) : _mm512_setzero_ps();
  }
  for (size_t q = 0; q < Q; ++q) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(wi + q * lw), b1 = (__m512bh)_mm512_loadu_si512(wi + q * lw + 32);
    const uint16_t* pp = pq + q * lp;
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) {
      int32_t v;
      std::memcpy(&v, pp + 2 * r, 4);
      const __m512bh x = (__m512bh)_mm512_set1_epi32(v);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, b1);
    }
  }
  for (size_t r = 0; r < rows; ++r) {
    _mm512_mask_storeu_ps(g + r * ldg, m0, acc[r][0]);
    _mm512_mask_storeu_ps(g + r * ldg + 16, m1, acc[r][1]);
  }
}

inline __mmask16 lanes(size_t left) { return left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1); }

// An aligned view of a thread's buffer, kept at its largest size (fresh pages on every call would
// cost page faults).
template <typename T>
T* buffer(std::vector<T>& v, size_t n) {
  v.resize(std::max(v.size(), n + 64 / sizeof(T)));
  const size_t skew = reinterpret_cast<uintptr_t>(v.data()) % 64;
  return v.data() + (skew ? (64 - skew) / sizeof(T) : 0);
}

}  // namespace

void avx512_bf16_ce_part(const float* h, size_t n, size_t D, const uint16_t* w, size_t v_begin, size_t v_end, float* m_out,
                         float* s_out, float* G) {
  namespace k = fused_isa_ce_bf16;
  w += v_begin * D;
  const size_t V = v_end - v_begin;
  const size_t np = (n + 31) / 32 * 32, KB = (D + 31) / 32, KP = KB * 16, Dv = KB * 32, Dp = (D + 1) / 2 * 2;
  thread_local std::vector<uint16_t> hbuf, wbuf, pbuf, ibuf;
  thread_local std::vector<float> fbuf;
  uint16_t* hp = buffer(hbuf, np / 16 * KP * 32);  // h's rows in B panels of 16 (zero past n and D)
  for (size_t g = 0; g < np / 16; ++g)
    interleave_rows16(h + g * 16 * D, n > g * 16 ? std::min<size_t>(16, n - g * 16) : 0, D, hp + g * KP * 32);
  float* sc = buffer(fbuf, VT * np + 3 * np);  // [VT][np]: a tile's scores
  float *m = sc + VT * np, *s = m + np, *f = s + np;  // running maxima, sums, this tile's rescale factors
  uint16_t* pq = buffer(pbuf, VT * np);     // [VT / 2][np][2]: the softmax weights by pairs of entries
  uint16_t* wi = buffer(ibuf, VT * Dv);     // [VT / 2][Dv][2]: the tile's rows by pairs of entries
  uint16_t* wpad = buffer(wbuf, VT * Dp);   // a tile copied with an even row length and zero rows past V
  for (size_t r = 0; r < np; ++r) m[r] = -3.0e38f, s[r] = 0.0f;
  if (G) std::fill(G, G + n * D, 0.0f);
  // Lane 2c from the first row's 16 values, 2c + 1 from the second's (vpermt2w, vpermw).
  alignas(64) static const uint16_t order[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                 8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t zip[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                               8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i two = _mm512_load_si512(order), pairs = _mm512_load_si512(zip);
  for (size_t v0 = 0; v0 < V; v0 += VT) {
    const size_t jn = std::min(VT, V - v0), jb = (jn + 7) / 8 * 8, Q = (jn + 1) / 2;
    const uint16_t* wt = w + v0 * D;
    size_t ldw = D;
    if (D % 2 || jn < VT) {  // rows of odd length, or the last tile: a zero-padded copy
      std::memset(wpad, 0, VT * Dp * 2);
      for (size_t j = 0; j < jn; ++j) std::memcpy(wpad + j * Dp, wt + j * D, D * 2);
      wt = wpad, ldw = Dp;
    }
    // 32 rows of h (36 KB at D = 576) stay in L1 while the tile's entries stream past them: the
    // other order, h from L2 for every 8 entries, measured half the speed.
    for (size_t c0 = 0; c0 < np; c0 += 32)
      for (size_t j0 = 0; j0 < jb; j0 += 8)
        scores8x32(wt + j0 * ldw, ldw, hp + c0 / 16 * KP * 32, KP * 32, Dp / 2, sc + j0 * np + c0, np);
    // Online softmax down the tile's entries, 16 rows at a time.
    for (size_t r0 = 0; r0 < np; r0 += 16) {
      const k::vf m0 = k::vload(m + r0);
      k::vf mx = m0;
      for (size_t j = 0; j < jn; ++j) {
        const k::vf x = k::vload(sc + j * np + r0);
        mx = x > mx ? x : mx;
      }
      const k::vf fr = k::vexp(m0 - mx);
      k::vf sum = k::vload(s + r0) * fr;
      for (size_t q = 0; q < Q; ++q) {
        const k::vf e0 = k::vexp(k::vload(sc + 2 * q * np + r0) - mx);
        const k::vf e1 = 2 * q + 1 < jn ? k::vexp(k::vload(sc + (2 * q + 1) * np + r0) - mx) : k::vf{};
        sum += e0;
        sum += e1;
        if (G) {
          const __m512i b = (__m512i)_mm512_cvtne2ps_pbh((__m512)e1, (__m512)e0);
          _mm512_storeu_si512(pq + q * 2 * np + 2 * r0, _mm512_permutexvar_epi16(pairs, b));
        }
      }
      k::vstore(f + r0, fr);
      k::vstore(s + r0, sum);
      k::vstore(m + r0, mx);
    }
    if (!G) continue;
    for (size_t r = 0; r < n; ++r)
      if (f[r] != 1.0f)
        for (size_t d = 0; d < D; ++d) G[r * D + d] *= f[r];
    for (size_t q = 0; q < Q; ++q) {  // rows 2q and 2q + 1 interleaved (row jb - 1 exists: jb is even)
      const uint16_t *a = wt + 2 * q * ldw, *b = a + ldw;
      for (size_t d0 = 0; d0 < Dv; d0 += 16) {
        const __mmask16 mk = d0 < D ? lanes(D - d0) : 0;
        const __m256i r0 = _mm256_maskz_loadu_epi16(mk, a + d0), r1 = _mm256_maskz_loadu_epi16(mk, b + d0);
        _mm512_storeu_si512(wi + q * 2 * Dv + 2 * d0,
                            _mm512_permutex2var_epi16(_mm512_castsi256_si512(r0), two, _mm512_castsi256_si512(r1)));
      }
    }
    for (size_t d0 = 0; d0 < D; d0 += 32) {
      const __mmask16 c0 = lanes(D - d0), c1 = D - d0 > 16 ? lanes(D - d0 - 16) : 0;
      for (size_t r0 = 0; r0 < n; r0 += 8)
        pv8x32(pq + 2 * r0, 2 * np, wi + 2 * d0, 2 * Dv, Q, G + r0 * D + d0, D, std::min<size_t>(8, n - r0), c0, c1);
    }
  }
  std::memcpy(m_out, m, n * sizeof(float));
  std::memcpy(s_out, s, n * sizeof(float));
}

#else

void avx512_bf16_ce_part(const float*, size_t, size_t, const uint16_t*, size_t, size_t, float*, float*, float*) {}

#endif

void ce_bf16_finish(const float* h, size_t n, size_t D, const uint16_t* w, const int64_t* labels, int64_t ignore,
                    size_t parts, size_t stride, const float* m, const float* s, float* const* Gs, float* loss,
                    float* G) {
  for (size_t r = 0; r < n; ++r) {
    const int64_t lab = labels[r];
    if (lab == ignore) {
      loss[r] = 0.0f;
      if (G) std::fill(G + r * D, G + (r + 1) * D, 0.0f);
      continue;
    }
    // The slices' maxima and sums brought to one maximum, as the tiles' are within a slice.
    float mx = m[r];
    for (size_t p = 1; p < parts; ++p) mx = std::max(mx, m[p * stride + r]);
    float f[CE_PARTS];
    float sum = 0.0f;
    for (size_t p = 0; p < parts; ++p) {
      f[p] = std::exp(m[p * stride + r] - mx);
      sum += s[p * stride + r] * f[p];
    }
    const uint16_t* wl = w + static_cast<size_t>(lab) * D;
    double dot = 0.0;  // the label's score, from the same bfloat16 values as the tiles'
    for (size_t d = 0; d < D; ++d) dot += double(from_bf16(to_bf16(h[r * D + d]))) * from_bf16(wl[d]);
    loss[r] = mx + std::log(sum) - static_cast<float>(dot);
    if (G) {
      float* gr = G + r * D;
      const float inv = 1.0f / sum;
      for (size_t d = 0; d < D; ++d) {
        float g = 0.0f;
        for (size_t p = 0; p < parts; ++p) g += Gs[p][r * D + d] * f[p];
        gr[d] = g * inv - from_bf16(wl[d]);
      }
    }
  }
}

}  // namespace edgetune
