// The merge kernels built for the avx2 instruction set (target flags: CMakeLists.txt).
#define EDGETUNE_ISA_NS isa_avx2
#include "kernels.hpp"

namespace edgetune {
Ops ops_avx2() { return isa_avx2::ops("avx2"); }
}  // namespace edgetune
