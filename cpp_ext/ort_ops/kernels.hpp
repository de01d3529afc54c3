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

// y = silu(g) * u
inline void swiglu(const float* g, const float* u, float* y, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const float s = sigmoid(g[i]);
    y[i] = g[i] * s * u[i];
  }
}

// dg = dy * u * silu'(g), du = dy * silu(g)
inline void swiglu_grad(const float* dy, const float* g, const float* u, float* dg, float* du, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const float s = sigmoid(g[i]);
    const float silu = g[i] * s;
    du[i] = dy[i] * silu;
    dg[i] = dy[i] * u[i] * (s + silu * (1.0f - s));
  }
}

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

// With xh = x * inv and g = dy * w: dx = inv * (g - xh * mean(g * xh)); dw += dy * xh (summed over rows).
inline void rmsnorm_grad(const float* dy, const float* x, const float* w, const float* inv, float* dx, float* dw,
                         size_t rows, size_t d) {
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
      for (size_t k = 0; k < d; ++k) dxr[k] = v * (gr[k] * w[k] - xr[k] * v * m);
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

inline FusedKernels kernels(const char* name) {
  FusedKernels k;
  k.name = name;
  k.swiglu = swiglu;
  k.swiglu_grad = swiglu_grad;
  k.rmsnorm = rmsnorm;
  k.rmsnorm_grad = rmsnorm_grad;
  k.rotary_row = rotary_row;
  return k;
}

}  // namespace EDGETUNE_ISA_NS
}  // namespace edgetune
