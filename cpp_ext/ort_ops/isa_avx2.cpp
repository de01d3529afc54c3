// The fused training kernels built for the avx2 instruction set (target flags: CMakeLists.txt).
#define EDGETUNE_ISA_NS fused_isa_avx2
#define EDGETUNE_VBYTES 32
#include "kernels.hpp"

namespace edgetune {
FusedKernels fused_avx2() { return fused_isa_avx2::kernels("avx2"); }
}  // namespace edgetune
