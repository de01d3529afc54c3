// Attention with bfloat16 products in plain C++ (attn_bf16.hpp), for CPUs without AVX512-BF16: the
// same roundings and float32 sums as attn_bf16.cpp, slowly (tests and correctness).
#define EDGETUNE_ISA_NS attn_isa_generic
#define EDGETUNE_VBYTES 16
#include "kernels.hpp"
#include "attn_bf16.hpp"

namespace edgetune {
AttnBF16Kernels attn_bf16_generic() {
  namespace k = attn_isa_generic;
  return {"generic", k::JT, k::BR, k::attn_bf16_dp, k::attn_bf16_panels, k::attn_bf16_row_pairs,
          k::attn_bf16_work, k::attn_bf16_forward, k::attn_bf16_backward};
}
}  // namespace edgetune
