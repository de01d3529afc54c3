// The table of fused training kernels one instruction-set build provides (kernels.hpp), chosen at
// run time by ops.cpp.
#pragma once

#include <cstddef>
#include <cstdint>

namespace edgetune {

struct FusedKernels {
  const char* name;  // "generic", "avx2", "avx512"
  void (*swiglu)(const float* g, const float* u, float* y, size_t n);
  void (*swiglu_grad)(const float* dy, const float* g, const float* u, float* dg, float* du, size_t n);
  // the same on bfloat16 g and u (same bits as on their float32 values)
  void (*swiglu_bf16)(const uint16_t* g, const uint16_t* u, float* y, size_t n);
  void (*swiglu_bf16_grad)(const float* dy, const uint16_t* g, const uint16_t* u, float* dg, float* du, size_t n);
  // LoRA (kernels.hpp): rows of u = scale (x A^T) B^T (when u is given) with h = x A^T (r <= 64;
  // Bt = B^T [r, N]), and of its gradients: g = scale du B into g, dx = g A (when dx is given);
  // dA [r, K] and dBt [r, N] accumulate the rows' parts. lora_add: Y [R, L] += c [R, r] T [r, L].
  void (*lora_forward)(const float* x, size_t rows, size_t K, const float* A, size_t r, const float* Bt, size_t N,
                       float scale, float* h, float* u);
  void (*lora_backward)(const float* du, const float* x, const float* h, size_t rows, size_t K, size_t N,
                        const float* A, size_t r, const float* Bt, float scale, float* g, float* dx, float* dA,
                        float* dBt);
  void (*lora_add)(const float* c, size_t R, size_t r, const float* T, size_t L, float* Y);
  void (*rmsnorm)(const float* x, const float* w, float* y, float* inv, size_t rows, size_t d, float eps);
  // dres (optional) is added to dx; dw (optional) accumulates.
  void (*rmsnorm_grad)(const float* dy, const float* x, const float* w, const float* inv, const float* dres, float* dx,
                       float* dw, size_t rows, size_t d);
  // s = a + b, then rmsnorm of s.
  void (*add_rmsnorm)(const float* a, const float* b, const float* w, float* y, float* inv, float* s, size_t rows,
                      size_t d, float eps);
  void (*rotary_row)(const float* x, const float* c, const float* s, float* y, size_t d, bool backward);
  // Attention of one (batch, head); kt and vt are k and v in panels of attn_tile keys, each
  // transposed to D x attn_tile (ld: S rounded up to attn_tile, zero-padded); ext holds the keys
  // each query row sees (attn_extents, once per mask for all heads); both passes compute the query
  // rows [r0, r1) (the backward pass writes the dk and dv rows of the keys those rows see); work
  // holds attn_work_rows * ld + attn_block_rows * D floats. ldo and lddo: the row strides of o and
  // dout (D where they are [B, H, S, D], H * D where [B, S, H, D]).
  void (*attn_extents)(const float* mask, size_t mstride, size_t rows, size_t S, uint32_t* ext);
  void (*attn_forward)(const float* q, const float* kt, const float* v, size_t ld, const float* mask, size_t mstride,
                       const uint32_t* ext, size_t r0, size_t r1, float* o, size_t ldo, size_t S, size_t D,
                       float scale, float* work);
  void (*attn_backward)(const float* dout, size_t lddo, const float* q, const float* k, const float* kt,
                        const float* vt, size_t ld, const float* mask, size_t mstride, const uint32_t* ext, size_t r0,
                        size_t r1, float* dq, float* dk, float* dv, size_t S, size_t D, float scale, float* work);
  // Cross-entropy of n rows of h against the vocabulary projection h w^T, by tiles of the
  // vocabulary (kernels.hpp); G (optional) gets the gradient of each row's loss with respect to it.
  // work: ce_head_work(n, D) floats.
  void (*ce_head)(const float* h, size_t n, size_t D, const float* w, size_t V, const int64_t* labels, int64_t ignore,
                  float* loss, float* G, float* work);
  size_t (*ce_head_work)(size_t n, size_t D);
  size_t lora_block;      // most rows per lora_forward / lora_backward call
  size_t attn_tile;       // keys per tile (ld is a multiple of it)
  size_t attn_work_rows;  // work floats per ld
  size_t attn_block_rows;  // query rows per block
};

// Attention with bfloat16 products (attn_bf16.hpp): its layouts and the two passes, as the
// float32 ones above but for kt, vt (key panels) and vp, kp (row pairs) of bfloat16 values.
struct AttnBF16Kernels {
  const char* name;  // "avx512bf16", "generic"
  size_t attn_tile, attn_block_rows;
  size_t (*padded)(size_t D);  // the padded head size of the layouts
  void (*panels)(const float* x, size_t S, size_t D, size_t ld, uint16_t* out);
  void (*row_pairs)(const float* x, size_t n, size_t stride, size_t D, size_t total, uint16_t* out);
  size_t (*work)(size_t ld, size_t D, bool backward);
  void (*forward)(const float* q, const uint16_t* kt, const uint16_t* vp, size_t ld, const float* mask, size_t mstride,
                  const uint32_t* ext, size_t r0, size_t r1, float* o, size_t ldo, size_t S, size_t D, float scale,
                  float* work);
  void (*backward)(const float* dout, size_t lddo, const float* q, const uint16_t* kt, const uint16_t* vt,
                   const uint16_t* kp, size_t ld, const float* mask, size_t mstride, const uint32_t* ext, size_t r0,
                   size_t r1, float* dq, float* dk, float* dv, size_t S, size_t D, float scale, float* work);
};

FusedKernels fused_generic();
AttnBF16Kernels attn_bf16_generic();
AttnBF16Kernels attn_bf16_avx512bf16();  // only where avx512_bf16_usable()
#if defined(EDGETUNE_X86)
FusedKernels fused_avx2();
FusedKernels fused_avx512();
#endif

}  // namespace edgetune
