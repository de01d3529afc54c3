// The merge kernels built for AVX-512 with its bfloat16 conversions (target flags: CMakeLists.txt).
#define EDGETUNE_ISA_NS isa_avx512bf16
#include "kernels.hpp"

namespace edgetune {
Ops ops_avx512bf16() { return isa_avx512bf16::ops("avx512bf16"); }
}  // namespace edgetune
