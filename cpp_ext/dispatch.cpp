// Picks the widest build of the kernels this CPU runs, once per process; EDGETUNE_ISA forces one.
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "common.hpp"

namespace edgetune {

Ops ops_generic();
#if defined(EDGETUNE_X86)
Ops ops_avx2();
Ops ops_avx512();
Ops ops_avx512bf16();
#endif

const std::vector<Ops>& available_ops() {
  static const std::vector<Ops> all = [] {
    std::vector<Ops> v{ops_generic()};
#if defined(EDGETUNE_X86) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();  // libgcc's checks include the OS saving the wider registers (XGETBV)
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (avx2) v.push_back(ops_avx2());
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    if (avx512) v.push_back(ops_avx512());
    if (avx512 && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bf16")) v.push_back(ops_avx512bf16());
#endif
    return v;
  }();
  return all;
}

const Ops& selected_ops() {
  const auto& all = available_ops();
  const char* want = std::getenv("EDGETUNE_ISA");
  if (!want || !*want) return all.back();
  std::string names;
  for (const Ops& o : all) {
    if (want == std::string(o.name)) return o;
    names += std::string(names.empty() ? "" : ", ") + o.name;
  }
  throw std::invalid_argument("EDGETUNE_ISA=" + std::string(want) + " is not available on this CPU (available: " +
                              names + ")");
}

}  // namespace edgetune
