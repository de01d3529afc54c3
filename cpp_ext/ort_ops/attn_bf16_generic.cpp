// Attention with bfloat16 products in plain C++ (attn_bf16.hpp), for CPUs without AVX512-BF16: the
// same roundings and float32 sums as attn_bf16.cpp, slowly (tests and correctness).
#define EDGETUNE_ISA_NS attn_isa_generic
#define EDGETUNE_VBYTES 16
#include "kernels.hpp"
#include "attn_bf16.hpp"

namespace edgetune {
AttnBF16Kernels attn_bf16_generic() { return attn_isa_generic::attn_bf16_kernels("generic"); }
}  // namespace edgetune
