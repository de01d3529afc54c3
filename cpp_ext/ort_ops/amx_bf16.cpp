// bfloat16 products on Intel AMX for MatMulBF16 (ops.cpp): C = A x B with A float32 rounded to
// bfloat16 on each call, B a frozen bfloat16 weight packed once into AMX's tile layout, and float32
// accumulation. Built with -mamx-tile -mamx-bf16 -mavx512bf16 (CMakeLists.txt) on x86 only; elsewhere, and where
// the CPU or the kernel refuses AMX, amx_bf16_usable() is false and ops.cpp computes the same
// product in plain C++.
#include "amx_bf16.hpp"

#include <cstring>
#include <vector>

#if defined(EDGETUNE_X86) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define EDGETUNE_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "simd512.hpp"
#endif

namespace edgetune {

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<uint16_t>(u >> 16);
}

float from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

void pack_b(const uint16_t* w, size_t n_cols, bool trans_b, size_t K, size_t N, uint16_t* out) {
  const size_t KB = (K + BF16_TILE_K - 1) / BF16_TILE_K, NT = (N + 31) / 32 * 2;
  for (size_t nt = 0; nt < NT; ++nt)
    for (size_t kb = 0; kb < KB; ++kb) {
      uint16_t* t = out + (nt * KB + kb) * 512;
      for (size_t kp = 0; kp < 16; ++kp)
        for (size_t c = 0; c < 16; ++c)
          for (size_t e = 0; e < 2; ++e) {
            const size_t k = kb * BF16_TILE_K + kp * 2 + e, n = nt * 16 + c;
            uint16_t v = 0;
            if (k < K && n < N) v = trans_b ? w[n * n_cols + k] : w[k * n_cols + n];
            t[(kp * 16 + c) * 2 + e] = v;
          }
    }
}

#if defined(EDGETUNE_AMX)

namespace {
struct TileConfig {
  uint8_t palette, start;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

bool probe() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = d & (1u << 24), bf16 = d & (1u << 22);
  if (!tile || !bf16) return false;
  // Linux hands out the tile registers' state only on request (ARCH_REQ_XCOMP_PERM, XTILEDATA).
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}
}  // namespace

bool amx_bf16_usable() {
  static const bool ok = probe();
  return ok;
}

void amx_bf16_rows(const uint16_t* a, size_t lda, const uint16_t* packed, size_t KB, size_t M, size_t N, float* c,
                   size_t ldc) {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int i = 0; i < 8; ++i) {
    cfg.rows[i] = 16;
    cfg.colsb[i] = 64;
  }
  _tile_loadconfig(&cfg);
  alignas(64) float scratch[32 * 32];
  const uint16_t* a1 = a + 16 * lda;
  for (size_t n0 = 0; n0 < N; n0 += 32) {
    const uint16_t* b0 = packed + (n0 / 16) * KB * 512;
    const uint16_t* b1 = b0 + KB * 512;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (size_t kb = 0; kb < KB; ++kb) {
      _tile_loadd(4, a + kb * BF16_TILE_K, lda * 2);
      _tile_loadd(5, a1 + kb * BF16_TILE_K, lda * 2);
      _tile_loadd(6, b0 + kb * 512, 64);
      _tile_loadd(7, b1 + kb * 512, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    const bool full = M >= 32 && n0 + 32 <= N;
    float* out = full ? c + n0 : scratch;
    const size_t ld = full ? ldc : 32;
    _tile_stored(0, out, ld * 4);
    _tile_stored(1, out + 16, ld * 4);
    _tile_stored(2, out + 16 * ld, ld * 4);
    _tile_stored(3, out + 16 * ld + 16, ld * 4);
    if (!full) {
      const size_t rows = M < 32 ? M : 32, cols = N - n0 < 32 ? N - n0 : 32;
      for (size_t r = 0; r < rows; ++r) std::memcpy(c + r * ldc + n0, scratch + r * 32, cols * 4);
    }
  }
  _tile_release();
}

// y[M<=32 rows, N] = x w^T with w [N, K] read as it is stored: computed as y^T = w x^T, w's rows
// the A tiles (16 rows of 32 values each, straight from memory), x's rows converted and interleaved
// into B tiles (pairs of k for each of 16 rows), and each 16 x 16 block of y^T transposed on the way
// out. Needs K % 32 == 0 and N % 32 == 0.
void amx_bf16_rows_wt(const float* x, size_t M, size_t K, const uint16_t* w, size_t N, float* y, size_t ldy) {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int i = 0; i < 8; ++i) {
    cfg.rows[i] = 16;
    cfg.colsb[i] = 64;
  }
  const size_t KB = K / 32;
  // B tiles of x: [2 halves of 16 rows][KB][16 pairs of k][16 rows][2]: each tile is the 16 x 16
  // transpose of 16 rows' (k, k + 1) pairs.
  std::vector<uint16_t> xb(2 * KB * 512);
  for (size_t half = 0; half < 2; ++half)
    interleave_rows16(x + half * 16 * K, M > half * 16 ? M - half * 16 : 0, K, xb.data() + half * KB * 512);
  _tile_loadconfig(&cfg);
  alignas(64) float tile[4][16 * 16];
  const uint16_t* b0 = xb.data();
  const uint16_t* b1 = xb.data() + KB * 512;
  for (size_t n0 = 0; n0 < N; n0 += 32) {
    const uint16_t* a0 = w + n0 * K;
    const uint16_t* a1 = a0 + 16 * K;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (size_t kb = 0; kb < KB; ++kb) {
      _tile_loadd(4, a0 + kb * 32, K * 2);
      _tile_loadd(5, a1 + kb * 32, K * 2);
      _tile_loadd(6, b0 + kb * 512, 64);
      _tile_loadd(7, b1 + kb * 512, 64);
      _tile_dpbf16ps(0, 4, 6);  // y^T[n0 .. +16][m 0 .. 16]
      _tile_dpbf16ps(1, 4, 7);  // y^T[n0 .. +16][m 16 .. 32]
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, tile[0], 64);
    _tile_stored(1, tile[1], 64);
    _tile_stored(2, tile[2], 64);
    _tile_stored(3, tile[3], 64);
    for (size_t q = 0; q < 4; ++q) {
      const size_t nb = n0 + (q / 2) * 16, mb = (q % 2) * 16;
      if (mb >= M) continue;
      __m512i r[16];
      for (size_t nn = 0; nn < 16; ++nn) r[nn] = _mm512_load_si512(tile[q] + nn * 16);
      transpose16(r);
      for (size_t mm = 0; mm < 16 && mb + mm < M; ++mm) _mm512_storeu_si512(y + (mb + mm) * ldy + nb, r[mm]);
    }
  }
  _tile_release();
}

#else

bool amx_bf16_usable() { return false; }

void amx_bf16_rows_wt(const float*, size_t, size_t, const uint16_t*, size_t, float*, size_t) {}

void amx_bf16_rows(const uint16_t*, size_t, const uint16_t*, size_t, size_t, size_t, float*, size_t) {}

#endif

}  // namespace edgetune
