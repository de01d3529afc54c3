// The merge kernels built for the generic instruction set (target flags: CMakeLists.txt).
#define EDGETUNE_ISA_NS isa_generic
#include "kernels.hpp"

namespace edgetune {
Ops ops_generic() { return isa_generic::ops("generic"); }
}  // namespace edgetune
