// Types shared by every instruction-set build of the kernels and by the dispatcher: plain data,
// no code, so one definition serves all of them.
#pragma once

#include <cstddef>
#include <functional>
#include <vector>

namespace edgetune {

enum class DType { F32, F16, BF16 };

// One adapter: A (r x cols) and B (rows x r), float32, row-major; its term is coef * B @ A.
struct Factor {
  const float* a;
  const float* b;
  size_t r;
  float coef;
};

// The kernels of one instruction set.
struct Ops {
  const char* name;    // "generic", "avx2", "avx512", "avx512bf16"
  size_t vector_floats;  // floats per vector register in its kernels
  // W += sum coef * B @ A; returns whether a non-finite value was written (before any 16-bit rounding).
  bool (*lora_merge)(void* w, size_t rows, size_t cols, const std::vector<Factor>& fs, DType dt, int threads);
  void (*dora_merge)(void* w, size_t rows, size_t cols, const std::vector<Factor>& fs, DType dt, const float* mag,
                     int threads);
  double (*peak_gflops)(int threads, size_t iters);
  double (*peak_bf16_gflops)(int threads, size_t iters);  // 0 without AVX512-BF16
};

// Runs fn(0) .. fn(n - 1) on a process-wide thread pool and the calling thread (pool.cpp).
void run_parallel(size_t n, const std::function<void(size_t)>& fn);

// Every build this CPU can run, widest last (dispatch.cpp).
const std::vector<Ops>& available_ops();
// The widest, or the one EDGETUNE_ISA names (generic, avx2, avx512, avx512bf16); throws if this CPU lacks it.
const Ops& selected_ops();

}  // namespace edgetune
