// Attention with bfloat16 products on AVX512-BF16 (attn_bf16.hpp; target flags: CMakeLists.txt). Run
// only where avx512_bf16_usable(); attn_bf16_generic.cpp has the same sums for other CPUs.
#define EDGETUNE_ISA_NS attn_isa_avx512bf16
#define EDGETUNE_VBYTES 64
#define EDGETUNE_BR 8
#include "kernels.hpp"
#include "attn_bf16.hpp"

namespace edgetune {
AttnBF16Kernels attn_bf16_avx512bf16() { return attn_isa_avx512bf16::attn_bf16_kernels("avx512bf16"); }
}  // namespace edgetune
