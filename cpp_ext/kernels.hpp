// Adapter merge kernels: W += B @ A (B already scaled), in place, a register tile at a time.
//
// A merge reads and writes every weight once, like a copy. The kernels never build the
// full-size B @ A: a 6 x 16 block (6 x 8 without AVX) of the product is accumulated in registers and added
// into W straight away. Several adapters are one adapter of the summed rank
// ([c1 B1 | c2 B2] @ [A1; A2]). Threads split W by rows.
//
// One source, compiled once per instruction set (isa_*.cpp, each with its own target flags and
// its own namespace, EDGETUNE_ISA_NS, so no inline function of one build can be linked into
// another); dispatch.cpp picks the widest the CPU has at run time. Plain C++ (no Python).
#ifndef EDGETUNE_ISA_NS
#define EDGETUNE_ISA_NS native
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "common.hpp"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define EDGETUNE_AVX512 1
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
#define EDGETUNE_AVX512BF16 1  // one instruction rounds 32 floats to bfloat16
#endif
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define EDGETUNE_AVX2 1
#endif

namespace edgetune {
namespace EDGETUNE_ISA_NS {

// -- scalar conversions (round to nearest even) ------------------------------------------
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { man <<= 1; ++e; } while ((man & 0x400u) == 0);
      u = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow to inf
  if (a < 0x38800000u) {  // half subnormal: units of 2^-24, scaling by a power of two is exact
    float mag;
    std::memcpy(&mag, &a, 4);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(mag * 16777216.0f)));
  }
  uint32_t e = (a >> 23) - 112u;
  uint32_t m = a & 0x7fffffu;
  uint32_t q = (e << 10) | (m >> 13);
  uint32_t rem = m & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) ++q;
  return static_cast<uint16_t>(sign | q);
}

template <DType D>
inline float load1(const void* w, size_t i) {
  if constexpr (D == DType::F32) return static_cast<const float*>(w)[i];
  else if constexpr (D == DType::BF16) return bf16_to_f32(static_cast<const uint16_t*>(w)[i]);
  else return f16_to_f32(static_cast<const uint16_t*>(w)[i]);
}

template <DType D>
inline void store1(void* w, size_t i, float v) {
  if constexpr (D == DType::F32) static_cast<float*>(w)[i] = v;
  else if constexpr (D == DType::BF16) static_cast<uint16_t*>(w)[i] = f32_to_bf16(v);
  else static_cast<uint16_t*>(w)[i] = f32_to_f16(v);
}

// -- float vectors --------------------------------------------------------------------------
// GCC/Clang vector extensions in the target's register width: 8 floats with AVX, 4 with SSE
// or NEON. A register tile is MR rows of two vectors.
#if defined(EDGETUNE_AVX512)
constexpr size_t VW = 16;
#elif defined(__AVX__)
constexpr size_t VW = 8;
#else
constexpr size_t VW = 4;
#endif
typedef float vf __attribute__((vector_size(VW * sizeof(float))));

inline vf loadv(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void storev(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

// bfloat16 -> float32 is a shift; float32 -> bfloat16 rounds to nearest even and keeps NaN a NaN.
#ifdef EDGETUNE_AVX2
inline __m256i bf16_round_avx(vf f) {
  const __m256i u = _mm256_castps_si256((__m256)f);
  const __m256i top = _mm256_srli_epi32(u, 16);
  const __m256i lsb = _mm256_and_si256(top, _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps((__m256)f, (__m256)f, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_or_si256(top, _mm256_set1_epi32(0x40)), nan);  // NaN stays a quiet NaN
}
#endif

#ifdef EDGETUNE_AVX512
inline __m512i bf16_round_avx512(vf f) {
  const __m512i u = _mm512_castps_si512((__m512)f);
  const __m512i top = _mm512_srli_epi32(u, 16);
  const __m512i lsb = _mm512_and_si512(top, _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask((__m512)f, (__m512)f, _CMP_UNORD_Q);
  return _mm512_mask_blend_epi32(nan, r, _mm512_or_si512(top, _mm512_set1_epi32(0x40)));  // NaN stays quiet
}
#endif

// Column order of the NR values in a (lo, hi) pair: natural, except bfloat16 on AVX2 where
// load_tile leaves them interleaved by 128-bit lane.
template <DType D>
constexpr size_t lane_col(size_t l) {
#ifdef EDGETUNE_AVX2
  if constexpr (D == DType::BF16) return (l & 3) | ((l & 4) << 1) | ((l & 8) >> 1);
#endif
  return l;
}

// One tile row of weights (NR) in, two float vectors out; and back.
template <DType D>
inline void load_tile(const void* w, size_t i, vf& lo, vf& hi) {
  if constexpr (D == DType::F32) {
    const float* p = static_cast<const float*>(w) + i;
    lo = loadv(p);
    hi = loadv(p + VW);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(w) + i;
#if defined(EDGETUNE_AVX512)
    const __m256i h0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i h1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
    if constexpr (D == DType::BF16) {  // widen and shift the bits into the high halves: natural order
      lo = (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h0), 16);
      hi = (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h1), 16);
    } else {
      lo = (vf)_mm512_cvtph_ps(h0);
      hi = (vf)_mm512_cvtph_ps(h1);
    }
#elif defined(EDGETUNE_AVX2)
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (D == DType::BF16) {
      // bf16 bits into the high halves. unpack works per 128-bit lane, so lo holds columns
      // 0-3 and 8-11, hi 4-7 and 12-15: A is packed in that order for bfloat16 (see pack()).
      lo = (vf)_mm256_unpacklo_epi16(_mm256_setzero_si256(), h);
      hi = (vf)_mm256_unpackhi_epi16(_mm256_setzero_si256(), h);
    } else {
      lo = (vf)_mm256_cvtph_ps(_mm256_castsi256_si128(h));
      hi = (vf)_mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
    }
#else
    float t[2 * VW];
    for (size_t l = 0; l < 2 * VW; ++l) t[l] = load1<D>(p, lane_col<D>(l));
    lo = loadv(t);
    hi = loadv(t + VW);
#endif
  }
}

template <DType D>
inline void store_tile(void* w, size_t i, vf lo, vf hi) {
  if constexpr (D == DType::F32) {
    float* p = static_cast<float*>(w) + i;
    storev(p, lo);
    storev(p + VW, hi);
  } else {
    uint16_t* p = static_cast<uint16_t*>(w) + i;
#if defined(EDGETUNE_AVX512)
    __m256i o0, o1;
    if constexpr (D == DType::BF16) {  // each lane holds a value below 2^16: the narrowing is exact
      o0 = _mm512_cvtepi32_epi16(bf16_round_avx512(lo));
      o1 = _mm512_cvtepi32_epi16(bf16_round_avx512(hi));
    } else {
      o0 = _mm512_cvtps_ph((__m512)lo, _MM_FROUND_TO_NEAREST_INT);
      o1 = _mm512_cvtps_ph((__m512)hi, _MM_FROUND_TO_NEAREST_INT);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), o0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 16), o1);
#elif defined(EDGETUNE_AVX2)
    __m256i out;
    if constexpr (D == DType::BF16) {
      // Each 32-bit lane holds a value below 2^16, so the unsigned-saturating pack is exact;
      // per 128-bit lane it undoes load_tile's interleave.
      out = _mm256_packus_epi32(bf16_round_avx(lo), bf16_round_avx(hi));
    } else {
      out = _mm256_set_m128i(_mm256_cvtps_ph((__m256)hi, _MM_FROUND_TO_NEAREST_INT),
                             _mm256_cvtps_ph((__m256)lo, _MM_FROUND_TO_NEAREST_INT));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), out);
#else
    float t[2 * VW];
    storev(t, lo);
    storev(t + VW, hi);
    for (size_t l = 0; l < 2 * VW; ++l) store1<D>(p, lane_col<D>(l), t[l]);
#endif
  }
}

// -- the packed adapter -----------------------------------------------------------------------
constexpr size_t MR = 6;   // rows per register tile
constexpr size_t NR = 2 * VW;  // columns per register tile: two vectors (16 with AVX)
// 6 x 2 = 12 vector accumulators; with two A vectors and one broadcast B value that is 15 of
// the 16 AVX/SSE registers, and each step of k is 2 loads + 6 broadcasts for 12 FMAs.

// The packed adapter lives in per-thread scratch buffers that are reused from call to call:
// fresh pages cost a page fault each, which for a few MB is a sizeable part of a merge.
// A Packed is valid until the next pack() on the same thread.
struct Packed {
  size_t rows = 0, cols = 0, r = 0;
  size_t tiles = 0;          // column tiles, the last one zero-padded when cols % NR != 0
  const float* ap = nullptr;  // A: [tiles][r][NR], read front to back by the micro-kernel
  const float* bp = nullptr;  // B: [row blocks][r][MR], zero rows past the end
};

inline float* scratch(std::vector<float>& buf, size_t n) {
  if (buf.size() < n) buf.resize(n);
  std::fill(buf.begin(), buf.begin() + static_cast<std::ptrdiff_t>(n), 0.0f);
  return buf.data();
}

// Several adapters are packed as one of the summed rank: [c1 B1 | c2 B2 | ...] @ [A1; A2; ...].
// A's columns within a tile follow lane_col<D>, the order load_tile<D> gives W's columns in.
template <DType D>
Packed pack(size_t rows, size_t cols, const std::vector<Factor>& fs) {
  Packed p;
  p.rows = rows;
  p.cols = cols;
  for (const Factor& f : fs) p.r += f.r;
  const size_t r = p.r;
  p.tiles = (cols + NR - 1) / NR;
  const size_t blocks = (rows + MR - 1) / MR;
  thread_local std::vector<float> abuf, bbuf;
  float* ap = scratch(abuf, p.tiles * r * NR);
  float* bp = scratch(bbuf, blocks * r * MR);
  p.ap = ap;
  p.bp = bp;
  size_t k0 = 0;
  for (const Factor& f : fs) {
    for (size_t k = 0; k < f.r; ++k) {
      const float* arow = f.a + k * cols;
      for (size_t t = 0; t < p.tiles; ++t) {
        float* dst = ap + (t * r + k0 + k) * NR;
        const size_t j0 = t * NR;
        if (j0 + NR <= cols) {
          for (size_t l = 0; l < NR; ++l) dst[l] = arow[j0 + lane_col<D>(l)];
        } else {
          for (size_t l = 0; l < NR; ++l)
            if (j0 + lane_col<D>(l) < cols) dst[l] = arow[j0 + lane_col<D>(l)];
        }
      }
    }
    for (size_t i = 0; i < rows; ++i) {
      const float* brow = f.b + i * f.r;
      float* dst = bp + ((i / MR) * r + k0) * MR + i % MR;
      for (size_t k = 0; k < f.r; ++k) dst[k * MR] = brow[k] * f.coef;
    }
    k0 += f.r;
  }
  return p;
}

// chk gathers v * 0 for every value v written: 0 for a finite v, NaN for an infinity or a NaN, so
// the merge learns whether it wrote a non-finite float32 value without a second pass over W.
inline void check(vf& chk, vf v) {
#if defined(EDGETUNE_AVX512)
  chk = (vf)_mm512_fmadd_ps((__m512)v, _mm512_setzero_ps(), (__m512)chk);
#elif defined(EDGETUNE_AVX2)
  chk = (vf)_mm256_fmadd_ps((__m256)v, _mm256_setzero_ps(), (__m256)chk);
#else
  chk += v - v;
#endif
}

// One full tile row: W[i : i + NR] += (a, b), checked and stored.
template <DType D>
inline void add_row(void* w, size_t i, vf a, vf b, vf& chk) {
  vf lo, hi;
  load_tile<D>(w, i, lo, hi);
  lo += a;
  hi += b;
#if defined(EDGETUNE_AVX512BF16)
  if constexpr (D == DType::BF16) {
    // VCVTNE2PS2BF16 rounds to nearest even like bf16_round_avx512 but flushes subnormal inputs
    // to zero; rows holding a NaN, an infinity or a subnormal take the exact path below.
    const __mmask16 special = _mm512_fpclass_ps_mask((__m512)lo, 0xb9) | _mm512_fpclass_ps_mask((__m512)hi, 0xb9);
    if (__builtin_expect(special == 0, 1)) {
      _mm512_storeu_si512(static_cast<uint16_t*>(w) + i, (__m512i)_mm512_cvtne2ps_pbh((__m512)hi, (__m512)lo));
      return;
    }
  }
#endif
  check(chk, lo);
  check(chk, hi);
  store_tile<D>(w, i, lo, hi);
}

// -- the micro-kernel --------------------------------------------------------------------------
// W[row0 + i, j0:j0+NR] += sum_k B[row0 + i, k] * A[k, j0:j0+NR] for i < nr (and j < cols).
// ap is the tile's packed A ([r][NR]), bp the row block's packed B ([r][6]).
// chk: see check().
template <DType D>
inline void micro(void* w, size_t row0, size_t nr, size_t j0, size_t cols, const float* ap, const float* bp,
                  size_t r, vf& chk) {
  vf c00 = {}, c01 = {}, c10 = {}, c11 = {}, c20 = {}, c21 = {}, c30 = {}, c31 = {}, c40 = {}, c41 = {}, c50 = {},
      c51 = {};
#pragma GCC unroll 8
  for (size_t k = 0; k < r; ++k) {
#if defined(EDGETUNE_AVX512)
    const __m512 x0 = _mm512_loadu_ps(ap + k * NR), x1 = _mm512_loadu_ps(ap + k * NR + 16);
    __m512 b;
#define EDGETUNE_ROW(i, lo, hi)                            \
    b = _mm512_set1_ps(bp[k * MR + i]);                     \
    lo = (vf)_mm512_fmadd_ps(b, x0, (__m512)lo);           \
    hi = (vf)_mm512_fmadd_ps(b, x1, (__m512)hi);
#elif defined(EDGETUNE_AVX2)
    const __m256 x0 = _mm256_loadu_ps(ap + k * NR), x1 = _mm256_loadu_ps(ap + k * NR + 8);
    __m256 b;
#define EDGETUNE_ROW(i, lo, hi)                            \
    b = _mm256_broadcast_ss(bp + k * MR + i);               \
    lo = (vf)_mm256_fmadd_ps(b, x0, (__m256)lo);           \
    hi = (vf)_mm256_fmadd_ps(b, x1, (__m256)hi);
#else
    const vf x0 = loadv(ap + k * NR), x1 = loadv(ap + k * NR + VW);
#define EDGETUNE_ROW(i, lo, hi)  \
    lo += bp[k * MR + i] * x0;    \
    hi += bp[k * MR + i] * x1;
#endif
    EDGETUNE_ROW(0, c00, c01)
    EDGETUNE_ROW(1, c10, c11)
    EDGETUNE_ROW(2, c20, c21)
    EDGETUNE_ROW(3, c30, c31)
    EDGETUNE_ROW(4, c40, c41)
    EDGETUNE_ROW(5, c50, c51)
#undef EDGETUNE_ROW
  }
  const size_t at = row0 * cols + j0;
  if (j0 + NR <= cols && nr == MR) {
    add_row<D>(w, at, c00, c01, chk);
    add_row<D>(w, at + cols, c10, c11, chk);
    add_row<D>(w, at + 2 * cols, c20, c21, chk);
    add_row<D>(w, at + 3 * cols, c30, c31, chk);
    add_row<D>(w, at + 4 * cols, c40, c41, chk);
    add_row<D>(w, at + 5 * cols, c50, c51, chk);
    return;
  }
  // Edges: fewer than 6 rows left, or the last, partial column tile.
  const vf acc[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  const size_t n = std::min(NR, cols - j0);
  for (size_t i = 0; i < nr; ++i) {
    float t[NR];
    storev(t, acc[i][0]);
    storev(t + VW, acc[i][1]);
    for (size_t l = 0; l < NR; ++l) {
      const size_t j = lane_col<D>(l);
      if (j < n) {
        const float v = load1<D>(w, at + i * cols + j) + t[l];
        chk[0] += v - v;
        store1<D>(w, at + i * cols + j, v);
      }
    }
  }
}

constexpr size_t A_BLOCK_BYTES = 256 * 1024;  // the packed A of one column block stays in L2

inline bool any_nan(vf v) {
  for (size_t l = 0; l < VW; ++l)
    if (v[l] != v[l]) return true;
  return false;
}

// Returns whether a non-finite value was written.
template <DType D>
bool merge_rows(void* w, size_t r0, size_t r1, const Packed& p) {
  vf chk = {};
  const size_t cols = p.cols, r = p.r;
  // Widest column block whose packed A fits the budget: at low rank whole rows, so W streams.
  const size_t tb = std::max<size_t>(1, A_BLOCK_BYTES / (sizeof(float) * NR * std::max<size_t>(1, r)));
  // A tile costs about 6 * r cycles of FMAs: look further ahead at low rank (measured best:
  // 8-16 tiles at rank 8, 2-4 at rank 64).
  const size_t ahead = std::min<size_t>(16, std::max<size_t>(2, 128 / std::max<size_t>(1, r)));
  const size_t esize = D == DType::F32 ? 4 : 2;
  for (size_t t0 = 0; t0 < p.tiles; t0 += tb) {
    const size_t t1 = std::min(p.tiles, t0 + tb);
    for (size_t row = r0; row < r1; row += MR) {
      const size_t nr = std::min(MR, r1 - row);
      const float* bp = p.bp + (row / MR) * r * MR;
      for (size_t t = t0; t < t1; ++t) {
        // Fetch W for the tile `ahead` steps on in this walk (wrapping into the next row block)
        // so its trip to memory overlaps the arithmetic of the tiles in between.
        size_t pt = t + ahead, prow = row;
        if (pt >= t1) {
          pt = t0 + (pt - t1) % (t1 - t0);
          prow += MR;
        }
        if (prow + MR <= r1) {
          const char* q = static_cast<const char*>(w) + (prow * cols + pt * NR) * esize;
          for (size_t i = 0; i < MR; ++i) __builtin_prefetch(q + i * cols * esize, 1, 3);
        }
        micro<D>(w, row, nr, t * NR, cols, p.ap + t * r * NR, bp, r, chk);
      }
    }
  }
  return any_nan(chk);
}

// DoRA: W'[o,:] = m[o] * (W[o,:] + s B[o,:] A) / ||W[o,:] + s B[o,:] A||, a block of rows at a time:
// the merged rows go to a float32 buffer (MR rows), their norms are taken, and they are scaled back.
template <DType D>
void dora_rows(void* w, size_t r0, size_t r1, const Packed& p, const float* mag) {
  const size_t cols = p.cols, r = p.r;
  std::vector<float> merged(MR * p.tiles * NR);
  vf unused = {};  // DoRA's result is checked after its rows are rescaled
  for (size_t row = r0; row < r1; row += MR) {
    const size_t nr = std::min(MR, r1 - row);
    for (size_t i = 0; i < nr; ++i)
      for (size_t j = 0; j < cols; ++j) merged[i * p.tiles * NR + j] = load1<D>(w, (row + i) * cols + j);
    const float* bp = p.bp + (row / MR) * r * MR;
    for (size_t t = 0; t < p.tiles; ++t)
      micro<DType::F32>(merged.data(), 0, nr, t * NR, p.tiles * NR, p.ap + t * r * NR, bp, r, unused);
    for (size_t i = 0; i < nr; ++i) {
      const float* m = merged.data() + i * p.tiles * NR;
      double ss = 0.0;
      for (size_t j = 0; j < cols; ++j) ss += static_cast<double>(m[j]) * m[j];
      float k = static_cast<float>(mag[row + i] / std::sqrt(ss));
      for (size_t j = 0; j < cols; ++j) store1<D>(w, (row + i) * cols + j, m[j] * k);
    }
  }
}

// Split [0, rows) into contiguous runs of whole MR-row blocks, one per thread.
template <typename F>
void parallel_rows(size_t rows, int threads, F&& fn) {
  size_t nt = threads > 0 ? static_cast<size_t>(threads) : std::max(1u, std::thread::hardware_concurrency());
  size_t blocks = (rows + MR - 1) / MR;
  nt = std::max<size_t>(1, std::min(nt, blocks));
  if (nt == 1) {
    fn(0, rows);
    return;
  }
  run_parallel(nt, [&](size_t t) {
    size_t b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;
    fn(std::min(rows, b0 * MR), std::min(rows, b1 * MR));
  });
}

template <typename F>
void dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: f(std::integral_constant<DType, DType::F32>{}); break;
    case DType::F16: f(std::integral_constant<DType, DType::F16>{}); break;
    case DType::BF16: f(std::integral_constant<DType, DType::BF16>{}); break;
  }
}

// pack() in the column order the kernels for weights of dtype dt expect.
inline Packed pack_for(DType dt, size_t rows, size_t cols, const std::vector<Factor>& fs) {
  Packed p;
  dispatch(dt, [&](auto tag) { p = pack<decltype(tag)::value>(rows, cols, fs); });
  return p;
}

// threads <= 0: as many as the machine has, but one per ~1M multiply-adds at least: handing
// work to a pooled thread costs a few microseconds (a 576 x 576 rank-8 merge takes about 70).
inline int auto_threads(size_t rows, size_t cols, size_t r, int threads) {
  if (threads > 0) return threads;
  const size_t hw = std::max(1u, std::thread::hardware_concurrency());
  const size_t by_work = rows * cols * (r + 8) / (size_t(1) << 20);
  return static_cast<int>(std::max<size_t>(1, std::min(hw, by_work)));
}

// p must come from pack_for(dt, ...).
// Returns whether a non-finite value was written (before rounding to a 16-bit type).
inline bool lora_merge(void* w, const Packed& p, DType dt, int threads) {
  threads = auto_threads(p.rows, p.cols, p.r, threads);
  std::atomic<bool> bad{false};
  dispatch(dt, [&](auto tag) {
    constexpr DType D = decltype(tag)::value;
    parallel_rows(p.rows, threads, [&](size_t a, size_t b) {
      if (merge_rows<D>(w, a, b, p)) bad = true;
    });
  });
  return bad;
}

// p must come from pack_for(DType::F32, ...): the merged rows are computed in float32.
inline void dora_merge(void* w, const Packed& p, DType dt, const float* mag, int threads) {
  threads = auto_threads(p.rows, p.cols, p.r, threads);
  dispatch(dt, [&](auto tag) {
    constexpr DType D = decltype(tag)::value;
    parallel_rows(p.rows, threads, [&](size_t a, size_t b) { dora_rows<D>(w, a, b, p, mag); });
  });
}

// Runs loop(id) -> float on `threads` threads at once (all cores when 0); returns the GFLOP/s of
// `flops_per_thread` each, from the wall time of them all. The results are kept, so the loops are not
// optimized away.
template <typename Loop>
inline double time_threads(int threads, double flops_per_thread, Loop&& loop) {
  size_t nt = threads > 0 ? static_cast<size_t>(threads) : std::max(1u, std::thread::hardware_concurrency());
  std::vector<float> sink(nt);
  auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> pool;
  for (size_t t = 0; t < nt; ++t) pool.emplace_back([&, t] { sink[t] = loop(t); });
  for (auto& th : pool) th.join();
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  volatile float keep = sink[0];
  (void)keep;
  return static_cast<double>(nt) * flops_per_thread / secs / 1e9;
}

// The machine's multiply-add throughput in GFLOP/s: `threads` threads each running 12
// independent chains of vector FMAs (the micro-kernel's register tile) for `iters` steps.
// Benchmarks compare the merge against it to tell compute-bound shapes from memory-bound ones.
inline double peak_gflops(int threads, size_t iters) {
  return time_threads(threads, static_cast<double>(iters) * 12 * VW * 2, [&](size_t) {
    vf c[12];
    for (int i = 0; i < 12; ++i) c[i] = vf{} + static_cast<float>(i) * 1e-3f;
    vf x = vf{} + 0.9999f, y = vf{} + 1e-5f;
    for (size_t n = 0; n < iters; ++n) {
#pragma GCC unroll 12
      for (int i = 0; i < 12; ++i) {
#if defined(EDGETUNE_AVX512)
        c[i] = (vf)_mm512_fmadd_ps((__m512)c[i], (__m512)x, (__m512)y);
#elif defined(EDGETUNE_AVX2)
        c[i] = (vf)_mm256_fmadd_ps((__m256)c[i], (__m256)x, (__m256)y);
#else
        c[i] = c[i] * x + y;
#endif
      }
    }
    vf s = c[0];
    for (int i = 1; i < 12; ++i) s += c[i];
    return s[0];
  });
}

// The bfloat16 dot-product throughput in GFLOP/s where this build has AVX512-BF16: 12 independent
// chains of vdpbf16ps (each 16 lanes x 2 multiply-adds), as peak_gflops runs FMAs. 0 elsewhere.
// Benchmarks of bfloat16 products compare against it: the float32 FMA peak is half of it.
inline double peak_bf16_gflops(int threads, size_t iters) {
#if defined(EDGETUNE_AVX512BF16)
  return time_threads(threads, static_cast<double>(iters) * 12 * 16 * 2 * 2, [&](size_t) {
    __m512 c[12];
    for (int i = 0; i < 12; ++i) c[i] = _mm512_set1_ps(static_cast<float>(i) * 1e-3f);
    const __m512bh x = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(1e-3f));
    for (size_t n = 0; n < iters; ++n) {
#pragma GCC unroll 12
      for (int i = 0; i < 12; ++i) c[i] = _mm512_dpbf16_ps(c[i], x, x);
    }
    __m512 s = c[0];
    for (int i = 1; i < 12; ++i) s = _mm512_add_ps(s, c[i]);
    return _mm512_reduce_add_ps(s);
  });
#else
  (void)threads;
  (void)iters;
  return 0.0;
#endif
}

// -- the entry points dispatch.cpp calls, one set per instruction set -------------------------
inline bool lora_merge_entry(void* w, size_t rows, size_t cols, const std::vector<Factor>& fs, DType dt, int threads) {
  return lora_merge(w, pack_for(dt, rows, cols, fs), dt, threads);
}

inline void dora_merge_entry(void* w, size_t rows, size_t cols, const std::vector<Factor>& fs, DType dt,
                             const float* mag, int threads) {
  dora_merge(w, pack_for(DType::F32, rows, cols, fs), dt, mag, threads);
}

inline Ops ops(const char* name) {
  return Ops{name, VW, &lora_merge_entry, &dora_merge_entry, &peak_gflops, &peak_bf16_gflops};
}

}  // namespace EDGETUNE_ISA_NS
}  // namespace edgetune
