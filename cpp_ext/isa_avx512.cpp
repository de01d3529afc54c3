// The merge kernels built for the avx512 instruction set (target flags: CMakeLists.txt).
#define EDGETUNE_ISA_NS isa_avx512
#include "kernels.hpp"

namespace edgetune {
Ops ops_avx512() { return isa_avx512::ops("avx512"); }
}  // namespace edgetune
