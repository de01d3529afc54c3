// The fused training kernels built for the avx512 instruction set (target flags: CMakeLists.txt).
#define EDGETUNE_ISA_NS fused_isa_avx512
#define EDGETUNE_VBYTES 64
// 32 registers: blocks of 8 query rows (16 accumulators in the score and output products).
#define EDGETUNE_BR 8
#include "kernels.hpp"

namespace edgetune {
FusedKernels fused_avx512() { return fused_isa_avx512::kernels("avx512"); }
}  // namespace edgetune
