// The fused training kernels, compiled once per instruction set (isa_*.cpp define EDGETUNE_ISA_NS and
// the target flags come from CMakeLists.txt). Plain loops written so that the compiler vectorizes
// them: independent partial sums instead of one running sum, and an exp built from arithmetic.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "fused.hpp"

namespace edgetune {
namespace EDGETUNE_ISA_NS {

// Cephes' expf: relative error under 2e-7 over the clamped range, and vectorizable.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.3365447504f), 88.3762626647949f);
  const float fx = x * 1.44269504088896341f + 0.5f;
  // floor(fx) as a truncation of a positive number (fx > -126 after the clamp): a compare here
  // would keep the compiler from vectorizing the loops that call this.
  const float n = static_cast<float>(static_cast<int32_t>(fx + 128.0f)) - 128.0f;
  x = x - n * 0.693359375f - n * -2.12194440e-4f;
  float y = 1.9875691500E-4f;
  y = y * x + 1.3981999507E-3f;
  y = y * x + 8.3334519073E-3f;
  y = y * x + 4.1665795894E-2f;
  y = y * x + 1.6666665459E-1f;
  y = y * x + 5.0000001201E-1f;
  y = y * x * x + x + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return y * scale;
}

inline float sigmoid(float g) { return 1.0f / (1.0f + exp_approx(-g)); }

constexpr size_t LANES = 16;

inline float dot(const float* a, const float* b, size_t d) {
  float acc[LANES] = {};
  size_t i = 0;
  for (; i + LANES <= d; i += LANES)
    for (size_t j = 0; j < LANES; ++j) acc[j] += a[i + j] * b[i + j];
  float s = 0.0f;
  for (; i < d; ++i) s += a[i] * b[i];
  for (size_t j = 0; j < LANES; ++j) s += acc[j];
  return s;
}

// Row by row: inv = 1 / sqrt(mean(x^2) + eps), y = w * (x * inv).
inline void rmsnorm(const float* x, const float* w, float* y, float* inv, size_t rows, size_t d, float eps) {
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    float* yr = y + r * d;
    const float v = 1.0f / std::sqrt(dot(xr, xr, d) / static_cast<float>(d) + eps);
    inv[r] = v;
    for (size_t i = 0; i < d; ++i) yr[i] = w[i] * (xr[i] * v);
  }
}

// The residual add and the norm: s = a + b, then rmsnorm of s (each row added, then normalized
// while it is still in cache).
inline void add_rmsnorm(const float* a, const float* b, const float* w, float* y, float* inv, float* s, size_t rows,
                        size_t d, float eps) {
  for (size_t r = 0; r < rows; ++r) {
    const float *ar = a + r * d, *br = b + r * d;
    float* sr = s + r * d;
    for (size_t i = 0; i < d; ++i) sr[i] = ar[i] + br[i];
    rmsnorm(sr, w, y + r * d, inv + r, 1, d, eps);
  }
}

// With xh = x * inv and g = dy * w: dx = inv * (g - xh * mean(g * xh)) (+ dres, the gradient the
// normalized tensor's input gets from elsewhere, when given); dw += dy * xh (summed over rows, when given).
inline void rmsnorm_grad(const float* dy, const float* x, const float* w, const float* inv, const float* dres,
                         float* dx, float* dw, size_t rows, size_t d) {
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    const float* gr = dy + r * d;
    const float v = inv[r];
    float acc[LANES] = {};
    size_t i = 0;
    for (; i + LANES <= d; i += LANES)
      for (size_t j = 0; j < LANES; ++j) acc[j] += gr[i + j] * w[i + j] * xr[i + j];
    float s = 0.0f;
    for (; i < d; ++i) s += gr[i] * w[i] * xr[i];
    for (size_t j = 0; j < LANES; ++j) s += acc[j];
    const float m = s * v / static_cast<float>(d);  // mean(g * xh)
    if (dx) {
      float* dxr = dx + r * d;
      if (dres) {
        const float* rr = dres + r * d;
        for (size_t k = 0; k < d; ++k) dxr[k] = v * (gr[k] * w[k] - xr[k] * v * m) + rr[k];
      } else {
        for (size_t k = 0; k < d; ++k) dxr[k] = v * (gr[k] * w[k] - xr[k] * v * m);
      }
    }
    if (dw)
      for (size_t k = 0; k < d; ++k) dw[k] += gr[k] * xr[k] * v;
  }
}

// One row of rotate-half rotary embedding. Forward: y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2 (halves
// of the last axis). Backward (the transpose): dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1.
inline void rotary_row(const float* x, const float* c, const float* s, float* y, size_t d, bool backward) {
  const size_t h = d / 2;
  if (!backward) {
    for (size_t i = 0; i < h; ++i) y[i] = x[i] * c[i] - x[i + h] * s[i];
    for (size_t i = 0; i < h; ++i) y[i + h] = x[i + h] * c[i + h] + x[i] * s[i + h];
  } else {
    for (size_t i = 0; i < h; ++i) y[i] = x[i] * c[i] + x[i + h] * s[i + h];
    for (size_t i = 0; i < h; ++i) y[i + h] = x[i + h] * c[i + h] - x[i] * s[i];
  }
}

// Explicit vectors (GCC and Clang vector extensions) where auto-vectorization falls short: the
// attention kernels and SwiGLU. EDGETUNE_VBYTES (set by each isa_*.cpp) is the register width in bytes.
#if defined(__GNUC__)
#define EDGETUNE_VEC 1
typedef float vf __attribute__((vector_size(EDGETUNE_VBYTES)));
typedef float vfu __attribute__((vector_size(EDGETUNE_VBYTES), aligned(4)));  // unaligned access
constexpr size_t VW = EDGETUNE_VBYTES / 4;
inline vf vload(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void vstore(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
// a - 0 is a for every a (a + 0 is not, for a = -0), so the compiler emits a plain broadcast.
inline vf vsplat(float a) { return a - vf{}; }
typedef int32_t vi __attribute__((vector_size(EDGETUNE_VBYTES)));
// exp_approx on a whole register, the same steps in the same order.
inline vf vexp(vf x) {
  const vf lo = vsplat(-87.3365447504f), hi = vsplat(88.3762626647949f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vf fx = x * 1.44269504088896341f + 0.5f;
  const vi ni = __builtin_convertvector(fx + 128.0f, vi) - 128;
  const vf n = __builtin_convertvector(ni, vf);
  x = x - n * 0.693359375f - n * -2.12194440e-4f;
  vf y = vsplat(1.9875691500E-4f);
  y = y * x + 1.3981999507E-3f;
  y = y * x + 8.3334519073E-3f;
  y = y * x + 4.1665795894E-2f;
  y = y * x + 1.6666665459E-1f;
  y = y * x + 5.0000001201E-1f;
  y = y * x * x + x + 1.0f;
  const vi bits = (ni + 127) << 23;
  return y * reinterpret_cast<const vf&>(bits);
}
// Horizontal reductions as a tree of halvings, not a chain of VW dependent scalar steps: each step
// combines a vector's two halves (lane c with lane c + w), in registers.
typedef float vf4 __attribute__((vector_size(16)));
typedef float vf8 __attribute__((vector_size(32)));
template <typename H, typename V>
inline H half(const V& v, int which) {
  H h;
  std::memcpy(&h, reinterpret_cast<const char*>(&v) + which * sizeof(H), sizeof(H));
  return h;
}
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define EDGETUNE_SHUFFLE 1  // halves by lane selection (GCC 12+, Clang): the vector stays in registers
#endif
#endif
template <typename F>
inline float reduce(vf v, F f) {
#if EDGETUNE_VBYTES >= 64 && defined(EDGETUNE_SHUFFLE)
  const vf8 a = f(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
#elif EDGETUNE_VBYTES >= 64
  const vf8 a = f(half<vf8>(v, 0), half<vf8>(v, 1));
#elif EDGETUNE_VBYTES == 32
  const vf8 a = v;
#endif
#if EDGETUNE_VBYTES >= 32 && defined(EDGETUNE_SHUFFLE)
  const vf4 b = f(__builtin_shufflevector(a, a, 0, 1, 2, 3), __builtin_shufflevector(a, a, 4, 5, 6, 7));
#elif EDGETUNE_VBYTES >= 32
  const vf4 b = f(half<vf4>(a, 0), half<vf4>(a, 1));
#else
  const vf4 b = v;
#endif
  const float c0 = f(b[0], b[2]), c1 = f(b[1], b[3]);
  return f(c0, c1);
}
inline float hmax(vf v) {
  return reduce(v, [](auto lo, auto hi) { return hi > lo ? hi : lo; });
}
inline float hsum(vf v) {
  return reduce(v, [](auto lo, auto hi) { return lo + hi; });
}
#else
constexpr size_t VW = 4;
#endif

// SwiGLU and its gradient on g and u in float32 or in bfloat16 (MatMulBF16Round's outputs, widened
// exactly as they are read): y = silu(g) u; dg = dy u silu'(g), du = dy silu(g). Where the build
// has vectors every value takes the same register steps (the tail through a zero-padded register),
// so the float32 and bfloat16 forms of the same values give the same bits.
inline float widen(float x) { return x; }
inline float widen(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#if defined(EDGETUNE_VEC)
typedef uint32_t vu __attribute__((vector_size(EDGETUNE_VBYTES)));
typedef uint16_t vh __attribute__((vector_size(EDGETUNE_VBYTES / 2), aligned(2)));  // half a register of bfloat16
inline vf vwiden(const float* p) { return vload(p); }
inline vf vwiden(const uint16_t* p) {
  const vu w = __builtin_convertvector(*reinterpret_cast<const vh*>(p), vu) << 16;
  vf f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}

inline void swiglu_reg(vf g, vf u, float* y) {
  const vf s = 1.0f / (1.0f + vexp(-g));
  vstore(y, g * s * u);
}

inline void swiglu_grad_reg(vf dy, vf g, vf u, float* dg, float* du) {
  const vf s = 1.0f / (1.0f + vexp(-g));
  const vf silu = g * s;
  vstore(du, dy * silu);
  vstore(dg, dy * u * (s + silu * (1.0f - s)));
}

template <typename T>
inline void swiglu_t(const T* g, const T* u, float* y, size_t n) {
  size_t i = 0;
  for (; i + VW <= n; i += VW) swiglu_reg(vwiden(g + i), vwiden(u + i), y + i);
  if (i < n) {
    T gt[VW] = {}, ut[VW] = {};
    float yt[VW];
    std::memcpy(gt, g + i, (n - i) * sizeof(T));
    std::memcpy(ut, u + i, (n - i) * sizeof(T));
    swiglu_reg(vwiden(gt), vwiden(ut), yt);
    std::memcpy(y + i, yt, (n - i) * sizeof(float));
  }
}

template <typename T>
inline void swiglu_grad_t(const float* dy, const T* g, const T* u, float* dg, float* du, size_t n) {
  size_t i = 0;
  for (; i + VW <= n; i += VW) swiglu_grad_reg(vwiden(dy + i), vwiden(g + i), vwiden(u + i), dg + i, du + i);
  if (i < n) {
    T gt[VW] = {}, ut[VW] = {};
    float dyt[VW] = {}, dgt[VW], dut[VW];
    std::memcpy(dyt, dy + i, (n - i) * sizeof(float));
    std::memcpy(gt, g + i, (n - i) * sizeof(T));
    std::memcpy(ut, u + i, (n - i) * sizeof(T));
    swiglu_grad_reg(vwiden(dyt), vwiden(gt), vwiden(ut), dgt, dut);
    std::memcpy(dg + i, dgt, (n - i) * sizeof(float));
    std::memcpy(du + i, dut, (n - i) * sizeof(float));
  }
}
#else
template <typename T>
inline void swiglu_t(const T* g, const T* u, float* y, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const float gi = widen(g[i]), s = sigmoid(gi);
    y[i] = gi * s * widen(u[i]);
  }
}

template <typename T>
inline void swiglu_grad_t(const float* dy, const T* g, const T* u, float* dg, float* du, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const float gi = widen(g[i]), s = sigmoid(gi), silu = gi * s;
    du[i] = dy[i] * silu;
    dg[i] = dy[i] * widen(u[i]) * (s + silu * (1.0f - s));
  }
}
#endif

inline void swiglu(const float* g, const float* u, float* y, size_t n) { swiglu_t(g, u, y, n); }
inline void swiglu_grad(const float* dy, const float* g, const float* u, float* dg, float* du, size_t n) {
  swiglu_grad_t(dy, g, u, dg, du, n);
}
inline void swiglu_bf16(const uint16_t* g, const uint16_t* u, float* y, size_t n) { swiglu_t(g, u, y, n); }
inline void swiglu_bf16_grad(const float* dy, const uint16_t* g, const uint16_t* u, float* dg, float* du, size_t n) {
  swiglu_grad_t(dy, g, u, dg, du, n);
}

// dot() for the attention's rows: sums in whole registers, reduced by halvings at the end.
inline float row_dot(const float* a, const float* b, size_t d) {
  size_t i = 0;
  float s = 0.0f;
#if defined(EDGETUNE_VEC)
  vf acc[2] = {};
  for (; i + 2 * VW <= d; i += 2 * VW) {
    acc[0] += vload(a + i) * vload(b + i);
    acc[1] += vload(a + i + VW) * vload(b + i + VW);
  }
  s = hsum(acc[0] + acc[1]);
#endif
  for (; i < d; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float a, const float* __restrict x, float* __restrict y, size_t d) {
  size_t i = 0;
#if defined(EDGETUNE_VEC)
  const vf av = vsplat(a);
  for (; i + VW <= d; i += VW) vstore(y + i, vload(y + i) + av * vload(x + i));
#endif
  for (; i < d; ++i) y[i] += a * x[i];
}

// -- LoRA: u = scale (x A^T) B^T and its gradients, A [r, K], B [N, r] (Bt = B^T [r, N], made once
// per call), for blocks of at most LORA_BLOCK rows. The rank is small (4 to 64), so the products are
// thin; each is blocked in registers so that a loaded value feeds several multiply-adds: the
// multiply-adds, not the loads, set the pace.
constexpr size_t LORA_BLOCK = 32;
#if defined(EDGETUNE_VEC)
constexpr size_t LORA_RB = EDGETUNE_VBYTES >= 64 ? 4 : 2;  // rows per register block (16 registers on AVX2)
constexpr size_t LORA_JB = EDGETUNE_VBYTES >= 64 ? 8 : 4;     // rank columns per register block
#endif

// out[i][j] = alpha * (X_i . W_j) for i < R, j < r (X [R, L], W [r, L], out [R, r]).
inline void lora_dots(const float* X, size_t R, size_t L, const float* W, size_t r, float alpha, float* out) {
  size_t i = 0;
#if defined(EDGETUNE_VEC)
  constexpr size_t RB = LORA_RB;
  for (; i + RB <= R; i += RB) {
    size_t j = 0;
    for (; j + 4 <= r; j += 4) {
      vf acc[RB][4] = {};
      size_t k = 0;
      for (; k + VW <= L; k += VW) {
        vf xv[RB], wv[4];
        for (size_t t = 0; t < RB; ++t) xv[t] = vload(X + (i + t) * L + k);
        for (size_t u = 0; u < 4; ++u) wv[u] = vload(W + (j + u) * L + k);
        for (size_t t = 0; t < RB; ++t)
          for (size_t u = 0; u < 4; ++u) acc[t][u] += xv[t] * wv[u];
      }
      for (size_t t = 0; t < RB; ++t)
        for (size_t u = 0; u < 4; ++u) {
          float sum = hsum(acc[t][u]);
          for (size_t kk = k; kk < L; ++kk) sum += X[(i + t) * L + kk] * W[(j + u) * L + kk];
          out[(i + t) * r + j + u] = alpha * sum;
        }
    }
    for (; j < r; ++j)
      for (size_t t = 0; t < RB; ++t) out[(i + t) * r + j] = alpha * dot(X + (i + t) * L, W + j * L, L);
  }
#endif
  for (; i < R; ++i)
    for (size_t j = 0; j < r; ++j) out[i * r + j] = alpha * dot(X + i * L, W + j * L, L);
}

// Y_i = sum over j < r of c[i][j] T_j for i < R (c [R, r], T [r, L], Y [R, L]); with ACC, that sum
// is added to Y_i.
template <bool ACC = false>
inline void lora_combine(const float* c, size_t R, size_t r, const float* T, size_t L, float* Y) {
  size_t i = 0;
#if defined(EDGETUNE_VEC)
  constexpr size_t RB = LORA_RB;
  for (; i + RB <= R; i += RB) {
    size_t n = 0;
    for (; n + 2 * VW <= L; n += 2 * VW) {
      vf acc[RB][2] = {};
      if (ACC)
        for (size_t t = 0; t < RB; ++t) {
          acc[t][0] = vload(Y + (i + t) * L + n);
          acc[t][1] = vload(Y + (i + t) * L + n + VW);
        }
      for (size_t j = 0; j < r; ++j) {
        const vf b0 = vload(T + j * L + n), b1 = vload(T + j * L + n + VW);
        for (size_t t = 0; t < RB; ++t) {
          const vf cv = vsplat(c[(i + t) * r + j]);
          acc[t][0] += cv * b0;
          acc[t][1] += cv * b1;
        }
      }
      for (size_t t = 0; t < RB; ++t) {
        vstore(Y + (i + t) * L + n, acc[t][0]);
        vstore(Y + (i + t) * L + n + VW, acc[t][1]);
      }
    }
    for (; n < L; ++n)
      for (size_t t = 0; t < RB; ++t) {
        float a = ACC ? Y[(i + t) * L + n] : 0.0f;
        for (size_t j = 0; j < r; ++j) a += c[(i + t) * r + j] * T[j * L + n];
        Y[(i + t) * L + n] = a;
      }
  }
#endif
  for (; i < R; ++i)
    for (size_t n = 0; n < L; ++n) {
      float a = ACC ? Y[i * L + n] : 0.0f;
      for (size_t j = 0; j < r; ++j) a += c[i * r + j] * T[j * L + n];
      Y[i * L + n] = a;
    }
}

// Y += c T (c [R, r], T [r, L], Y [R, L]): a low-rank term added to a product's rows.
inline void lora_add(const float* c, size_t R, size_t r, const float* T, size_t L, float* Y) {
  lora_combine<true>(c, R, r, T, L, Y);
}

#if defined(EDGETUNE_VEC)
// lora_outer for rank columns [j, j + JB): each register pair of acc takes all R rows' products
// before it is stored.
template <size_t JB>
inline void lora_outer_cols(const float* c, size_t R, size_t r, size_t j, const float* X, size_t L, float* acc,
                            size_t& l_done) {
  size_t l = 0;
  for (; l + 2 * VW <= L; l += 2 * VW) {
    vf a[JB][2];
    for (size_t u = 0; u < JB; ++u) {
      a[u][0] = vload(acc + (j + u) * L + l);
      a[u][1] = vload(acc + (j + u) * L + l + VW);
    }
    for (size_t i = 0; i < R; ++i) {
      const vf x0 = vload(X + i * L + l), x1 = vload(X + i * L + l + VW);
      for (size_t u = 0; u < JB; ++u) {
        const vf cv = vsplat(c[i * r + j + u]);
        a[u][0] += cv * x0;
        a[u][1] += cv * x1;
      }
    }
    for (size_t u = 0; u < JB; ++u) {
      vstore(acc + (j + u) * L + l, a[u][0]);
      vstore(acc + (j + u) * L + l + VW, a[u][1]);
    }
  }
  l_done = l;
}
#endif

// acc_j += sum over i < R of c[i][j] X_i for j < r (c [R, r], X [R, L], acc [r, L]).
inline void lora_outer(const float* c, size_t R, size_t r, const float* X, size_t L, float* acc) {
  size_t j = 0;
#if defined(EDGETUNE_VEC)
  for (; j + LORA_JB <= r; j += LORA_JB) {
    size_t l = 0;
    lora_outer_cols<LORA_JB>(c, R, r, j, X, L, acc, l);
    for (; l < L; ++l)
      for (size_t u = 0; u < LORA_JB; ++u) {
        float v = acc[(j + u) * L + l];
        for (size_t i = 0; i < R; ++i) v += c[i * r + j + u] * X[i * L + l];
        acc[(j + u) * L + l] = v;
      }
  }
#endif
  for (; j < r; ++j)
    for (size_t l = 0; l < L; ++l) {
      float v = acc[j * L + l];
      for (size_t i = 0; i < R; ++i) v += c[i * r + j] * X[i * L + l];
      acc[j * L + l] = v;
    }
}

// Rows [0, rows) (rows <= LORA_BLOCK) of the forward pass: h = x A^T, u = (scale h) Bt (u only
// when given).
inline void lora_forward(const float* x, size_t rows, size_t K, const float* A, size_t r, const float* Bt, size_t N,
                         float scale, float* h, float* u) {
  float sh[LORA_BLOCK * 64];
  lora_dots(x, rows, K, A, r, 1.0f, h);
  if (!u) return;
  for (size_t t = 0; t < rows * r; ++t) sh[t] = scale * h[t];
  lora_combine(sh, rows, r, Bt, N, u);
}

// Rows [0, rows) (rows <= LORA_BLOCK) of the backward pass: g = scale du Bt^T (into g [rows, r]),
// dx = g A (when dx is given), and this block's parts of dA += g^T x ([r, K]) and dBt += (scale h)^T du ([r, N]).
inline void lora_backward(const float* du, const float* x, const float* h, size_t rows, size_t K, size_t N,
                          const float* A, size_t r, const float* Bt, float scale, float* g, float* dx, float* dA,
                          float* dBt) {
  float sh[LORA_BLOCK * 64];
  lora_dots(du, rows, N, Bt, r, scale, g);
  if (dx) lora_combine(g, rows, r, A, K, dx);
  lora_outer(g, rows, r, x, K, dA);
  for (size_t t = 0; t < rows * r; ++t) sh[t] = scale * h[t];
  lora_outer(sh, rows, r, du, N, dBt);
}

constexpr float MASKED = -1e30f;  // an additive mask entry at or below this excludes the key
#ifndef EDGETUNE_BR
#define EDGETUNE_BR 4
#endif
constexpr size_t BR = EDGETUNE_BR;  // query rows per block (a define, so a build can measure others)
constexpr size_t JT = 2 * VW;      // keys per tile of the score microkernel

// out[r][j] = scale * sum_d a[r][d] * b[j][d] for r < BR and j < jn (jn a multiple of JT). bt holds b
// in panels of JT keys, each transposed to D x JT and stored whole (panel t at bt + t * D * JT, its
// row d at + d * JT), zero-padded past the last key, so the microkernel reads it in order. The
// BR x JT accumulators stay in registers.
inline void block_scores(const float* a, const float* bt, float* out, size_t ldo, size_t jn, size_t D, float scale) {
  for (size_t jt = 0; jt < jn; jt += JT) {
    const float* panel = bt + jt * D;
#if defined(EDGETUNE_VEC)
    vf acc[BR][2] = {};
    for (size_t d = 0; d < D; ++d) {
      const float* b = panel + d * JT;
      const vf b0 = vload(b), b1 = vload(b + VW);
      for (size_t r = 0; r < BR; ++r) {
        const vf av = vsplat(a[r * D + d]);
        acc[r][0] += av * b0;
        acc[r][1] += av * b1;
      }
    }
    const vf sc = vsplat(scale);
    for (size_t r = 0; r < BR; ++r) {
      vstore(out + r * ldo + jt, acc[r][0] * sc);
      vstore(out + r * ldo + jt + VW, acc[r][1] * sc);
    }
#else
    float acc[BR][JT] = {};
    for (size_t d = 0; d < D; ++d)
      for (size_t r = 0; r < BR; ++r)
        for (size_t c = 0; c < JT; ++c) acc[r][c] += a[r * D + d] * panel[d * JT + c];
    for (size_t r = 0; r < BR; ++r)
      for (size_t c = 0; c < JT; ++c) out[r * ldo + jt + c] = acc[r][c] * scale;
#endif
  }
}

// out[r][:] = sum_{j < jn} w[r][j] * x[j][:] for r < BR (w[r][j] at w[r ld + j js]; x and out rows of
// D), or out[r][:] += that with add: the block's BR x JT output columns stay in registers while the
// keys stream past.
inline void block_pv(const float* w, size_t ld, const float* x, size_t jn, size_t D, float* out, bool add = false,
                     size_t js = 1) {
  size_t d0 = 0;
#if defined(EDGETUNE_VEC)
  for (; d0 + JT <= D; d0 += JT) {
    vf acc[BR][2] = {};
    if (add)
      for (size_t r = 0; r < BR; ++r) {
        acc[r][0] = vload(out + r * D + d0);
        acc[r][1] = vload(out + r * D + d0 + VW);
      }
    for (size_t j = 0; j < jn; ++j) {
      const vf x0 = vload(x + j * D + d0), x1 = vload(x + j * D + d0 + VW);
      for (size_t r = 0; r < BR; ++r) {
        const vf wr = vsplat(w[r * ld + j * js]);
        acc[r][0] += wr * x0;
        acc[r][1] += wr * x1;
      }
    }
    for (size_t r = 0; r < BR; ++r) {
      vstore(out + r * D + d0, acc[r][0]);
      vstore(out + r * D + d0 + VW, acc[r][1]);
    }
  }
#endif
  for (size_t r = 0; r < BR; ++r)
    for (size_t d = d0; d < D; ++d) {
      float a = add ? out[r * D + d] : 0.0f;
      for (size_t j = 0; j < jn; ++j) a += w[r * ld + j * js] * x[j * D + d];
      out[r * D + d] = a;
    }
}

// y[j][:] += sum_{r < BR} w[r][j] * a[r][:] for j < jn: each key's row is read and written once per
// block, with the block's BR rows of a held in registers. KU keys at a time, so that 2 * KU sums are
// in flight rather than two chains of BR dependent multiply-adds (each key's terms still add in
// row order, so the result does not depend on KU).
constexpr size_t KU = VW >= 16 ? 4 : 2;
inline void block_outer(const float* w, size_t ld, const float* a, size_t jn, size_t D, float* y) {
  size_t d0 = 0;
#if defined(EDGETUNE_VEC)
  for (; d0 + JT <= D; d0 += JT) {
    vf ar[BR][2];
    for (size_t r = 0; r < BR; ++r) {
      ar[r][0] = vload(a + r * D + d0);
      ar[r][1] = vload(a + r * D + d0 + VW);
    }
    size_t j = 0;
    for (; j + KU <= jn; j += KU) {
      vf acc[KU][2];
      for (size_t u = 0; u < KU; ++u) {
        acc[u][0] = vload(y + (j + u) * D + d0);
        acc[u][1] = vload(y + (j + u) * D + d0 + VW);
      }
      for (size_t r = 0; r < BR; ++r)
        for (size_t u = 0; u < KU; ++u) {
          const vf wr = vsplat(w[r * ld + j + u]);
          acc[u][0] += wr * ar[r][0];
          acc[u][1] += wr * ar[r][1];
        }
      for (size_t u = 0; u < KU; ++u) {
        vstore(y + (j + u) * D + d0, acc[u][0]);
        vstore(y + (j + u) * D + d0 + VW, acc[u][1]);
      }
    }
    for (; j < jn; ++j) {
      vf y0 = vload(y + j * D + d0), y1 = vload(y + j * D + d0 + VW);
      for (size_t r = 0; r < BR; ++r) {
        const vf wr = vsplat(w[r * ld + j]);
        y0 += wr * ar[r][0];
        y1 += wr * ar[r][1];
      }
      vstore(y + j * D + d0, y0);
      vstore(y + j * D + d0 + VW, y1);
    }
  }
#endif
  for (size_t j = 0; j < jn; ++j)
    for (size_t d = d0; d < D; ++d) {
      float acc = y[j * D + d];
      for (size_t r = 0; r < BR; ++r) acc += w[r * ld + j] * a[r * D + d];
      y[j * D + d] = acc;
    }
}

// Softmax weights of keys [j0, jn) of one score row in place (masked keys -> 0; the callers read no
// key past jn), exactly as the forward pass computes them: the backward pass recomputes them the
// same way rather than from a saved log-sum-exp, whose difference with a large score would lose the
// weights' low bits. A row whose every key is masked gets uniform weights over all S keys, as a
// plain softmax over the equal masked scores does. softmax_exp_row leaves the exponentials and
// returns the factor that normalizes them (1 for the uniform row), for a caller that multiplies by
// it in a pass of its own (the same bits as softmax_row's weights).
inline float softmax_exp_row(float* p, const float* mrow, size_t j0, size_t jn, size_t S) {
  // A masked key holds -3e38 until it is zeroed. The maximum and the sum run in lanes, in
  // registers where the build has vectors.
  float m = -3.0e38f, total = 0.0f;
  bool any = false;
  size_t j = j0;
#if defined(EDGETUNE_VEC)
  const vf masked = vsplat(MASKED), floor = vsplat(-3.0e38f);
  vf mx = floor;
  vi open = {};
  for (; j + VW <= jn; j += VW) {
    const vf mr = vload(mrow + j);
    const vi seen = mr > masked;
    const vf x = seen ? vload(p + j) + mr : floor;
    vstore(p + j, x);
    mx = x > mx ? x : mx;
    open |= seen;
  }
  m = hmax(mx);
  for (size_t l = 0; l < VW; ++l) any = any || open[l] != 0;
#endif
  for (; j < jn; ++j) {
    const float x = mrow[j] > MASKED ? p[j] + mrow[j] : -3.0e38f;
    any = any || mrow[j] > MASKED;
    p[j] = x;
    m = x > m ? x : m;
  }
  if (!any) {
    for (size_t i = 0; i < S; ++i) p[i] = 1.0f / static_cast<float>(S);
    return 1.0f;
  }
  j = j0;
#if defined(EDGETUNE_VEC)
  const vf mv = vsplat(m);
  vf sum = {};
  for (; j + VW <= jn; j += VW) {
    const vf e = vexp(vload(p + j) - mv);
    const vf x = vload(mrow + j) > masked ? e : vf{};
    vstore(p + j, x);
    sum += x;
  }
  total = hsum(sum);
#endif
  for (; j < jn; ++j) {
    const float e = mrow[j] > MASKED ? exp_approx(p[j] - m) : 0.0f;
    p[j] = e;
    total += e;
  }
  return 1.0f / total;
}

inline void softmax_row(float* p, const float* mrow, size_t j0, size_t jn, size_t S) {
  const float inv = softmax_exp_row(p, mrow, j0, jn, S);
  for (size_t i = j0; i < jn; ++i) p[i] *= inv;
}

#if defined(EDGETUNE_VEC)
// The lane-wise largest of the four registers from p.
inline vf vmax4(const float* p) {
  const vf a = vload(p), b = vload(p + VW), c = vload(p + 2 * VW), d = vload(p + 3 * VW);
  const vf ab = a > b ? a : b, cd = c > d ? c : d;
  return ab > cd ? ab : cd;
}
#endif

// One past the last key a mask row lets through (0 when none), and the first one below `end` (`end`
// when none): a causal row masks half its keys, so the scans step whole registers (four per
// horizontal reduction while all are masked, then one).
inline size_t last_seen(const float* m, size_t S) {
  size_t last = S;
#if defined(EDGETUNE_VEC)
  while (last >= 4 * VW && hmax(vmax4(m + last - 4 * VW)) <= MASKED) last -= 4 * VW;
  while (last >= VW) {
    if (hmax(vload(m + last - VW)) > MASKED) break;
    last -= VW;
  }
#endif
  while (last > 0 && m[last - 1] <= MASKED) --last;
  return last;
}

inline size_t first_seen(const float* m, size_t end) {
  size_t first = 0;
#if defined(EDGETUNE_VEC)
  while (first + 4 * VW <= end && hmax(vmax4(m + first)) <= MASKED) first += 4 * VW;
  while (first + VW <= end) {
    if (hmax(vload(m + first)) > MASKED) break;
    first += VW;
  }
#endif
  while (first < end && m[first] <= MASKED) ++first;
  return first;
}

// The keys each query row sees, from its mask row: ext[2i] the first open key (S when none),
// ext[2i + 1] one past the last (0 when none). The ops compute them once per mask, for every head.
inline void attn_extents(const float* mask, size_t mstride, size_t rows, size_t S, uint32_t* ext) {
  for (size_t i = 0; i < rows; ++i) {
    const float* m = mask + i * mstride;
    const size_t last = last_seen(m, S);
    ext[2 * i] = static_cast<uint32_t>(last ? first_seen(m, last) : S);
    ext[2 * i + 1] = static_cast<uint32_t>(last);
  }
}

// The keys a block of query rows can see: one past the last unmasked key of any of its rows
// (causal attention skips the rest), rounded up to whole units of keys (tiles, or the bfloat16
// kernels' half tiles); S rounded up when a row sees none, which makes that row uniform over all S.
inline size_t block_extent(const uint32_t* ext, size_t nr, size_t S, bool* all_masked, size_t unit = JT) {
  size_t jn = 0;
  *all_masked = false;
  for (size_t r = 0; r < nr; ++r) {
    const size_t last = ext[2 * r + 1];
    if (last == 0) *all_masked = true;
    jn = last > jn ? last : jn;
  }
  if (*all_masked) jn = S;
  return (jn + unit - 1) / unit * unit;
}

// The first key any row of the block sees, rounded down to a whole unit: with several records
// packed into one row (a block-diagonal mask), the keys of the records before the block's are
// skipped as causal attention skips those after it. 0 when a row sees none.
inline size_t block_start(const uint32_t* ext, size_t nr, size_t jn, bool all_masked, size_t unit = JT) {
  if (all_masked) return 0;
  size_t j0 = jn;
  for (size_t r = 0; r < nr; ++r) j0 = ext[2 * r] < j0 ? ext[2 * r] : j0;
  return j0 / unit * unit;
}

// A block of query rows from i0 (of the rows before r1): nr rows; keys [j0, jn) in whole units
// (block_start, block_extent); lim = min(jn, S); none: a row sees no key.
struct QueryBlock {
  size_t nr, j0, jn, lim;
  bool none;
};

inline QueryBlock query_block(const uint32_t* ext, size_t i0, size_t r1, size_t S, size_t unit = JT) {
  QueryBlock b{};
  b.nr = r1 - i0 < BR ? r1 - i0 : BR;
  b.jn = block_extent(ext + 2 * i0, b.nr, S, &b.none, unit);
  b.j0 = block_start(ext + 2 * i0, b.nr, b.jn, b.none, unit);
  b.lim = b.jn < S ? b.jn : S;  // S where a row sees no key
  return b;
}

// The softmax weights of a block's rows in place over keys [j0, lim) (softmax_row), rows from nr on
// zero; mask: the block's first mask row. With inv, the rows are left as softmax_exp_row leaves
// them and inv[r] is the factor of row r (1 for the zero rows).
inline void block_softmax(float* p, size_t ld, const float* mask, size_t mstride, size_t nr, size_t j0, size_t lim,
                          size_t S, float* inv = nullptr) {
  for (size_t r = 0; r < BR; ++r) {
    float* pr = p + r * ld;
    if (r < nr) {
      if (inv)
        inv[r] = softmax_exp_row(pr, mask + r * mstride, j0, lim, S);
      else
        softmax_row(pr, mask + r * mstride, j0, lim, S);
    } else {
      for (size_t j = j0; j < lim; ++j) pr[j] = 0.0f;
      if (inv) inv[r] = 1.0f;
    }
  }
}

// a[:d] *= f, then the sum of a[i] b[i] as row_dot sums it (the normalization of a softmax row and
// its product with the row of the gradient in one pass).
inline float scaled_dot(float* a, float f, const float* b, size_t d) {
  size_t i = 0;
  float s = 0.0f;
#if defined(EDGETUNE_VEC)
  const vf fv = vsplat(f);
  vf acc[2] = {};
  for (; i + 2 * VW <= d; i += 2 * VW) {
    const vf x0 = vload(a + i) * fv, x1 = vload(a + i + VW) * fv;
    vstore(a + i, x0);
    vstore(a + i + VW, x1);
    acc[0] += x0 * vload(b + i);
    acc[1] += x1 * vload(b + i + VW);
  }
  s = hsum(acc[0] + acc[1]);
#endif
  for (; i < d; ++i) {
    a[i] *= f;
    s += a[i] * b[i];
  }
  return s;
}

// The backward pass's block: p as the forward pass had it (block_softmax), then ds = p (dp -
// rowsum(p dp)) * scale in place of dp, over keys [j0, upto); rows from nr on zero in both.
inline void block_softmax_grad(float* p, float* dp, size_t ld, const float* mask, size_t mstride, size_t nr,
                               size_t j0, size_t lim, size_t upto, size_t S, float scale) {
  for (size_t r = 0; r < BR; ++r) {
    float* pr = p + r * ld;
    float* dpr = dp + r * ld;
    if (r >= nr) {
      for (size_t j = j0; j < upto; ++j) pr[j] = dpr[j] = 0.0f;
      continue;
    }
    // upto is lim, or S for a row of uniform weights (whose factor is 1)
    const float inv = softmax_exp_row(pr, mask + r * mstride, j0, lim, S);
    const float di = scaled_dot(pr + j0, inv, dpr + j0, upto - j0);
    for (size_t j = j0; j < upto; ++j) dpr[j] = pr[j] * (dpr[j] - di) * scale;
  }
}

// The keys [a0, a1) that any of a block's nr rows sees (ext: the block's first row's extents); all S
// where a row sees none (none, from block_extent).
inline void block_keys(const uint32_t* ext, size_t nr, bool none, size_t S, size_t* a0, size_t* a1) {
  *a0 = 0, *a1 = S;
  if (none) return;
  *a0 = S, *a1 = 0;
  for (size_t r = 0; r < nr; ++r) {
    *a0 = ext[2 * r] < *a0 ? ext[2 * r] : *a0;
    *a1 = ext[2 * r + 1] > *a1 ? ext[2 * r + 1] : *a1;
  }
}

// One (batch, head): o = softmax(q k^T * scale + mask) v for the query rows [r0, r1), by blocks of
// query rows, never holding S x S; o's rows ldo floats apart (D, or H * D in [B, S, H, D]). kt: k in
// transposed panels (block_scores); ld: S rounded up to JT; ext: the mask rows' extents
// (attn_extents); work: 3 * BR * ld + BR * D floats.
inline void attn_forward(const float* q, const float* kt, const float* v, size_t ld, const float* mask,
                         size_t mstride, const uint32_t* ext, size_t r0, size_t r1, float* o, size_t ldo, size_t S,
                         size_t D, float scale, float* work) {
  float* p = work;
  float* qb = work + BR * ld;
  for (size_t i0 = r0; i0 < r1; i0 += BR) {
    const QueryBlock blk = query_block(ext, i0, r1, S);
    const size_t nr = blk.nr, jn = blk.jn, j0 = blk.j0, lim = blk.lim;
    for (size_t x = 0; x < BR * D; ++x) qb[x] = x < nr * D ? q[i0 * D + x] : 0.0f;
    block_scores(qb, kt + j0 * D, p + j0, ld, jn - j0, D, scale);
    block_softmax(p, ld, mask + i0 * mstride, mstride, nr, j0, lim, S);
    // o[r] = sum_j p[r][j] v[j], each v row read once for the block's rows
    float* ob = qb;
    block_pv(p + j0, ld, v + j0 * D, lim - j0, D, ob);
    for (size_t r = 0; r < nr; ++r)
      for (size_t x = 0; x < D; ++x) o[(i0 + r) * ldo + x] = ob[r * D + x];
  }
}

// One (batch, head)'s backward for the query rows [r0, r1), adding into dk and dv (shared by the
// heads of a key/value group): dv += p^T do; dp = do v^T; ds = p (dp - rowsum(p dp));
// dq = ds k * scale; dk += ds^T q * scale. A block writes the dk and dv rows of the keys its rows
// see and no others, so row ranges whose rows see disjoint keys (packed records) can run at once.
// dout's rows are lddo floats apart (D, or H * D in [B, S, H, D]). work: 3 * BR * ld + BR * D floats.
inline void attn_backward(const float* dout, size_t lddo, const float* q, const float* k, const float* kt,
                          const float* vt, size_t ld, const float* mask, size_t mstride, const uint32_t* ext, size_t r0,
                          size_t r1, float* dq, float* dk, float* dv, size_t S, size_t D, float scale, float* work) {
  float* p = work;
  float* dp = work + BR * ld;
  float* ab = work + 2 * BR * ld;
  for (size_t i0 = r0; i0 < r1; i0 += BR) {
    const QueryBlock blk = query_block(ext, i0, r1, S);
    const size_t nr = blk.nr, jn = blk.jn, j0 = blk.j0, lim = blk.lim;
    const bool none = blk.none;
    for (size_t x = 0; x < BR * D; ++x) ab[x] = x < nr * D ? q[i0 * D + x] : 0.0f;
    block_scores(ab, kt + j0 * D, p + j0, ld, jn - j0, D, scale);
    for (size_t r = 0; r < BR; ++r)
      for (size_t x = 0; x < D; ++x) ab[r * D + x] = r < nr ? dout[(i0 + r) * lddo + x] : 0.0f;
    block_scores(ab, vt + j0 * D, dp + j0, ld, (none ? (S + JT - 1) / JT * JT : jn) - j0, D, 1.0f);
    const size_t upto = none ? S : lim;
    block_softmax_grad(p, dp, ld, mask + i0 * mstride, mstride, nr, j0, lim, upto, S, scale);
    // dq[r] = sum_j ds[r][j] k[j]; dk[j] += sum_r ds[r][j] q[r]; dv[j] += sum_r p[r][j] do[r]
    // (rows past nr have p = ds = 0 and zero q and do rows, so they add nothing), over the keys the
    // rows see: p = ds = 0 at the others, which the tiles of the scores include
    size_t a0, a1;
    block_keys(ext + 2 * i0, nr, none, S, &a0, &a1);
    const size_t nj = a1 - a0;
    block_outer(p + a0, ld, ab, nj, D, dv + a0 * D);  // ab still holds the block's dout rows
    for (size_t x = 0; x < BR * D; ++x) ab[x] = x < nr * D ? q[i0 * D + x] : 0.0f;
    block_outer(dp + a0, ld, ab, nj, D, dk + a0 * D);
    float* dqb = ab;
    block_pv(dp + a0, ld, k + a0 * D, nj, D, dqb);
    for (size_t x = 0; x < nr * D; ++x) dq[i0 * D + x] = dqb[x];
  }
}

// Floats of ce_head's work for n rows of D: h transposed (D x n'), a tile's scores (JT x n'), the
// running maxima, sums and rescale factors (3 n'), and BR rows of w or G zero-padded (BR x D), with
// n' = n rounded up to JT.
inline size_t ce_head_work(size_t n, size_t D) {
  const size_t np = (n + JT - 1) / JT * JT;
  return (D + JT + 3) * np + BR * D;
}

// Cross-entropy of n rows of h [n, D] against the vocabulary projection h w^T (w [V, D]), never
// holding the n x V logits: the vocabulary streams past in tiles of JT rows of w, read as stored,
// against the n rows transposed once (panels of JT rows, D x JT each), so each tile's scores come out
// by vocabulary entry (JT x n') and the online softmax (running maximum m and sum s per row) runs
// across rows, a register of rows at a time. loss[r] is logsumexp_v(h_r . w_v) - h_r . w_label(r);
// with G, also G[r] = sum_v softmax_v w_v - w_label(r), the gradient of loss[r] with respect to h_r,
// accumulated in the same pass (rescaled when a row's maximum grows, as FlashAttention's output is).
// A row whose label is `ignore` gives 0 and G[r] = 0. work: ce_head_work(n, D) floats.
inline void ce_head(const float* h, size_t n, size_t D, const float* w, size_t V, const int64_t* labels,
                    int64_t ignore, float* loss, float* G, float* work) {
  const size_t np = (n + JT - 1) / JT * JT;
  float* ht = work;              // [np / JT panels][D][JT]: h's rows transposed, zero past n
  float* sc = ht + D * np;       // [JT][np]: a tile's scores, then its softmax weights
  float* m = sc + JT * np;       // [np]
  float* s = m + np;             // [np]
  float* f = s + np;             // [np]: this tile's rescale factors
  float* pad = f + np;           // [BR][D]: a last tile's rows of w, or a last block's rows of G
  for (size_t t = 0; t < np; t += JT)
    for (size_t d = 0; d < D; ++d)
      for (size_t c = 0; c < JT; ++c) ht[t * D + d * JT + c] = t + c < n ? h[(t + c) * D + d] : 0.0f;
  for (size_t r = 0; r < np; ++r) m[r] = -3.0e38f, s[r] = 0.0f;
  if (G) std::fill(G, G + n * D, 0.0f);
  for (size_t v0 = 0; v0 < V; v0 += JT) {
    const size_t jn = V - v0 < JT ? V - v0 : JT;
    for (size_t j0 = 0; j0 < jn; j0 += BR) {  // BR vocabulary rows against every row of h
      const float* wr = w + (v0 + j0) * D;
      if (jn - j0 < BR) {
        for (size_t x = 0; x < BR * D; ++x) pad[x] = x < (jn - j0) * D ? wr[x] : 0.0f;
        wr = pad;
      }
      block_scores(wr, ht, sc + j0 * np, np, np, D, 1.0f);
    }
    // Online softmax down the tile's entries, a register of rows at a time.
    size_t r0 = 0;
#if defined(EDGETUNE_VEC)
    for (; r0 < np; r0 += VW) {
      vf mx = vload(m + r0);
      for (size_t j = 0; j < jn; ++j) {
        const vf x = vload(sc + j * np + r0);
        mx = x > mx ? x : mx;
      }
      const vf fr = vexp(vload(m + r0) - mx);
      vf sum = vload(s + r0) * fr;
      for (size_t j = 0; j < jn; ++j) {
        const vf e = vexp(vload(sc + j * np + r0) - mx);
        vstore(sc + j * np + r0, e);
        sum += e;
      }
      vstore(f + r0, fr);
      vstore(s + r0, sum);
      vstore(m + r0, mx);
    }
#endif
    for (size_t r = r0; r < np; ++r) {
      float mx = m[r];
      for (size_t j = 0; j < jn; ++j) mx = sc[j * np + r] > mx ? sc[j * np + r] : mx;
      f[r] = exp_approx(m[r] - mx);
      s[r] *= f[r];
      m[r] = mx;
      for (size_t j = 0; j < jn; ++j) {
        sc[j * np + r] = exp_approx(sc[j * np + r] - mx);
        s[r] += sc[j * np + r];
      }
    }
    if (G) {
      for (size_t r = 0; r < n; ++r)
        if (f[r] != 1.0f)
          for (size_t d = 0; d < D; ++d) G[r * D + d] *= f[r];
      for (size_t i0 = 0; i0 < n; i0 += BR) {
        const size_t nr = n - i0 < BR ? n - i0 : BR;
        if (nr == BR) {
          block_pv(sc + i0, 1, w + v0 * D, jn, D, G + i0 * D, true, np);
        } else {  // a partial block adds into its zero-padded copy, then back
          for (size_t x = 0; x < BR * D; ++x) pad[x] = x < nr * D ? G[i0 * D + x] : 0.0f;
          block_pv(sc + i0, 1, w + v0 * D, jn, D, pad, true, np);
          for (size_t x = 0; x < nr * D; ++x) G[i0 * D + x] = pad[x];
        }
      }
    }
  }
  for (size_t r = 0; r < n; ++r) {
    const int64_t lab = labels[r];
    if (lab == ignore) {
      loss[r] = 0.0f;
      if (G) std::fill(G + r * D, G + (r + 1) * D, 0.0f);
      continue;
    }
    const float* wl = w + static_cast<size_t>(lab) * D;
    loss[r] = m[r] + std::log(s[r]) - dot(h + r * D, wl, D);
    if (G) {
      float* gr = G + r * D;
      const float inv = 1.0f / s[r];
      for (size_t d = 0; d < D; ++d) gr[d] = gr[d] * inv - wl[d];
    }
  }
}

inline FusedKernels kernels(const char* name) {
  FusedKernels k;
  k.name = name;
  k.swiglu = swiglu;
  k.swiglu_grad = swiglu_grad;
  k.swiglu_bf16 = swiglu_bf16;
  k.swiglu_bf16_grad = swiglu_bf16_grad;
  k.lora_forward = lora_forward;
  k.lora_backward = lora_backward;
  k.lora_add = lora_add;
  k.lora_block = LORA_BLOCK;
  k.rmsnorm = rmsnorm;
  k.rmsnorm_grad = rmsnorm_grad;
  k.add_rmsnorm = add_rmsnorm;
  k.rotary_row = rotary_row;
  k.attn_extents = attn_extents;
  k.attn_forward = attn_forward;
  k.attn_backward = attn_backward;
  k.ce_head = ce_head;
  k.ce_head_work = ce_head_work;
  k.attn_tile = JT;
  k.attn_work_rows = 3 * BR;
  k.attn_block_rows = BR;
  return k;
}

}  // namespace EDGETUNE_ISA_NS
}  // namespace edgetune
