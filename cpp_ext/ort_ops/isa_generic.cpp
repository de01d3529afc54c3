// The fused training kernels built for the generic instruction set (target flags: CMakeLists.txt).
#define EDGETUNE_ISA_NS fused_isa_generic
#define EDGETUNE_VBYTES 16
#include "kernels.hpp"

namespace edgetune {
FusedKernels fused_generic() { return fused_isa_generic::kernels("generic"); }
}  // namespace edgetune
