// A feasibility probe for bench/bf16.py, not part of the kernel library: the bfloat16 product of
// Intel AMX, C[M,N] = A[M,K] x W^T with A float32 (rounded to bfloat16 on every call, counted in
// the time) and W [N,K] packed once into bfloat16 tiles, accumulated in float32. Blocks of 32 x 32
// outputs, four accumulator tiles, no prefetching or cache blocking: a first kernel, not a tuned
// one. Prints one JSON line: the best of --iters calls, and the largest error against a double
// reference relative to the largest output. Usage: amx_bf16 M N K [iters]
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <omp.h>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <random>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

struct TileCfg {
  uint8_t palette, start;
  uint8_t res[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

static inline uint16_t bf(float f) {  // round to nearest even
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);
  return u >> 16;
}

// W [N,K] -> packed [N/16][K/32][16 (k pairs)][16 n][2]
static void pack(const float* W, int N, int K, uint16_t* P) {
  for (int nb = 0; nb < N / 16; ++nb)
    for (int kb = 0; kb < K / 32; ++kb) {
      uint16_t* t = P + ((size_t)nb * (K / 32) + kb) * 512;
      for (int kp = 0; kp < 16; ++kp)
        for (int n = 0; n < 16; ++n)
          for (int e = 0; e < 2; ++e) t[(kp * 16 + n) * 2 + e] = bf(W[(size_t)(nb * 16 + n) * K + kb * 32 + kp * 2 + e]);
    }
}

static void cfg_tiles() {
  TileCfg c{};
  c.palette = 1;
  for (int i = 0; i < 8; ++i) { c.rows[i] = 16; c.colsb[i] = 64; }
  _tile_loadconfig(&c);
}

// A bf16 [M,K] row-major, M%32==0, N%32==0, K%32==0
static void gemm(const uint16_t* A, const uint16_t* P, float* C, int M, int N, int K) {
  const int KB = K / 32;
#pragma omp parallel
  {
    cfg_tiles();
    const int mb_n = M / 32, nb_n = N / 32;
#pragma omp for schedule(static)
    for (int blk = 0; blk < mb_n * nb_n; ++blk) {
      const int mb = blk / nb_n, nb = blk % nb_n;
      _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      const uint16_t* a0 = A + (size_t)(mb * 32) * K;
      const uint16_t* a1 = a0 + (size_t)16 * K;
      const uint16_t* b0 = P + (size_t)(nb * 2) * KB * 512;
      const uint16_t* b1 = b0 + (size_t)KB * 512;
      for (int kb = 0; kb < KB; ++kb) {
        _tile_loadd(4, a0 + kb * 32, K * 2);
        _tile_loadd(5, a1 + kb * 32, K * 2);
        _tile_loadd(6, b0 + kb * 512, 64);
        _tile_loadd(7, b1 + kb * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      float* c = C + (size_t)(mb * 32) * N + nb * 32;
      _tile_stored(0, c, N * 4);
      _tile_stored(1, c + 16, N * 4);
      _tile_stored(2, c + (size_t)16 * N, N * 4);
      _tile_stored(3, c + (size_t)16 * N + 16, N * 4);
    }
    _tile_release();
  }
}

static void to_bf16(const float* x, uint16_t* y, size_t n) {
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < n; i += 16) {
    __m512 v = _mm512_loadu_ps(x + i);
    _mm256_storeu_si256((__m256i*)(y + i), (__m256i)_mm512_cvtneps_pbh(v));
  }
}

int main(int argc, char** argv) {
  if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)) { puts("no AMX permission"); return 1; }
  if (argc < 4) { puts("usage: amx_bf16 M N K [iters]"); return 2; }
  int M = atoi(argv[1]), N = atoi(argv[2]), K = atoi(argv[3]);
  std::mt19937 g(0);
  std::normal_distribution<float> d;
  std::vector<float> A((size_t)M * K), W((size_t)N * K), C((size_t)M * N);
  for (auto& v : A) v = d(g);
  for (auto& v : W) v = d(g) * 0.05f;
  std::vector<uint16_t> P((size_t)N * K), Ab((size_t)M * K);
  pack(W.data(), N, K, P.data());
  double best = 1e9;
  const int iters = argc > 4 ? atoi(argv[4]) : 30;
  for (int it = 0; it < iters; ++it) {
    auto t0 = std::chrono::steady_clock::now();
    to_bf16(A.data(), Ab.data(), Ab.size());
    gemm(Ab.data(), P.data(), C.data(), M, N, K);
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (s < best) best = s;
  }
  double err = 0, mx = 0;
  for (int i = 0; i < M; i += 37)
    for (int j = 0; j < N; j += 11) {
      double r = 0;
      for (int k = 0; k < K; ++k) r += (double)A[(size_t)i * K + k] * W[(size_t)j * K + k];
      err = std::max(err, std::fabs(r - C[(size_t)i * N + j]));
      mx = std::max(mx, std::fabs(r));
    }
  printf("{\"ms\": %.4f, \"gflops\": %.1f, \"error\": %.3g, \"threads\": %d}\n", best * 1e3,
         2.0 * M * N * K / best / 1e9, err / mx, omp_get_max_threads());
}
