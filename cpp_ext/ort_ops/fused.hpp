// The table of fused training kernels one instruction-set build provides (kernels.hpp), chosen at
// run time by ops.cpp.
#pragma once

#include <cstddef>

namespace edgetune {

struct FusedKernels {
  const char* name;  // "generic", "avx2", "avx512"
  void (*swiglu)(const float* g, const float* u, float* y, size_t n);
  void (*swiglu_grad)(const float* dy, const float* g, const float* u, float* dg, float* du, size_t n);
  void (*rmsnorm)(const float* x, const float* w, float* y, float* inv, size_t rows, size_t d, float eps);
  void (*rmsnorm_grad)(const float* dy, const float* x, const float* w, const float* inv, float* dx, float* dw,
                       size_t rows, size_t d);
  void (*rotary_row)(const float* x, const float* c, const float* s, float* y, size_t d, bool backward);
};

FusedKernels fused_generic();
#if defined(EDGETUNE_X86)
FusedKernels fused_avx2();
FusedKernels fused_avx512();
#endif

}  // namespace edgetune
