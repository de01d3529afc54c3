// bfloat16 products with AVX512-BF16's vdpbf16ps for MatMulBF16 (ops.cpp), on CPUs that have it
// without AMX (AMD Zen 4 and later, Intel Cooper Lake): each instruction multiplies 16 pairs of
// bfloat16 values and adds both products to 16 float32 sums, twice the multiply-adds of a float32
// FMA of the same width. Built with -mavx512bf16 (CMakeLists.txt) on x86 only; elsewhere
// avx512_bf16_usable() is false and ops.cpp computes the same product in plain C++.
//
// Both operands are laid out for the inner loop first: all rows of A rounded to bfloat16 and
// interleaved by pairs of k (16 rows per panel), and 32 of B's columns interleaved the same way
// (pack_b's layout, 16 columns per panel) by the task that multiplies every row by them, so that
// each step of the loop reads one cache line of each. The block is 8 rows of A times 32 columns of
// B: per pair of k, two vectors of B and 8 broadcast pairs of A feed 16 vdpbf16ps. Sixteen rows
// times 16 columns (one vector of B per 16 broadcasts) measured 84-87 % of the instruction's peak
// with every operand in L1, the load ports being the limit; 8 x 32 measured 97-100 %. A forward
// product of fewer than 64 rows skips the packing of w instead: 16 x 16 blocks with w's rows
// broadcast from where they are stored.
#include <cstring>

#include "amx_bf16.hpp"

#if defined(EDGETUNE_X86) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define EDGETUNE_AVX512BF16 1
#include <cpuid.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "simd512.hpp"
#endif

namespace edgetune {

#if defined(EDGETUNE_AVX512BF16)

namespace {

bool probe() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(1, 0, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE
  // The OS saves the AVX-512 state (opmask, upper zmm halves, zmm16-31) as well as SSE and AVX.
  unsigned lo, hi;
  __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & 0xe6u) != 0xe6u) return false;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool f = b & (1u << 16), bw = b & (1u << 30), vl = b & (1u << 31);
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  return f && bw && vl && (a & (1u << 5));  // AVX512_BF16
}

// C[rows <= 8][32 columns] (row stride ldc; the two 16-column halves stored under m0 and m1) = 8
// rows of an A panel (a: pair p of row r at a[32 p + 2 r]) times two B panels (b and b + bs: pair p
// of column c at b[32 p + 2 c]), P pairs deep.
// With c16, the sums are stored rounded to bfloat16 there (nearest even) instead of into c. With
// add, each sum is added to add's value (row stride ldc) as it is stored: one float32 add, as an
// Add node after the product would make. With lp (lr values per row, this block's rows) and lq
// (lr rows of 32 columns, row stride ldq), the low-rank term lp lq is added first, in float32.
inline void block8x32(const uint16_t* a, const uint16_t* b, size_t bs, size_t P, float* c, size_t ldc, size_t rows,
                      __mmask16 m0, __mmask16 m1, uint16_t* c16 = nullptr, const float* add = nullptr,
                      const float* lp = nullptr, const float* lq = nullptr, size_t lr = 0, size_t ldq = 0) {
  // The 16 sums are named variables, not an array: GCC keeps an array of them on the stack
  // outside the inner loop, and the low-rank and addend terms then cost a load and a store per row
  // and term (measured 9-25 % of a LoRA layer's product on Zen 4). Each EDGETUNE_ROWS(X) expands
  // X(r) for the 8 rows; the rows past `rows` (the last block of a product) are skipped.
#define EDGETUNE_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define EDGETUNE_ZERO(r) __m512 s##r##0 = _mm512_setzero_ps(), s##r##1 = _mm512_setzero_ps();
  EDGETUNE_ROWS(EDGETUNE_ZERO)
  const int32_t* a32 = reinterpret_cast<const int32_t*>(a);
  for (size_t p = 0; p < P; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_load_si512(b + p * 32), b1 = (__m512bh)_mm512_load_si512(b + bs + p * 32);
    const int32_t* ap = a32 + p * 16;
#define EDGETUNE_DOT(r)                                                  \
  {                                                                      \
    const __m512bh x = (__m512bh)_mm512_set1_epi32(ap[r]);               \
    s##r##0 = _mm512_dpbf16_ps(s##r##0, x, b0);                          \
    s##r##1 = _mm512_dpbf16_ps(s##r##1, x, b1);                          \
  }
    EDGETUNE_ROWS(EDGETUNE_DOT)
  }
  if (lp) {
    for (size_t j = 0; j < lr; ++j) {
      const __m512 q0 = _mm512_maskz_loadu_ps(m0, lq + j * ldq), q1 = _mm512_maskz_loadu_ps(m1, lq + j * ldq + 16);
#define EDGETUNE_LOW(r)                                                  \
  if (r < rows) {                                                        \
    const __m512 pv = _mm512_set1_ps(lp[r * lr + j]);                    \
    s##r##0 = _mm512_fmadd_ps(pv, q0, s##r##0);                          \
    s##r##1 = _mm512_fmadd_ps(pv, q1, s##r##1);                          \
  }
      EDGETUNE_ROWS(EDGETUNE_LOW)
    }
  }
  if (add) {
#define EDGETUNE_ADD(r)                                                                  \
  if (r < rows) {                                                                        \
    s##r##0 = _mm512_add_ps(s##r##0, _mm512_maskz_loadu_ps(m0, add + r * ldc));          \
    s##r##1 = _mm512_add_ps(s##r##1, _mm512_maskz_loadu_ps(m1, add + r * ldc + 16));     \
  }
    EDGETUNE_ROWS(EDGETUNE_ADD)
  }
  if (c16) {
#define EDGETUNE_STORE16(r)                                                                     \
  if (r < rows) {                                                                               \
    _mm256_mask_storeu_epi16(c16 + r * ldc, m0, (__m256i)_mm512_cvtneps_pbh(s##r##0));          \
    _mm256_mask_storeu_epi16(c16 + r * ldc + 16, m1, (__m256i)_mm512_cvtneps_pbh(s##r##1));     \
  }
    EDGETUNE_ROWS(EDGETUNE_STORE16)
  } else {
#define EDGETUNE_STORE(r)                                         \
  if (r < rows) {                                                 \
    _mm512_mask_storeu_ps(c + r * ldc, m0, s##r##0);              \
    _mm512_mask_storeu_ps(c + r * ldc + 16, m1, s##r##1);         \
  }
    EDGETUNE_ROWS(EDGETUNE_STORE)
  }
#undef EDGETUNE_STORE
#undef EDGETUNE_STORE16
#undef EDGETUNE_ADD
#undef EDGETUNE_LOW
#undef EDGETUNE_DOT
#undef EDGETUNE_ZERO
#undef EDGETUNE_ROWS
}

// acc[r] (r < 16) = sum over pairs p < KP of row r's pair p of A (a 32-bit pair at a + r * lda + 2 p)
// times B's 16 columns' pair p (32 values at b + 32 p).
inline void block16(const uint16_t* a, size_t lda, const uint16_t* b, size_t KP, __m512 acc[16]) {
  for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
  // Four row pointers and the row stride, so every row's pair is one addressing mode away.
  const char* a0 = reinterpret_cast<const char*>(a);
  const size_t L = lda * 2, L3 = 3 * L;
  const char* a4 = a0 + 4 * L;
  const char* a8 = a0 + 8 * L;
  const char* a12 = a0 + 12 * L;
  for (size_t p = 0; p < KP; ++p) {
    const __m512bh bv = (__m512bh)_mm512_loadu_si512(b + p * 32);
    const size_t o = p * 4;
#define EDGETUNE_ROW(i, base, off)                                                    \
  {                                                                                   \
    int32_t v;                                                                        \
    std::memcpy(&v, base + off + o, 4);                                               \
    acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32(v), bv);            \
  }
    EDGETUNE_ROW(0, a0, 0) EDGETUNE_ROW(1, a0, L) EDGETUNE_ROW(2, a0, 2 * L) EDGETUNE_ROW(3, a0, L3)
    EDGETUNE_ROW(4, a4, 0) EDGETUNE_ROW(5, a4, L) EDGETUNE_ROW(6, a4, 2 * L) EDGETUNE_ROW(7, a4, L3)
    EDGETUNE_ROW(8, a8, 0) EDGETUNE_ROW(9, a8, L) EDGETUNE_ROW(10, a8, 2 * L) EDGETUNE_ROW(11, a8, L3)
    EDGETUNE_ROW(12, a12, 0) EDGETUNE_ROW(13, a12, L) EDGETUNE_ROW(14, a12, 2 * L) EDGETUNE_ROW(15, a12, L3)
#undef EDGETUNE_ROW
  }
}

}  // namespace

bool avx512_bf16_usable() {
  static const bool ok = probe();
  return ok;
}

void avx512_bf16_pack_rows(const float* x, size_t M, size_t K, size_t g, uint16_t* out) {
  const size_t KP = (K + 31) / 32 * 16;
  interleave_rows16(x + g * 16 * K, std::min<size_t>(16, M - g * 16), K, out + g * KP * 32);
}

void avx512_bf16_cols(const uint16_t* rows, size_t M, size_t K, const uint16_t* panel, size_t cols, float* y,
                      size_t ldy, uint16_t* y16, const float* add, const char* next, size_t next_lines,
                      size_t next_stride, const LowRank* low) {
  const size_t KP = (K + 31) / 32 * 16;
  const __mmask16 m0 = cols >= 16 ? 0xffff : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 m1 = cols >= 32 ? 0xffff : cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1);
  const size_t blocks = (M + 7) / 8, per = next ? (next_lines + blocks - 1) / blocks : 0;
  size_t line = 0;
  for (size_t r0 = 0; r0 < M; r0 += 8) {
    for (size_t i = 0; i < per && line < next_lines; ++i, ++line)
      _mm_prefetch(next + line * next_stride, _MM_HINT_T1);
    // The next block's rows of the addend and of the output (for writing), so that neither waits
    // on memory when this block's sums are stored.
    for (size_t r = r0 + 8; r < std::min(M, r0 + 16); ++r) {
      if (add) {
        _mm_prefetch(reinterpret_cast<const char*>(add + r * ldy), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(add + r * ldy + 16), _MM_HINT_T0);
      }
      if (y16) {
        __builtin_prefetch(y16 + r * ldy, 1, 3);
      } else if (y) {
        __builtin_prefetch(y + r * ldy, 1, 3);
        __builtin_prefetch(y + r * ldy + 16, 1, 3);
      }
    }
    block8x32(rows + (r0 / 16) * KP * 32 + (r0 % 16) * 2, panel, KP * 32, KP, y ? y + r0 * ldy : nullptr, ldy,
              std::min<size_t>(8, M - r0), m0, m1, y16 ? y16 + r0 * ldy : nullptr, add ? add + r0 * ldy : nullptr,
              low ? low->p + r0 * low->r : nullptr, low ? low->q : nullptr, low ? low->r : 0, low ? low->ldq : 0);
  }
}

void avx512_bf16_rows_wt(const float* x, size_t M, size_t K, const uint16_t* w, size_t N, float* y, size_t ldy) {
  // y^T = w x^T: w's rows are A (read as stored), x's rows the B columns, 16 per half.
  const size_t KB = (K + 31) / 32, KP = K / 2;
  std::vector<uint16_t> xb(2 * KB * 512);
  const size_t halves = M > 16 ? 2 : 1;
  for (size_t h = 0; h < halves; ++h) interleave_rows16(x + h * 16 * K, M - h * 16 < 16 ? M - h * 16 : 16, K, xb.data() + h * KB * 512);
  std::vector<uint16_t> tail;  // the last rows of w, zero-padded to 16, where N % 16 != 0
  for (size_t n0 = 0; n0 < N; n0 += 16) {
    const size_t rows = N - n0 < 16 ? N - n0 : 16;
    const uint16_t* a = w + n0 * K;
    if (rows < 16) {
      tail.assign(16 * K, 0);
      std::memcpy(tail.data(), a, rows * K * 2);
      a = tail.data();
    }
    const __mmask16 mask = rows == 16 ? 0xffff : static_cast<__mmask16>((1u << rows) - 1);
    for (size_t h = 0; h < halves; ++h) {
      __m512 acc[16];
      block16(a, K, xb.data() + h * KB * 512, KP, acc);  // acc[n][m]: y^T's 16 x 16 block
      __m512i t[16];
      for (int i = 0; i < 16; ++i) t[i] = _mm512_castps_si512(acc[i]);
      transpose16(t);  // t[m][n]
      for (size_t m = 0; m < 16 && h * 16 + m < M; ++m)
        _mm512_mask_storeu_epi32(y + (h * 16 + m) * ldy + n0, mask, t[m]);
    }
  }
}

#else

bool avx512_bf16_usable() { return false; }

void avx512_bf16_pack_rows(const float*, size_t, size_t, size_t, uint16_t*) {}

void avx512_bf16_cols(const uint16_t*, size_t, size_t, const uint16_t*, size_t, float*, size_t, uint16_t*,
                      const float*, const char*, size_t, size_t, const LowRank*) {}

void avx512_bf16_rows_wt(const float*, size_t, size_t, const uint16_t*, size_t, float*, size_t) {}

#endif

void pack_b_cols(const uint16_t* w, bool trans_b, size_t K, size_t N, size_t n0, size_t cols, uint16_t* out) {
  const size_t KB = (K + BF16_TILE_K - 1) / BF16_TILE_K;
#if defined(EDGETUNE_AVX512BF16)
  if (trans_b && avx512_bf16_usable()) {
    // 16 of w's rows (B's columns) at a time: their next 16 (k, k + 1) pairs by a 16 x 16
    // transpose of 32-bit elements.
    const size_t blocks = (cols + 31) / 32 * 2;
    for (size_t b = 0; b < blocks; ++b) {
      const size_t c0 = n0 + b * 16, left = cols > b * 16 ? cols - b * 16 : 0, rows = left < 16 ? left : 16;
      uint16_t* t = out + b * KB * 512;
      for (size_t k0 = 0; k0 < KB * 32; k0 += 32) {
        const size_t kl = K > k0 ? K - k0 : 0;
        const __mmask32 km = kl >= 32 ? 0xffffffffu : static_cast<__mmask32>((1u << kl) - 1);
        __m512i r[16];
        for (size_t i = 0; i < 16; ++i)
          r[i] = i < rows ? _mm512_maskz_loadu_epi16(km, w + (c0 + i) * K + k0) : _mm512_setzero_si512();
        transpose16(r);
        for (size_t q = 0; q < 16; ++q) _mm512_storeu_si512(t + (k0 / 2 + q) * 32, r[q]);
      }
    }
    return;
  }
  if (!trans_b && avx512_bf16_usable()) {
    // Two rows' 16 values interleaved by one vpermt2w: lane 2c from row k, 2c + 1 from row k + 1.
    alignas(64) static const uint16_t order[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                   8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    const __m512i idx = _mm512_load_si512(order);
    const size_t blocks = (cols + 31) / 32 * 2;  // as pack_b: whole 32-column pairs, zero past cols
    for (size_t b = 0; b < blocks; ++b) {
      const size_t c0 = n0 + b * 16, left = cols > b * 16 ? cols - b * 16 : 0;
      const __mmask16 mask = left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1);
      uint16_t* t = out + b * KB * 512;
      for (size_t p = 0; p < KB * 16; ++p) {
        const size_t k = 2 * p;
        const __m256i r0 = k < K && mask ? _mm256_maskz_loadu_epi16(mask, w + k * N + c0) : _mm256_setzero_si256();
        const __m256i r1 = k + 1 < K && mask ? _mm256_maskz_loadu_epi16(mask, w + (k + 1) * N + c0) : _mm256_setzero_si256();
        _mm512_storeu_si512(t + p * 32, _mm512_permutex2var_epi16(_mm512_castsi256_si512(r0), idx,
                                                                  _mm512_castsi256_si512(r1)));
      }
    }
    return;
  }
#endif
  // B's columns [n0, n0 + cols) are w's rows from n0 (trans_b), or its columns from n0.
  pack_b(trans_b ? w + n0 * K : w + n0, trans_b ? K : N, trans_b, K, cols, out);
}

void rows_to_bf16(const float* a, size_t rows, size_t K, uint16_t* out, size_t lda) {
#if defined(EDGETUNE_AVX512BF16)
  if (avx512_bf16_usable()) {
    for (size_t r = 0; r < rows; ++r) {
      const float* src = a + r * K;
      uint16_t* dst = out + r * lda;
      size_t k = 0;
      for (; k + 16 <= K; k += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + k)));
      if (k < K) {
        const __mmask16 m = static_cast<__mmask16>((1u << (K - k)) - 1);
        _mm256_mask_storeu_epi16(dst + k, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + k)));
      }
      std::memset(dst + K, 0, (lda - K) * 2);
    }
    return;
  }
#endif
  for (size_t r = 0; r < rows; ++r) {
    for (size_t k = 0; k < K; ++k) out[r * lda + k] = to_bf16(a[r * K + k]);
    std::memset(out + r * lda + K, 0, (lda - K) * 2);
  }
}

}  // namespace edgetune
