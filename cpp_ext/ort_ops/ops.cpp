// edgetune's fused training kernels as an ONNX Runtime custom-op library (domain "edgetune").
// Python loads it with SessionOptions.register_custom_ops_library; any other binding (C, C++, C#,
// Java) with its own RegisterCustomOpsLibrary call. Built on the versioned C API, so a library
// compiled against older headers runs in every later ONNX Runtime.
//
// Ops (float32; shapes in edgetune/device/fused.py):
//   SwiGLU(g, u[, after]) -> y                 y = silu(g) * u
//   SwiGLUGrad(dy, g, u) -> dg, du
//   RMSNorm(x, w[, after]; epsilon) -> y, inv_rms
//                                             over the last axis
//   RMSNormGrad(dy, x, w, inv_rms) -> dx, dw
//   AddRMSNorm(a, b, w; epsilon) -> y, inv_rms, s
//                                             the residual add and the norm: s = a + b, y = RMSNorm(s)
//   AddRMSNormGrad(dy, s, w, inv_rms, dres) -> ds[, dw]
//                                             RMSNormGrad's dx plus dres (s's gradient from its other
//                                             readers), so no separate sum of the two
//   Rotary(x, cos, sin) -> y                   rotate-half rotary embedding, cos/sin broadcast to x
//   RotaryGrad(dy, cos, sin) -> dx
//   RotaryT(x, cos, sin) -> y, RotaryTGrad(dy, cos, sin) -> dx
//                                             Rotary with x [B, S, H, D] and y [B, H, S, D] (the
//                                             Transpose before it folded in); the gradient the other way
//   Attention(q, k, v, mask; scale) -> out    softmax(q k^T scale + mask) v, grouped k/v heads, by
//                                             blocks of rows: no S x S tensor is ever held
//   AttentionGrad(dout, q, k, v, mask; scale) -> dq, dk, dv
//   AttentionT(q, k, v, mask; scale) -> out, AttentionTGrad(dout, q, k, v, mask; scale) -> dq, dk, dv
//                                             Attention with out (and dout) [B, S, H, D]: the
//                                             Transpose after it (and its gradient's) folded in
//   CrossEntropyHead(h, w, labels; ignore_index) -> loss[, dh]
//                                             sum over rows of cross-entropy(h w^T, labels), the
//                                             vocabulary in tiles (no rows x V logits); dh, when the
//                                             node has it, is d loss / d h, from the same pass
//   LoRA(x, A, B; scale) -> u, h                h = x A^T, u = scale h B^T (a LoRA branch; r <= 64)
//   LoRAGrad(du, x, h, A, B; scale) -> dA, dB[, dx]
//                                             its gradients in one pass over the rows
//   LoRADown(x, A) -> h, LoRAGradH(du, x, h, A, B; scale) -> dA, dB, dh
//                                             the same without the branch's output and input
//                                             gradient, which MatMulBF16LoRA adds (dh = scale du B)
//   AdamW(step_size, decay, bc2_sqrt, p_1, g_1, m_1, v_1, ..., p_n, g_n, m_n, v_n;
//         beta1, one_minus_beta1, beta2, one_minus_beta2, epsilon)
//       -> p_1', m_1', v_1', ..., p_n', m_n', v_n'
//                                             PyTorch's AdamW update of n tensors in one call, each
//                                             value computed as edgetune's plain optimizer graph does
//                                             (the same float32 operations in the same order)
//   CrossEntropyHeadBF16(h, w, labels; ignore_index) -> loss[, dh]
//                                             CrossEntropyHead with a frozen bfloat16 w, h rounded to
//                                             bfloat16, float32 sums (AVX512-BF16)
//   MatMulBF16Add(a, w, c; trans_b) -> y      MatMulBF16 plus c (an Add after it)
//   MatMulBF16LoRA(a, w, p, q[, c]; trans_b, trans_q, scale) -> y
//                                             MatMulBF16 plus scale p q (q^T with trans_q) in float32,
//                                             plus c: a LoRA layer's base product and branch
//   MatMulBF16Round(a, w; trans_b) -> y       MatMulBF16 with y rounded to bfloat16
//   SwiGLUBF16(g, u[, after]) -> y, SwiGLUBF16Grad(dy, g, u) -> dg, du
//                                             SwiGLU and SwiGLUGrad with g and u in bfloat16
//   AttentionTBF16(q, k, v, mask; scale) -> out, AttentionTBF16Grad(dout, q, k, v, mask; scale) -> dq, dk, dv
//                                             AttentionT and AttentionTGrad with bfloat16 products
//                                             (operands rounded to bfloat16, float32 sums, softmax
//                                             and outputs float32)
//   MatMulBF16(a, w; trans_b) -> y            a (float32, rounded to bfloat16) times a frozen bfloat16
//                                             weight: a w^T (trans_b 1) or a w, summed in float32 (AMX or AVX512-BF16)
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "amx_bf16.hpp"
#include "fused.hpp"

namespace {

using edgetune::FusedKernels;
using Ort::Custom::Tensor;

std::vector<FusedKernels> available() {
  std::vector<FusedKernels> v{edgetune::fused_generic()};
#if defined(EDGETUNE_X86) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) v.push_back(edgetune::fused_avx2());
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) v.push_back(edgetune::fused_avx512());
#endif
  return v;
}

// The widest build this CPU runs, or the one EDGETUNE_ISA names when this CPU has it.
const FusedKernels& K() {
  static const FusedKernels chosen = [] {
    auto all = available();
    const char* want = std::getenv("EDGETUNE_ISA");
    if (want && *want)
      for (const auto& k : all)
        if (std::string(k.name) == want) return k;
    return all.back();
  }();
  return chosen;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

Ort::Status fail(const std::string& op, const std::string& msg) {
  return Ort::Status(("edgetune::" + op + ": " + msg).c_str(), ORT_INVALID_ARGUMENT);
}

// A node that declares fewer outputs than the op writes (a graph from another version of the ops):
// an error, never a write through a missing output.
Ort::Status outputs_missing(OrtKernelContext* ctx, size_t n, const char* op) {
  const size_t have = Ort::KernelContext(ctx).GetOutputCount();
  if (have >= n) return Ort::Status{nullptr};
  return fail(op, "the node has " + std::to_string(have) + " outputs, the op writes " + std::to_string(n) +
                      " (a graph for another version of edgetune's kernels: export the bundle again)");
}

// Runs fn(block) for block in [0, n) on the session's intra-op thread pool.
void parallel(OrtKernelContext* ctx, size_t n, const std::function<void(size_t)>& fn) {
  if (n <= 1) {
    if (n == 1) fn(0);
    return;
  }
  auto tramp = [](void* user, size_t i) { (*static_cast<const std::function<void(size_t)>*>(user))(i); };
  Ort::KernelContext(ctx).ParallelFor(tramp, n, 0, const_cast<std::function<void(size_t)>*>(&fn));
}

constexpr size_t BLOCK = 16384;  // floats per parallel task: large enough to hide the task's cost

size_t blocks_of(size_t n) { return (n + BLOCK - 1) / BLOCK; }

template <typename F>
Ort::Status guarded(const char* op, F&& body) {
  try {
    return body();
  } catch (const std::exception& e) {
    return fail(op, e.what());
  }
}

// The kernels of g and u in float32, or in bfloat16 (MatMulBF16Round's outputs, widened as read).
inline void swiglu_block(const float* g, const float* u, float* y, size_t n) { K().swiglu(g, u, y, n); }
inline void swiglu_block(const Ort::BFloat16_t* g, const Ort::BFloat16_t* u, float* y, size_t n) {
  K().swiglu_bf16(reinterpret_cast<const uint16_t*>(g), reinterpret_cast<const uint16_t*>(u), y, n);
}
inline void swiglu_grad_block(const float* dy, const float* g, const float* u, float* dg, float* du, size_t n) {
  K().swiglu_grad(dy, g, u, dg, du, n);
}
inline void swiglu_grad_block(const float* dy, const Ort::BFloat16_t* g, const Ort::BFloat16_t* u, float* dg,
                              float* du, size_t n) {
  K().swiglu_bf16_grad(dy, reinterpret_cast<const uint16_t*>(g), reinterpret_cast<const uint16_t*>(u), dg, du, n);
}

// `after` (RMSNorm, SwiGLU): an optional last input the op only waits for, never reads; a forward
// op recomputed in the backward pass takes it to run when the backward pass gets there.
// SwiGLU and SwiGLUBF16 (g and u in float32 or bfloat16), SwiGLUGrad and SwiGLUBF16Grad.
template <typename T>
Ort::Status swiglu(const char* op, OrtKernelContext* ctx, const Tensor<T>& g, const Tensor<T>& u, Tensor<float>& y) {
  return guarded(op, [&]() -> Ort::Status {
    if (g.Shape() != u.Shape())
      return fail(op, "g " + shape_str(g.Shape()) + " and u " + shape_str(u.Shape()) + " differ");
    const size_t n = static_cast<size_t>(g.NumberOfElement());
    float* out = y.Allocate(g.Shape());
    const T *pg = g.Data(), *pu = u.Data();
    parallel(ctx, blocks_of(n), [&](size_t b) {
      const size_t lo = b * BLOCK, len = std::min(BLOCK, n - lo);
      swiglu_block(pg + lo, pu + lo, out + lo, len);
    });
    return Ort::Status{nullptr};
  });
}

template <typename T>
Ort::Status swiglu_grad(const char* op, OrtKernelContext* ctx, const Tensor<float>& dy, const Tensor<T>& g,
                        const Tensor<T>& u, Tensor<float>& dg, Tensor<float>& du) {
  return guarded(op, [&]() -> Ort::Status {
    if (auto st = outputs_missing(ctx, 2, op); !st.IsOK()) return st;
    if (g.Shape() != u.Shape() || dy.Shape() != g.Shape())
      return fail(op, "dy " + shape_str(dy.Shape()) + ", g " + shape_str(g.Shape()) + " and u " +
                          shape_str(u.Shape()) + " must agree");
    const size_t n = static_cast<size_t>(g.NumberOfElement());
    float* pdg = dg.Allocate(g.Shape());
    float* pdu = du.Allocate(g.Shape());
    const float* pdy = dy.Data();
    const T *pg = g.Data(), *pu = u.Data();
    parallel(ctx, blocks_of(n), [&](size_t b) {
      const size_t lo = b * BLOCK, len = std::min(BLOCK, n - lo);
      swiglu_grad_block(pdy + lo, pg + lo, pu + lo, pdg + lo, pdu + lo, len);
    });
    return Ort::Status{nullptr};
  });
}

Ort::Status SwiGLU(OrtKernelContext* ctx, const Tensor<float>& g, const Tensor<float>& u,
                   std::optional<const Tensor<float>*> /*after*/, Tensor<float>& y) {
  return swiglu("SwiGLU", ctx, g, u, y);
}

Ort::Status SwiGLUGrad(OrtKernelContext* ctx, const Tensor<float>& dy, const Tensor<float>& g, const Tensor<float>& u,
                       Tensor<float>& dg, Tensor<float>& du) {
  return swiglu_grad("SwiGLUGrad", ctx, dy, g, u, dg, du);
}

Ort::Status SwiGLUBF16(OrtKernelContext* ctx, const Tensor<Ort::BFloat16_t>& g, const Tensor<Ort::BFloat16_t>& u,
                       std::optional<const Tensor<float>*> /*after*/, Tensor<float>& y) {
  return swiglu("SwiGLUBF16", ctx, g, u, y);
}

Ort::Status SwiGLUBF16Grad(OrtKernelContext* ctx, const Tensor<float>& dy, const Tensor<Ort::BFloat16_t>& g,
                           const Tensor<Ort::BFloat16_t>& u, Tensor<float>& dg, Tensor<float>& du) {
  return swiglu_grad("SwiGLUBF16Grad", ctx, dy, g, u, dg, du);
}

// LoRA(x, A, B; scale) -> u, h: h = x A^T, u = scale h B^T (x [..., K], A [r, K], B [N, r], r <= 64): a
// LoRA layer's branch, in one pass over x's rows. LoRAGrad(du, x, h, A, B; scale) -> dA, dB[, dx]: its
// gradients in one pass over du's and x's rows; dA and dB are summed over fixed tasks of rows, then
// the tasks in order, so the result does not depend on which thread took which task.
struct LoRAShape {
  size_t M = 1, K = 0, N = 0, r = 0;
  std::vector<int64_t> lead;  // x's leading dimensions
  // x's leading dimensions and a last one of n (u and du: N; h: r)
  std::vector<int64_t> rows_of(size_t n) const {
    std::vector<int64_t> s = lead;
    s.push_back(static_cast<int64_t>(n));
    return s;
  }
};

// bs null: LoRADown's operands (no B).
inline Ort::Status lora_shape(const char* op, const std::vector<int64_t>& xs, const std::vector<int64_t>& as,
                              const std::vector<int64_t>* bs, LoRAShape& out) {
  if (xs.empty() || as.size() != 2 || (bs && (bs->size() != 2 || (*bs)[1] != as[0])) || as[1] != xs.back() ||
      as[0] < 1 || as[0] > 64)
    return fail(op, "x " + shape_str(xs) + (bs ? ", A " + shape_str(as) + " and B " + shape_str(*bs)
                                               : " and A " + shape_str(as)) +
                        " do not fit ([..., K], [r, K]" + (bs ? ", [N, r]" : "") + ", r <= 64)");
  out.lead.assign(xs.begin(), xs.end() - 1);
  out.M = 1;
  for (int64_t d : out.lead) out.M *= static_cast<size_t>(d);
  out.K = static_cast<size_t>(xs.back());
  out.r = static_cast<size_t>(as[0]);
  out.N = bs ? static_cast<size_t>((*bs)[0]) : 0;
  return Ort::Status{nullptr};
}

// B [N, r] -> Bt [r, N]
inline std::vector<float> lora_bt(const float* B, size_t N, size_t r) {
  std::vector<float> bt(r * N);
  for (size_t n = 0; n < N; ++n)
    for (size_t j = 0; j < r; ++j) bt[j * N + n] = B[n * r + j];
  return bt;
}

constexpr size_t LORA_TASKS = 8;  // LoRAGrad's tasks at most (each keeps its own dA, dB)

// LoRA's and LoRADown's pass: h = x A^T for all rows, and u = scale h B^T when pu is given.
Ort::Status lora_forward(OrtKernelContext* ctx, const char* op, const Tensor<float>& x, const Tensor<float>& A,
                         const Tensor<float>* B, float scale, Tensor<float>* u, Tensor<float>& h) {
  return guarded(op, [&]() -> Ort::Status {
    if (auto st = outputs_missing(ctx, u ? 2 : 1, op); !st.IsOK()) return st;
    LoRAShape d;
    const std::vector<int64_t> bs = B ? B->Shape() : std::vector<int64_t>{};
    if (auto st = lora_shape(op, x.Shape(), A.Shape(), B ? &bs : nullptr, d); !st.IsOK()) return st;
    float* pu = u ? u->Allocate(d.rows_of(d.N)) : nullptr;
    float* ph = h.Allocate(d.rows_of(d.r));
    const std::vector<float> bt = B ? lora_bt(B->Data(), d.N, d.r) : std::vector<float>{};
    const float *px = x.Data(), *pa = A.Data();
    const size_t R = K().lora_block;
    parallel(ctx, (d.M + R - 1) / R, [&](size_t b) {
      const size_t m0 = b * R, rows = std::min(R, d.M - m0);
      K().lora_forward(px + m0 * d.K, rows, d.K, pa, d.r, bt.data(), d.N, scale, ph + m0 * d.r,
                       pu ? pu + m0 * d.N : nullptr);
    });
    return Ort::Status{nullptr};
  });
}

// The LoRA ops' one attribute.
struct LoRAScale {
  float scale = 1.0f;
  LoRAScale(const OrtApi*, const OrtKernelInfo* info) {
    scale = Ort::ConstKernelInfo(info).GetAttribute<float>("scale");
  }
};

struct LoRA : LoRAScale {
  using LoRAScale::LoRAScale;

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& x, const Tensor<float>& A, const Tensor<float>& B,
                      Tensor<float>& u, Tensor<float>& h) {
    return lora_forward(ctx, "LoRA", x, A, &B, scale, &u, h);
  }
};

// LoRADown(x, A) -> h = x A^T: a LoRA branch's first product alone, where MatMulBF16LoRA makes the
// second inside the layer's base product.
struct LoRADown {
  LoRADown(const OrtApi*, const OrtKernelInfo*) {}

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& x, const Tensor<float>& A, Tensor<float>& h) {
    return lora_forward(ctx, "LoRADown", x, A, nullptr, 1.0f, nullptr, h);
  }
};

// LoRAGrad's and LoRAGradH's pass: dA, dB, and dx (pdx) or dh = scale du B (pdh) when given.
Ort::Status lora_backward(OrtKernelContext* ctx, const char* op, const Tensor<float>& du, const Tensor<float>& x,
                          const Tensor<float>& h, const Tensor<float>& A, const Tensor<float>& B, float scale,
                          Tensor<float>& dA, Tensor<float>& dB, Tensor<float>* dx, Tensor<float>* dh) {
  return guarded(op, [&]() -> Ort::Status {
    if (auto st = outputs_missing(ctx, dh ? 3 : 2, op); !st.IsOK()) return st;
    LoRAShape d;
    const std::vector<int64_t> bs = B.Shape();
    if (auto st = lora_shape(op, x.Shape(), A.Shape(), &bs, d); !st.IsOK()) return st;
    const std::vector<int64_t> us = d.rows_of(d.N), hs = d.rows_of(d.r);
    if (du.Shape() != us || h.Shape() != hs)
      return fail(op, "du " + shape_str(du.Shape()) + " and h " + shape_str(h.Shape()) + " must be " +
                          shape_str(us) + " and " + shape_str(hs));
    float* pda = dA.Allocate(A.Shape());
    float* pdb = dB.Allocate(B.Shape());
    float* pdx = dx ? dx->Allocate(x.Shape()) : nullptr;
    float* pdh = dh ? dh->Allocate(hs) : nullptr;
    const std::vector<float> bt = lora_bt(B.Data(), d.N, d.r);
    // Tasks of whole blocks of rows, at most LORA_TASKS of them, each summing its blocks' parts of
    // dA and dB^T in order into its own buffer (zeroed by the task); then the tasks' buffers in
    // order, by columns.
    const size_t R = K().lora_block;
    const size_t blocks = (d.M + R - 1) / R, tasks = std::min(blocks, LORA_TASKS);
    const size_t part = d.r * (d.K + d.N);
    thread_local std::vector<float> parts_buf, g_buf;  // kept at their largest size
    parts_buf.resize(std::max(parts_buf.size(), tasks * part));
    g_buf.resize(std::max(g_buf.size(), R * d.r * tasks));
    float* parts = parts_buf.data();
    float* gs = g_buf.data();
    const float *pdu = du.Data(), *px = x.Data(), *ph = h.Data(), *pa = A.Data();
    parallel(ctx, tasks, [&](size_t t) {
      float* mine = parts + t * part;
      std::fill(mine, mine + part, 0.0f);
      for (size_t b = blocks * t / tasks; b < blocks * (t + 1) / tasks; ++b) {
        const size_t m0 = b * R, rows = std::min(R, d.M - m0);
        float* g = pdh ? pdh + m0 * d.r : gs + t * R * d.r;
        K().lora_backward(pdu + m0 * d.N, px + m0 * d.K, ph + m0 * d.r, rows, d.K, d.N, pa, d.r, bt.data(), scale, g,
                          pdx ? pdx + m0 * d.K : nullptr, mine, mine + d.r * d.K);
      }
    });
    std::vector<float> dbt(d.r * d.N);
    constexpr size_t CH = 2048;  // values per reduction task
    parallel(ctx, (part + CH - 1) / CH, [&](size_t c) {
      const size_t lo = c * CH, hi = std::min(part, lo + CH);
      float* sum = parts + lo;  // task 0's values, to which the others' are added in order
      for (size_t t = 1; t < tasks; ++t) {
        const float* p = parts + t * part + lo;
        for (size_t i = 0; i < hi - lo; ++i) sum[i] += p[i];
      }
      for (size_t i = lo; i < hi; ++i) {
        if (i < d.r * d.K)
          pda[i] = parts[i];
        else
          dbt[i - d.r * d.K] = parts[i];
      }
    });
    for (size_t n = 0; n < d.N; ++n)
      for (size_t j = 0; j < d.r; ++j) pdb[n * d.r + j] = dbt[j * d.N + n];
    return Ort::Status{nullptr};
  });
}

struct LoRAGrad : LoRAScale {
  using LoRAScale::LoRAScale;

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& du, const Tensor<float>& x, const Tensor<float>& h,
                      const Tensor<float>& A, const Tensor<float>& B, Tensor<float>& dA, Tensor<float>& dB,
                      std::optional<Tensor<float>*> dx) {
    return lora_backward(ctx, "LoRAGrad", du, x, h, A, B, scale, dA, dB, dx.has_value() ? *dx : nullptr, nullptr);
  }
};

// LoRAGradH(du, x, h, A, B; scale) -> dA, dB, dh: LoRAGrad with d loss / d h = scale du B in place
// of dx = dh A, which MatMulBF16LoRA adds inside the layer's input-gradient product.
struct LoRAGradH : LoRAScale {
  using LoRAScale::LoRAScale;

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& du, const Tensor<float>& x, const Tensor<float>& h,
                      const Tensor<float>& A, const Tensor<float>& B, Tensor<float>& dA, Tensor<float>& dB,
                      Tensor<float>& dh) {
    return lora_backward(ctx, "LoRAGradH", du, x, h, A, B, scale, dA, dB, nullptr, &dh);
  }
};

struct RMSNorm {
  float eps = 1e-6f;
  RMSNorm(const OrtApi*, const OrtKernelInfo* info) { eps = Ort::ConstKernelInfo(info).GetAttribute<float>("epsilon"); }

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& x, const Tensor<float>& w,
                      std::optional<const Tensor<float>*> /*after*/, Tensor<float>& y, Tensor<float>& inv) {
    return guarded("RMSNorm", [&]() -> Ort::Status {
      if (auto st = outputs_missing(ctx, 2, "RMSNorm"); !st.IsOK()) return st;
      const auto& s = x.Shape();
      if (s.empty() || w.Shape().size() != 1 || w.Shape()[0] != s.back())
        return fail("RMSNorm", "x " + shape_str(s) + " and weight " + shape_str(w.Shape()) + " do not fit");
      const size_t d = static_cast<size_t>(s.back()), rows = d ? static_cast<size_t>(x.NumberOfElement()) / d : 0;
      float* py = y.Allocate(s);
      std::vector<int64_t> is(s.begin(), s.end() - 1);
      is.push_back(1);
      float* pinv = inv.Allocate(is);
      const size_t per = std::max<size_t>(1, BLOCK / std::max<size_t>(d, 1));
      const float *px = x.Data(), *pw = w.Data();
      const float e = eps;
      parallel(ctx, (rows + per - 1) / per, [&](size_t b) {
        const size_t lo = b * per, n = std::min(per, rows - lo);
        K().rmsnorm(px + lo * d, pw, py + lo * d, pinv + lo, n, d, e);
      });
      return Ort::Status{nullptr};
    });
  }
};

// RMSNormGrad and AddRMSNormGrad: dres (optional) is added to dx, dw (optional) is computed.
Ort::Status rmsnorm_grad(const char* op, OrtKernelContext* ctx, const Tensor<float>& dy, const Tensor<float>& x,
                         const Tensor<float>& w, const Tensor<float>& inv, const Tensor<float>* dres, Tensor<float>& dx,
                         Tensor<float>* dw) {
  return guarded(op, [&]() -> Ort::Status {
    const auto& s = x.Shape();
    if (s.empty() || dy.Shape() != s || w.Shape().size() != 1 || w.Shape()[0] != s.back())
      return fail(op, "dy " + shape_str(dy.Shape()) + ", x " + shape_str(s) + " and weight " +
                          shape_str(w.Shape()) + " do not fit");
    if (dres && dres->Shape() != s)
      return fail(op, "dres " + shape_str(dres->Shape()) + " is not shaped like x " + shape_str(s));
    const size_t d = static_cast<size_t>(s.back()), rows = d ? static_cast<size_t>(x.NumberOfElement()) / d : 0;
    if (static_cast<size_t>(inv.NumberOfElement()) != rows)
      return fail(op, "inv_rms " + shape_str(inv.Shape()) + " does not have one value per row of x " + shape_str(s));
    float* pdx = dx.Allocate(s);
    float* pdw = dw ? dw->Allocate(w.Shape()) : nullptr;
    const size_t per = std::max<size_t>(1, BLOCK / std::max<size_t>(d, 1));
    const size_t nb = (rows + per - 1) / per;
    std::vector<float> partial(pdw ? nb * d : 0, 0.0f);
    const float *pdy = dy.Data(), *px = x.Data(), *pw = w.Data(), *pinv = inv.Data();
    const float* pres = dres ? dres->Data() : nullptr;
    parallel(ctx, nb, [&](size_t b) {
      const size_t lo = b * per, n = std::min(per, rows - lo);
      K().rmsnorm_grad(pdy + lo * d, px + lo * d, pw, pinv + lo, pres ? pres + lo * d : nullptr, pdx + lo * d,
                       pdw ? partial.data() + b * d : nullptr, n, d);
    });
    if (pdw) {
      for (size_t k = 0; k < d; ++k) pdw[k] = 0.0f;
      for (size_t b = 0; b < nb; ++b)
        for (size_t k = 0; k < d; ++k) pdw[k] += partial[b * d + k];
    }
    return Ort::Status{nullptr};
  });
}

Ort::Status RMSNormGrad(OrtKernelContext* ctx, const Tensor<float>& dy, const Tensor<float>& x, const Tensor<float>& w,
                        const Tensor<float>& inv, Tensor<float>& dx, Tensor<float>& dw) {
  if (auto st = outputs_missing(ctx, 2, "RMSNormGrad"); !st.IsOK()) return st;
  return rmsnorm_grad("RMSNormGrad", ctx, dy, x, w, inv, nullptr, dx, &dw);
}

// The residual add and the norm in one pass: s = a + b (a and b alike), y = RMSNorm(s, w).
struct AddRMSNorm {
  float eps = 1e-6f;
  AddRMSNorm(const OrtApi*, const OrtKernelInfo* info) { eps = Ort::ConstKernelInfo(info).GetAttribute<float>("epsilon"); }

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& a, const Tensor<float>& b, const Tensor<float>& w,
                      Tensor<float>& y, Tensor<float>& inv, Tensor<float>& sum) {
    return guarded("AddRMSNorm", [&]() -> Ort::Status {
      if (auto st = outputs_missing(ctx, 3, "AddRMSNorm"); !st.IsOK()) return st;
      const auto& s = a.Shape();
      if (s.empty() || b.Shape() != s || w.Shape().size() != 1 || w.Shape()[0] != s.back())
        return fail("AddRMSNorm", "a " + shape_str(s) + ", b " + shape_str(b.Shape()) + " and weight " +
                                      shape_str(w.Shape()) + " do not fit (a and b alike, the weight their last axis)");
      const size_t d = static_cast<size_t>(s.back()), rows = d ? static_cast<size_t>(a.NumberOfElement()) / d : 0;
      float* py = y.Allocate(s);
      float* ps = sum.Allocate(s);
      std::vector<int64_t> is(s.begin(), s.end() - 1);
      is.push_back(1);
      float* pinv = inv.Allocate(is);
      const size_t per = std::max<size_t>(1, BLOCK / std::max<size_t>(d, 1));
      const float *pa = a.Data(), *pb = b.Data(), *pw = w.Data();
      const float e = eps;
      parallel(ctx, (rows + per - 1) / per, [&](size_t blk) {
        const size_t lo = blk * per, n = std::min(per, rows - lo);
        K().add_rmsnorm(pa + lo * d, pb + lo * d, pw, py + lo * d, pinv + lo, ps + lo * d, n, d, e);
      });
      return Ort::Status{nullptr};
    });
  }
};

// The gradient of AddRMSNorm's sum s: RMSNormGrad's dx plus dres, the gradient s gets from its
// other readers (the next residual add), in the same pass; dw only when the node asks for it.
Ort::Status AddRMSNormGrad(OrtKernelContext* ctx, const Tensor<float>& dy, const Tensor<float>& x,
                           const Tensor<float>& w, const Tensor<float>& inv, const Tensor<float>& dres,
                           Tensor<float>& dx, std::optional<Tensor<float>*> dw) {
  return rmsnorm_grad("AddRMSNormGrad", ctx, dy, x, w, inv, &dres, dx, dw.has_value() ? *dw : nullptr);
}

// cos/sin are broadcast to x from the right; each of their dimensions is 1 or x's. transposed
// (4-d only): the attention heads' layout [B, H, S, D] on one side and the projections' [B, S, H, D]
// on the other, so that no Transpose runs beside the op. Forward, x is [B, S, H, D] and y
// [B, H, S, D]; backward, dy is [B, H, S, D] and dx [B, S, H, D]. cos/sin broadcast to [B, H, S, D].
Ort::Status rotary(const char* op, OrtKernelContext* ctx, const Tensor<float>& x, const Tensor<float>& c,
                   const Tensor<float>& s, Tensor<float>& y, bool backward, bool transposed = false) {
  return guarded(op, [&]() -> Ort::Status {
    const auto& in = x.Shape();
    const auto& cs = c.Shape();
    if (transposed && in.size() != 4)
      return fail(op, "x " + shape_str(in) + " is not 4-d ([B, S, H, D] one side, [B, H, S, D] the other)");
    // xs: the [B, H, S, D] side's shape (x's own where not transposed), which cos/sin broadcast to
    std::vector<int64_t> xs(in.begin(), in.end()), ys = xs;
    if (transposed) {
      std::swap(ys[1], ys[2]);
      if (!backward) xs = ys;
    }
    if (xs.empty() || cs != s.Shape() || cs.size() > xs.size() || cs.empty() || cs.back() != xs.back() || xs.back() % 2)
      return fail(op, "x " + shape_str(in) + ", cos " + shape_str(cs) + " and sin " + shape_str(s.Shape()) +
                          " do not fit (cos and sin alike, broadcast to " + (transposed ? "[B, H, S, D]" : "x") +
                          ", an even last axis)");
    const size_t r = xs.size(), d = static_cast<size_t>(xs.back());
    std::vector<size_t> cstride(r, 0);  // float offset in cos per step of each x axis (0 where broadcast)
    size_t acc = d;
    for (size_t k = 1; k < cs.size(); ++k) {
      const size_t ax = cs.size() - 1 - k, xa = r - 1 - k;
      if (cs[ax] != 1 && cs[ax] != xs[xa])
        return fail(op, "cos " + shape_str(cs) + " does not broadcast to x " + shape_str(xs));
      cstride[xa] = cs[ax] == 1 ? 0 : acc;
      acc *= static_cast<size_t>(cs[ax]);
    }
    const size_t rows = static_cast<size_t>(x.NumberOfElement()) / d;
    float* py = y.Allocate(ys);
    const float *px = x.Data(), *pc = c.Data(), *ps = s.Data();
    const size_t H = transposed ? static_cast<size_t>(xs[1]) : 1, S = transposed ? static_cast<size_t>(xs[2]) : 1;
    const size_t per = std::max<size_t>(1, BLOCK / d);
    parallel(ctx, (rows + per - 1) / per, [&](size_t b) {
      const size_t lo = b * per, hi = std::min(rows, lo + per);
      for (size_t row = lo; row < hi; ++row) {  // row: in [B, H, S] order
        size_t rem = row, off = 0;
        for (size_t ax = r - 1; ax-- > 0;) {
          const size_t n = static_cast<size_t>(xs[ax]);
          off += (rem % n) * cstride[ax];
          rem /= n;
        }
        size_t other = row;  // the same row in [B, S, H] order
        if (transposed) {
          const size_t bh = row / S, si = row % S;
          other = ((bh / H) * S + si) * H + bh % H;
        }
        const size_t from = backward ? row : other, to = backward ? other : row;
        K().rotary_row(px + from * d, pc + off, ps + off, py + to * d, d, backward);
      }
    });
    return Ort::Status{nullptr};
  });
}

Ort::Status Rotary(OrtKernelContext* ctx, const Tensor<float>& x, const Tensor<float>& c, const Tensor<float>& s,
                   Tensor<float>& y) {
  return rotary("Rotary", ctx, x, c, s, y, false);
}

Ort::Status RotaryGrad(OrtKernelContext* ctx, const Tensor<float>& dy, const Tensor<float>& c, const Tensor<float>& s,
                       Tensor<float>& dx) {
  return rotary("RotaryGrad", ctx, dy, c, s, dx, true);
}

Ort::Status RotaryT(OrtKernelContext* ctx, const Tensor<float>& x, const Tensor<float>& c, const Tensor<float>& s,
                    Tensor<float>& y) {
  return rotary("RotaryT", ctx, x, c, s, y, false, true);
}

Ort::Status RotaryTGrad(OrtKernelContext* ctx, const Tensor<float>& dy, const Tensor<float>& c, const Tensor<float>& s,
                        Tensor<float>& dx) {
  return rotary("RotaryTGrad", ctx, dy, c, s, dx, true, true);
}

// x [S, D] as the attention kernels read keys: panels of `tile` rows, each transposed to D x tile
// and stored whole, zero-padded past S (ld: S rounded up to the tile), written to t (D * ld floats).
void transpose_panels(const float* x, size_t S, size_t D, size_t ld, size_t tile, float* t) {
  for (size_t j0 = 0; j0 < ld; j0 += tile) {
    float* panel = t + j0 * D;
    const size_t n = S > j0 ? std::min(tile, S - j0) : 0;
    for (size_t d = 0; d < D; ++d) {
      float* row = panel + d * tile;
      for (size_t j = 0; j < n; ++j) row[j] = x[(j0 + j) * D + d];
      for (size_t j = n; j < tile; ++j) row[j] = 0.0f;
    }
  }
}

// Shapes of an attention call: q [B, H, S, D]; k, v [B, Hkv, S, D] with H a multiple of Hkv (grouped
// keys and values are shared by H / Hkv query heads, never repeated in memory); an additive mask
// [Bm, Hm, S, S] with Bm in {1, B} and Hm in {1, H}.
struct AttnShape {
  size_t B = 0, H = 0, Hkv = 0, S = 0, D = 0, Bm = 0, Hm = 0;
  std::string error;
  size_t slice(size_t b, size_t h) const { return (Bm == 1 ? 0 : b) * Hm + (Hm == 1 ? 0 : h); }
  const float* mask_of(const float* m, size_t b, size_t h) const { return m + slice(b, h) * S * S; }
};

constexpr size_t EXT_ROWS = 64;  // mask rows per task of the extents

// The keys each query row sees (attn_extents), for every slice of the mask ([Bm * Hm][S][2]): once
// per op, shared by the heads (one mask serves them all).
std::unique_ptr<uint32_t[]> mask_extents(OrtKernelContext* ctx, const AttnShape& a, const float* pm) {
  std::unique_ptr<uint32_t[]> ext(new uint32_t[a.Bm * a.Hm * 2 * a.S]);
  const size_t per = (a.S + EXT_ROWS - 1) / EXT_ROWS;
  parallel(ctx, a.Bm * a.Hm * per, [&](size_t t) {
    const size_t sl = t / per, r0 = t % per * EXT_ROWS, n = std::min(EXT_ROWS, a.S - r0);
    K().attn_extents(pm + sl * a.S * a.S + r0 * a.S, a.S, n, a.S, ext.get() + sl * 2 * a.S + 2 * r0);
  });
  return ext;
}

// For each batch row, its query rows cut into ranges whose rows see disjoint keys: cuts[0] = 0 <
// ... < cuts.back(), the rows from cuts.back() on seeing no key. Cut where every earlier row's keys
// end before every later row's begin (between packed records), ranges merged to at least 64 rows.
// Empty unless one mask serves all of a row's heads and the rows that see no key come last (the
// backward pass then sums per-head dk and dv).
std::vector<std::vector<size_t>> independent_rows(const AttnShape& a, const uint32_t* ext) {
  std::vector<std::vector<size_t>> out;
  if (a.Hm != 1) return out;
  out.resize(a.B);
  std::vector<uint32_t> low(a.S + 1);
  for (size_t b = 0; b < a.B; ++b) {
    const uint32_t* e = ext + a.slice(b, 0) * 2 * a.S;
    size_t live = a.S;
    while (live > 0 && e[2 * (live - 1) + 1] == 0) --live;
    for (size_t i = 0; i < live; ++i)
      if (e[2 * i + 1] == 0) return {};
    low[live] = static_cast<uint32_t>(a.S);
    for (size_t i = live; i-- > 0;) low[i] = std::min(low[i + 1], e[2 * i]);
    std::vector<size_t>& cuts = out[b];
    cuts.push_back(0);
    uint32_t high = 0;
    for (size_t t = 1; t < live; ++t) {
      high = std::max(high, e[2 * (t - 1) + 1]);
      if (high <= low[t] && t - cuts.back() >= 64 && live - t >= 64) cuts.push_back(t);
    }
    if (live > 0) cuts.push_back(live);
  }
  return out;
}

AttnShape attn_shape(const Tensor<float>& q, const Tensor<float>& k, const Tensor<float>& v, const Tensor<float>& m) {
  AttnShape a;
  const auto &qs = q.Shape(), &ks = k.Shape(), &vs = v.Shape(), &ms = m.Shape();
  const std::string all = "q " + shape_str(qs) + ", k " + shape_str(ks) + ", v " + shape_str(vs) + ", mask " + shape_str(ms);
  if (qs.size() != 4 || ks.size() != 4 || ks != vs || ms.size() != 4 || ks[0] != qs[0] || ks[2] != qs[2] ||
      ks[3] != qs[3] || ks[1] == 0 || qs[1] % ks[1] != 0 || ms[2] != qs[2] || ms[3] != qs[2] ||
      (ms[0] != 1 && ms[0] != qs[0]) || (ms[1] != 1 && ms[1] != qs[1])) {
    a.error = all + " do not fit ([B, H, S, D], [B, Hkv, S, D] twice, [1|B, 1|H, S, S])";
    return a;
  }
  a.B = qs[0], a.H = qs[1], a.Hkv = ks[1], a.S = qs[2], a.D = qs[3], a.Bm = ms[0], a.Hm = ms[1];
  return a;
}

// The attention kernels with bfloat16 products: AVX512-BF16 where MatMulBF16 runs and the CPU
// has it, else the same sums in plain C++ (defined below bf16_kernel).
const edgetune::AttnBF16Kernels& KB();

// The heads' rows of a [B, H, S, D] tensor, or of a [B, S, H, D] one (bshd): where head t = b * H + h
// starts, and how many floats apart its rows are.
struct HeadRows {
  size_t first, stride;
};
inline HeadRows head_rows(const AttnShape& a, size_t t, bool bshd) {
  if (!bshd) return {t * a.S * a.D, a.D};
  return {(t / a.H) * a.S * a.H * a.D + (t % a.H) * a.D, a.H * a.D};
}

// Attention, and AttentionT (bshd): its output [B, S, H, D], as the Transpose after it made it.
struct Attention {
  float scale = 1.0f;
  bool bshd = false, bf16 = false;
  const char* name = "Attention";
  Attention(const OrtApi*, const OrtKernelInfo* info) { scale = Ort::ConstKernelInfo(info).GetAttribute<float>("scale"); }

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& q, const Tensor<float>& k, const Tensor<float>& v,
                      const Tensor<float>& mask, Tensor<float>& o) {
    return guarded(name, [&]() -> Ort::Status {
      const AttnShape a = attn_shape(q, k, v, mask);
      if (!a.error.empty()) return fail(name, a.error);
      std::vector<int64_t> os = q.Shape();
      if (bshd) std::swap(os[1], os[2]);
      float* po = o.Allocate(os);
      const float *pq = q.Data(), *pk = k.Data(), *pv = v.Data(), *pm = mask.Data();
      const size_t group = a.H / a.Hkv, SD = a.S * a.D;
      const float sc = scale;
      const size_t tile = bf16 ? KB().attn_tile : K().attn_tile, rows = bf16 ? KB().attn_block_rows : K().attn_block_rows;
      const size_t ld = (a.S + tile - 1) / tile * tile, LD = ld * (bf16 ? KB().padded(a.D) : a.D);
      // k of each key/value head in transposed panels, once for the heads of its group (with bf16,
      // bfloat16 panels of k and v in pairs of rows)
      std::unique_ptr<float[]> kt(bf16 ? nullptr : new float[a.B * a.Hkv * LD]);
      std::unique_ptr<uint16_t[]> kv16(bf16 ? new uint16_t[2 * a.B * a.Hkv * LD] : nullptr);
      if (bf16)
        parallel(ctx, 2 * a.B * a.Hkv, [&](size_t i) {
          const size_t kv = i / 2;
          if (i % 2)
            KB().row_pairs(pv + kv * SD, a.S, a.D, a.D, ld, kv16.get() + i * LD);
          else
            KB().panels(pk + kv * SD, a.S, a.D, ld, kv16.get() + i * LD);
        });
      else
        parallel(ctx, a.B * a.Hkv, [&](size_t kv) { transpose_panels(pk + kv * SD, a.S, a.D, ld, tile, kt.get() + kv * LD); });
      const std::unique_ptr<uint32_t[]> ext = mask_extents(ctx, a, pm);
      // Tasks of at most 128 query rows, so that a few long rows (packed records) still share out.
      const size_t RB = std::max<size_t>(rows, 128 / rows * rows);
      const size_t per = (a.S + RB - 1) / RB;
      parallel(ctx, a.B * a.H * per, [&](size_t task) {
        const size_t t = task / per, r0 = task % per * RB, r1 = std::min(a.S, r0 + RB);
        const size_t b = t / a.H, h = t % a.H, kvh = b * a.Hkv + h / group;
        const HeadRows out = head_rows(a, t, bshd);
        if (bf16) {
          std::vector<float> work(KB().work(ld, a.D, false));
          KB().forward(pq + t * SD, kv16.get() + 2 * kvh * LD, kv16.get() + (2 * kvh + 1) * LD, ld,
                       a.mask_of(pm, b, h), a.S, ext.get() + a.slice(b, h) * 2 * a.S, r0, r1, po + out.first,
                       out.stride, a.S, a.D, sc, work.data());
          return;
        }
        std::vector<float> work(K().attn_work_rows * ld + K().attn_block_rows * a.D);
        K().attn_forward(pq + t * SD, kt.get() + kvh * LD, pv + kvh * SD, ld, a.mask_of(pm, b, h), a.S,
                         ext.get() + a.slice(b, h) * 2 * a.S, r0, r1, po + out.first, out.stride, a.S, a.D, sc,
                         work.data());
      });
      return Ort::Status{nullptr};
    });
  }
};

struct AttentionT : Attention {
  AttentionT(const OrtApi* api, const OrtKernelInfo* info) : Attention(api, info) {
    bshd = true;
    name = "AttentionT";
  }
  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& q, const Tensor<float>& k, const Tensor<float>& v,
                      const Tensor<float>& mask, Tensor<float>& o) {
    return Attention::Compute(ctx, q, k, v, mask, o);
  }
};

// AttentionTBF16: AttentionT with bfloat16 products (attn_bf16.hpp).
struct AttentionTBF16 : Attention {
  AttentionTBF16(const OrtApi* api, const OrtKernelInfo* info) : Attention(api, info) {
    bshd = bf16 = true;
    name = "AttentionTBF16";
  }
  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& q, const Tensor<float>& k, const Tensor<float>& v,
                      const Tensor<float>& mask, Tensor<float>& o) {
    return Attention::Compute(ctx, q, k, v, mask, o);
  }
};

// AttentionGrad, and AttentionTGrad (bshd): dout [B, S, H, D], AttentionT's output's gradient.
struct AttentionGrad {
  float scale = 1.0f;
  bool bshd = false, bf16 = false;
  const char* name = "AttentionGrad";
  AttentionGrad(const OrtApi*, const OrtKernelInfo* info) {
    scale = Ort::ConstKernelInfo(info).GetAttribute<float>("scale");
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& dout, const Tensor<float>& q, const Tensor<float>& k,
                      const Tensor<float>& v, const Tensor<float>& mask, Tensor<float>& dq,
                      Tensor<float>& dk, Tensor<float>& dv) {
    return guarded(name, [&]() -> Ort::Status {
      if (auto st = outputs_missing(ctx, 3, name); !st.IsOK()) return st;
      const AttnShape a = attn_shape(q, k, v, mask);
      if (!a.error.empty()) return fail(name, a.error);
      std::vector<int64_t> want = q.Shape();
      if (bshd) std::swap(want[1], want[2]);
      if (dout.Shape() != want)
        return fail(name, "dout " + shape_str(dout.Shape()) + " does not fit q " + shape_str(q.Shape()) +
                              (bshd ? " (dout [B, S, H, D])" : ""));
      float* pdq = dq.Allocate(q.Shape());
      float* pdk = dk.Allocate(k.Shape());
      float* pdv = dv.Allocate(v.Shape());
      const float *pdo = dout.Data(), *pq = q.Data(), *pk = k.Data(), *pv = v.Data(), *pm = mask.Data();
      const size_t group = a.H / a.Hkv, SD = a.S * a.D;
      const float sc = scale;
      const size_t tile = bf16 ? KB().attn_tile : K().attn_tile;
      const size_t ld = (a.S + tile - 1) / tile * tile, LD = ld * (bf16 ? KB().padded(a.D) : a.D);
      // k and v of each key/value head in transposed panels, once for the heads of its group (with
      // bf16, bfloat16 panels of k and v and k in pairs of rows)
      std::unique_ptr<float[]> kvt(bf16 ? nullptr : new float[2 * a.B * a.Hkv * LD]);
      std::unique_ptr<uint16_t[]> kv16(bf16 ? new uint16_t[3 * a.B * a.Hkv * LD] : nullptr);
      if (bf16)
        parallel(ctx, 3 * a.B * a.Hkv, [&](size_t i) {
          const size_t kv = i / 3;
          if (i % 3 == 2)
            KB().row_pairs(pk + kv * SD, a.S, a.D, a.D, ld, kv16.get() + i * LD);
          else
            KB().panels((i % 3 ? pv : pk) + kv * SD, a.S, a.D, ld, kv16.get() + i * LD);
        });
      else
        parallel(ctx, 2 * a.B * a.Hkv, [&](size_t i) {
          const size_t kv = i / 2;
          transpose_panels((i % 2 ? pv : pk) + kv * SD, a.S, a.D, ld, tile, kvt.get() + i * LD);
        });
      const std::unique_ptr<uint32_t[]> ext = mask_extents(ctx, a, pm);
      auto head = [&](size_t t, size_t r0, size_t r1, float* dkt, float* dvt) {
        const size_t b = t / a.H, h = t % a.H, kv = b * a.Hkv + h / group;
        const HeadRows din = head_rows(a, t, bshd);
        if (bf16) {
          std::vector<float> work(KB().work(ld, a.D, true));
          const uint16_t* l = kv16.get() + 3 * kv * LD;
          KB().backward(pdo + din.first, din.stride, pq + t * SD, l, l + LD, l + 2 * LD, ld, a.mask_of(pm, b, h),
                        a.S, ext.get() + a.slice(b, h) * 2 * a.S, r0, r1, pdq + t * SD, dkt, dvt, a.S, a.D, sc,
                        work.data());
          return;
        }
        std::vector<float> work(K().attn_work_rows * ld + K().attn_block_rows * a.D);
        K().attn_backward(pdo + din.first, din.stride, pq + t * SD, pk + kv * SD, kvt.get() + 2 * kv * LD,
                          kvt.get() + (2 * kv + 1) * LD, ld, a.mask_of(pm, b, h), a.S,
                          ext.get() + a.slice(b, h) * 2 * a.S, r0, r1, pdq + t * SD, dkt, dvt, a.S, a.D, sc,
                          work.data());
      };
      const std::vector<std::vector<size_t>> parts = independent_rows(a, ext.get());
      size_t tasks = 0;
      for (const auto& cuts : parts) tasks += cuts.size() - 1;
      if (!parts.empty() && (group == 1 || tasks * a.Hkv >= 8)) {
        // One task per key/value head and range of rows whose rows see keys no other range's rows
        // see (a batch row, or the records packed into one): its query heads in order add into the
        // dk and dv rows of those keys. The rows that see no key (padding at a row's end, which
        // weighs every key alike) add into all of them after.
        std::fill(pdk, pdk + a.B * a.Hkv * SD, 0.0f);
        std::fill(pdv, pdv + a.B * a.Hkv * SD, 0.0f);
        std::vector<std::pair<size_t, size_t>> jobs;  // (batch row, range)
        for (size_t b = 0; b < a.B; ++b)
          for (size_t r = 0; r + 1 < parts[b].size(); ++r) jobs.emplace_back(b, r);
        parallel(ctx, jobs.size() * a.Hkv, [&](size_t i) {
          const auto [b, r] = jobs[i / a.Hkv];
          const size_t kv = b * a.Hkv + i % a.Hkv, h0 = b * a.H + (i % a.Hkv) * group;
          for (size_t g = 0; g < group; ++g)
            head(h0 + g, parts[b][r], parts[b][r + 1], pdk + kv * SD, pdv + kv * SD);
        });
        parallel(ctx, a.B * a.Hkv, [&](size_t kv) {
          const size_t b = kv / a.Hkv, h0 = b * a.H + (kv % a.Hkv) * group;
          if (parts[b].back() < a.S)
            for (size_t g = 0; g < group; ++g) head(h0 + g, parts[b].back(), a.S, pdk + kv * SD, pdv + kv * SD);
        });
        return Ort::Status{nullptr};
      }
      // Few key/value heads and rows that share keys: one task per query head, so every thread has
      // work to the end; each writes its own dk and dv, summed per key/value head after.
      std::unique_ptr<float[]> own(new float[2 * a.B * a.H * SD]);
      parallel(ctx, a.B * a.H, [&](size_t t) {
        float* dkt = own.get() + t * SD;
        float* dvt = own.get() + (a.B * a.H + t) * SD;
        std::fill(dkt, dkt + SD, 0.0f);
        std::fill(dvt, dvt + SD, 0.0f);
        head(t, 0, a.S, dkt, dvt);
      });
      // dk, dv of each key/value head: the sum over its query heads, in head order.
      const size_t total = a.B * a.Hkv * SD;
      parallel(ctx, blocks_of(total), [&](size_t blk) {
        const size_t i0 = blk * BLOCK, i1 = std::min(total, i0 + BLOCK);
        for (size_t i = i0; i < i1; ++i) {
          const size_t kv = i / SD, x = i % SD, b = kv / a.Hkv, h0 = b * a.H + (kv % a.Hkv) * group;
          float sk = 0.0f, sv = 0.0f;
          for (size_t g = 0; g < group; ++g) {
            sk += own[(h0 + g) * SD + x];
            sv += own[(a.B * a.H + h0 + g) * SD + x];
          }
          pdk[i] = sk;
          pdv[i] = sv;
        }
      });
      return Ort::Status{nullptr};
    });
  }
};

struct AttentionTGrad : AttentionGrad {
  AttentionTGrad(const OrtApi* api, const OrtKernelInfo* info) : AttentionGrad(api, info) {
    bshd = true;
    name = "AttentionTGrad";
  }
  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& dout, const Tensor<float>& q, const Tensor<float>& k,
                      const Tensor<float>& v, const Tensor<float>& mask, Tensor<float>& dq, Tensor<float>& dk,
                      Tensor<float>& dv) {
    return AttentionGrad::Compute(ctx, dout, q, k, v, mask, dq, dk, dv);
  }
};

struct AttentionTBF16Grad : AttentionGrad {
  AttentionTBF16Grad(const OrtApi* api, const OrtKernelInfo* info) : AttentionGrad(api, info) {
    bshd = bf16 = true;
    name = "AttentionTBF16Grad";
  }
  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& dout, const Tensor<float>& q, const Tensor<float>& k,
                      const Tensor<float>& v, const Tensor<float>& mask, Tensor<float>& dq, Tensor<float>& dk,
                      Tensor<float>& dv) {
    return AttentionGrad::Compute(ctx, dout, q, k, v, mask, dq, dk, dv);
  }
};

// The vocabulary loss's checks and its row groups, shared by CrossEntropyHead and
// CrossEntropyHeadBF16: group(lo, n, loss rows, dh rows or null) computes rows [lo, lo + n).
template <typename F>
Ort::Status ce_head_groups(const char* op, OrtKernelContext* ctx, const std::vector<int64_t>& hs,
                           const std::vector<int64_t>& ws, const Tensor<int64_t>& labels, int64_t ignore,
                           Tensor<float>& loss, std::optional<Tensor<float>*> dh, size_t unit, F&& group,
                           size_t slices = 1, size_t per = 0) {
  const auto& ls = labels.Shape();
  if (hs.size() != 2 || ws.size() != 2 || ls.size() != 1 || hs[1] != ws[1] || ls[0] != hs[0] || ws[0] < 1)
    return fail(op, "h " + shape_str(hs) + ", w " + shape_str(ws) + ", labels " + shape_str(ls) +
                        " do not fit ([N, D], [V, D], [N])");
  const size_t N = static_cast<size_t>(hs[0]), D = static_cast<size_t>(hs[1]), V = static_cast<size_t>(ws[0]);
  const int64_t* pl = labels.Data();
  for (size_t r = 0; r < N; ++r)
    if (pl[r] != ignore && (pl[r] < 0 || pl[r] >= static_cast<int64_t>(V)))
      return fail(op, "label " + std::to_string(pl[r]) + " of row " + std::to_string(r) +
                          " is outside the vocabulary of " + std::to_string(V));
  float* out = loss.Allocate({});
  float* g = dh.has_value() && *dh ? (*dh)->Allocate(hs) : nullptr;
  std::vector<float> rows(N);
  // Row groups (per rows, unless the caller chose): each streams the whole vocabulary (or its slice
  // of it) once, so few and large, but enough to share; whole blocks of the kernel's unit of rows.
  // Each group's slices are tasks of their own (group(lo, n, slice, ...)), so that a few rows still
  // keep every thread busy; slice by slice, so that the threads read the same part of the weight at
  // the same time.
  if (!per) per = std::max(unit, std::min<size_t>(64, ((N + 3) / 4 + unit - 1) / unit * unit));
  const size_t groups = (N + per - 1) / per;
  parallel(ctx, groups * slices, [&](size_t t) {
    const size_t lo = t % groups * per;
    group(lo, std::min(per, N - lo), t / groups, rows.data() + lo, g ? g + lo * D : nullptr);
  });
  double sum = 0.0;
  for (float x : rows) sum += x;
  out[0] = static_cast<float>(sum);
  return Ort::Status{nullptr};
}

struct CrossEntropyHead {
  int64_t ignore = -100;
  CrossEntropyHead(const OrtApi*, const OrtKernelInfo* info) {
    ignore = Ort::ConstKernelInfo(info).GetAttribute<int64_t>("ignore_index");
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& h, const Tensor<float>& w,
                      const Tensor<int64_t>& labels, Tensor<float>& loss, std::optional<Tensor<float>*> dh) {
    return guarded("CrossEntropyHead", [&]() -> Ort::Status {
      const float *ph = h.Data(), *pw = w.Data();
      const int64_t* pl = labels.Data();
      return ce_head_groups("CrossEntropyHead", ctx, h.Shape(), w.Shape(), labels, ignore, loss, dh,
                            K().attn_block_rows,
                            [&](size_t lo, size_t n, size_t, float* rows, float* g) {  // w's shape is checked by now
                              const size_t D = static_cast<size_t>(w.Shape()[1]), V = static_cast<size_t>(w.Shape()[0]);
                              std::vector<float> work(K().ce_head_work(n, D));
                              K().ce_head(ph + lo * D, n, D, pw, V, pl + lo, ignore, rows, g, work.data());
                            });
    });
  }
};

enum class Bf16Kernel { none, avx512bf16, amx };
Bf16Kernel bf16_kernel();

// CrossEntropyHead against a frozen bfloat16 weight: the rows of h rounded to bfloat16 and the
// products summed in float32, with AVX512-BF16 (ce_bf16.cpp; AMX CPUs have it too). Where
// MatMulBF16 has neither, the same loss in float32 from a float32 copy of the weight (tests; the
// op is listed only where the fast path runs it).
struct CrossEntropyHeadBF16 {
  int64_t ignore = -100;
  std::mutex mu;
  const void* converted_for = nullptr;
  std::vector<float> wf;  // the plain path's float32 weight

  CrossEntropyHeadBF16(const OrtApi*, const OrtKernelInfo* info) {
    ignore = Ort::ConstKernelInfo(info).GetAttribute<int64_t>("ignore_index");
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& h, const Tensor<Ort::BFloat16_t>& w,
                      const Tensor<int64_t>& labels, Tensor<float>& loss, std::optional<Tensor<float>*> dh) {
    return guarded("CrossEntropyHeadBF16", [&]() -> Ort::Status {
      const float* ph = h.Data();
      const uint16_t* pw = reinterpret_cast<const uint16_t*>(w.Data());
      const int64_t* pl = labels.Data();
      const auto& ws = w.Shape();
      const bool two = ws.size() == 2;
      const size_t D = two ? static_cast<size_t>(ws[1]) : 0, V = two ? static_cast<size_t>(ws[0]) : 0;
      const bool fast = bf16_kernel() != Bf16Kernel::none && edgetune::avx512_bf16_usable();
      if (!fast && two) {
        std::lock_guard<std::mutex> lock(mu);
        if (converted_for != pw) {  // a frozen initializer: once per session
          wf.resize(V * D);
          for (size_t i = 0; i < V * D; ++i) wf[i] = edgetune::from_bf16(pw[i]);
          converted_for = pw;
        }
      }
      // The fast path computes 32 rows at a time, over slices of the vocabulary (whole tiles of
      // 128 entries), each slice's maxima, sums and unnormalized gradient its own; the rows'
      // losses and gradients come from the slices in order once the group's last slice is done.
      // Groups of up to 128 rows (their gradient, 295 KB at D = 576, and their rows' panels stay in
      // the core's L2 while the weight streams past), as few as the rows allow: each group reads all
      // of the weight (57 MB on the default model) from memory, which bounded the call at 0.5 of the
      // peak when 81 rows made three groups of 32. The vocabulary in as many slices (up to 4) as make
      // four tasks with the groups.
      const size_t N = h.Shape().empty() ? 0 : static_cast<size_t>(h.Shape()[0]);
      const size_t n_groups = std::max<size_t>(1, (N + 127) / 128);
      const size_t per = fast ? std::max<size_t>(32, ((N + n_groups - 1) / n_groups + 31) / 32 * 32) : 0;
      const size_t slices =
          fast && V >= 8192 ? std::min(edgetune::CE_PARTS, std::max<size_t>(1, (4 + n_groups - 1) / n_groups)) : 1;
      const bool grad = dh.has_value() && *dh;
      thread_local std::vector<float> ms_buf, extra_buf;  // kept at their largest size
      ms_buf.resize(std::max(ms_buf.size(), 2 * slices * N));
      extra_buf.resize(std::max(extra_buf.size(), grad ? (slices - 1) * N * D : 0));
      float *ms = ms_buf.data(), *extra = extra_buf.data();
      std::vector<std::atomic<int>> left((N + 31) / 32);  // per group (at row lo / 32): slices to go
      for (auto& l : left) l.store(static_cast<int>(slices));
      return ce_head_groups("CrossEntropyHeadBF16", ctx, h.Shape(), ws, labels, ignore, loss, dh,
                            fast ? 32 : K().attn_block_rows,
                            [&](size_t lo, size_t n, size_t slice, float* rows, float* g) {
                              if (fast) {
                                const size_t t0 = (V + 127) / 128;  // tiles
                                const size_t v0 = std::min(V, t0 * slice / slices * 128);
                                const size_t v1 = std::min(V, t0 * (slice + 1) / slices * 128);
                                float* Gs[edgetune::CE_PARTS];
                                for (size_t p = 0; p < slices; ++p)
                                  Gs[p] = !grad ? nullptr : p == 0 ? g : extra + ((p - 1) * N + lo) * D;
                                edgetune::avx512_bf16_ce_part(ph + lo * D, n, D, pw, v0, v1, ms + slice * N + lo,
                                                              ms + (slices + slice) * N + lo, Gs[slice]);
                                if (left[lo / 32].fetch_sub(1) == 1)  // the group's last slice: its rows' results
                                  edgetune::ce_bf16_finish(ph + lo * D, n, D, pw, pl + lo, ignore, slices, N, ms + lo,
                                                           ms + slices * N + lo, Gs, rows, g);
                                return;
                              }
                              std::vector<float> hr(n * D);  // h rounded as the fast path rounds it
                              for (size_t i = 0; i < n * D; ++i)
                                hr[i] = edgetune::from_bf16(edgetune::to_bf16(ph[lo * D + i]));
                              std::vector<float> work(K().ce_head_work(n, D));
                              K().ce_head(hr.data(), n, D, wf.data(), V, pl + lo, ignore, rows, g, work.data());
                            },
                            slices, per);
    });
  }
};


// The product of an activation with a frozen bfloat16 weight. A [..., K] float32 is rounded to
// bfloat16 (to nearest even), the products are summed in float32: y = a w^T (trans_b = 1, w [N, K],
// a linear layer's forward pass) or y = a w (trans_b = 0, w [K, N], its input gradient). w's
// columns of the product are interleaved by pairs of k for the call (no copy is kept between
// calls), except where AMX reads w's rows as stored (the forward product in whole tiles) and for a
// forward product of fewer than 64 rows. It runs on AMX's tiles where the CPU has AMX, else with
// AVX512-BF16's vdpbf16ps; EDGETUNE_ISA=avx512bf16 skips AMX, and a narrower EDGETUNE_ISA, or a CPU
// with neither, leaves the same sums in plain C++, slowly: EdgetuneFusedOps lists the op only where
// one of the two runs it, so such a CPU trains on the plain graph.
Bf16Kernel bf16_kernel() {
  static const Bf16Kernel k = [] {
    const char* env = std::getenv("EDGETUNE_ISA");
    const std::string want = env ? env : "";
    if (edgetune::amx_bf16_usable() && (want.empty() || want == "avx512")) return Bf16Kernel::amx;
    if (edgetune::avx512_bf16_usable() && (want.empty() || want == "avx512" || want == "avx512bf16"))
      return Bf16Kernel::avx512bf16;
    return Bf16Kernel::none;
  }();
  return k;
}

const edgetune::AttnBF16Kernels& KB() {
  static const edgetune::AttnBF16Kernels k = bf16_kernel() != Bf16Kernel::none && edgetune::avx512_bf16_usable()
                                                 ? edgetune::attn_bf16_avx512bf16()
                                                 : edgetune::attn_bf16_generic();
  return k;
}

const char* bf16_kernel_name() {
  switch (bf16_kernel()) {
    case Bf16Kernel::amx: return "amx";
    case Bf16Kernel::avx512bf16: return "avx512bf16";
    default: return "";
  }
}

// MatMulBF16 and MatMulBF16Round: the product into float32 (out) or, for MatMulBF16Round, rounded
// to bfloat16 (out16): with AVX512-BF16's blocks the sums are rounded in registers as they are
// stored; the other paths round a float32 copy of the whole product.
struct Bf16Product {
  bool trans_b = true;
  std::mutex mu;
  const void* converted_for = nullptr;
  std::vector<float> bf;  // B [K, N] as float32, for the plain C++ product

  Bf16Product(const OrtApi*, const OrtKernelInfo* info) {
    trans_b = Ort::ConstKernelInfo(info).GetAttribute<int64_t>("trans_b") != 0;
  }

  // A low-rank term scale p q added to the product (MatMulBF16LoRA): p [..., r] (a's leading
  // dimensions), q [r, N], or [N, r] with trans_q.
  struct Low {
    const Tensor<float>* p;
    const Tensor<float>* q;
    bool trans_q;
    float scale;
  };

  template <typename Y>
  Ort::Status product(OrtKernelContext* ctx, const char* op, const Tensor<float>& a, const Tensor<Ort::BFloat16_t>& w,
                      Y& y, const Tensor<float>* c = nullptr, const Low* low = nullptr) {
    return guarded(op, [&]() -> Ort::Status {
      const auto &as = a.Shape(), &ws = w.Shape();
      if (as.empty() || ws.size() != 2 || as.back() != (trans_b ? ws[1] : ws[0]))
        return fail(op, "a " + shape_str(as) + " and w " + shape_str(ws) + " do not fit (trans_b " +
                            std::to_string(trans_b) + ")");
      if (c) {
        std::vector<int64_t> want(as.begin(), as.end());
        want.back() = trans_b ? ws[0] : ws[1];
        if (c->Shape() != want)
          return fail(op, "c " + shape_str(c->Shape()) + " is not the product's shape " + shape_str(want));
      }
      const float* add = c ? c->Data() : nullptr;
      const size_t K = static_cast<size_t>(as.back()), N = static_cast<size_t>(trans_b ? ws[0] : ws[1]);
      size_t M = 1;
      for (size_t i = 0; i + 1 < as.size(); ++i) M *= static_cast<size_t>(as[i]);
      // The low-rank term's factors: p scaled (ps [M, r]) and q as [r, N] (qt).
      std::vector<float> ps, qt;
      size_t lr = 0;
      if (low) {
        const auto &pshape = low->p->Shape(), &qshape = low->q->Shape();
        const int64_t r = pshape.empty() ? 0 : pshape.back();
        std::vector<int64_t> wp(as.begin(), as.end());
        wp.back() = r;
        const std::vector<int64_t> wq = low->trans_q ? std::vector<int64_t>{static_cast<int64_t>(N), r}
                                                     : std::vector<int64_t>{r, static_cast<int64_t>(N)};
        if (r < 1 || pshape != wp || qshape != wq)
          return fail(op, "p " + shape_str(pshape) + " and q " + shape_str(qshape) + " do not fit a " +
                              shape_str(as) + " and an output of " + std::to_string(N) + " columns (trans_q " +
                              std::to_string(low->trans_q) + ")");
        lr = static_cast<size_t>(r);
        const float *pp = low->p->Data(), *pq = low->q->Data();
        ps.resize(M * lr);
        for (size_t i = 0; i < M * lr; ++i) ps[i] = low->scale * pp[i];
        qt.resize(lr * N);
        for (size_t n = 0; n < N; ++n)
          for (size_t j = 0; j < lr; ++j) qt[j * N + n] = low->trans_q ? pq[n * lr + j] : pq[j * N + n];
      }
      std::vector<int64_t> ys(as.begin(), as.end());
      ys.back() = static_cast<int64_t>(N);
      constexpr bool round = std::is_same<Y, Tensor<Ort::BFloat16_t>>::value;
      auto* allocated = y.Allocate(ys);
      if (M == 0 || N == 0) return Ort::Status{nullptr};
      uint16_t* out16 = round ? reinterpret_cast<uint16_t*>(allocated) : nullptr;
      std::vector<float> whole;  // the rounded product's float32 copy, on the paths that need one
      float* out = reinterpret_cast<float*>(allocated);
      if (round && !avx_path(M, K, N)) {
        whole.resize(M * N);
        out = whole.data();
      }
      const uint16_t* pw = reinterpret_cast<const uint16_t*>(w.Data());
      const float* pa = a.Data();
      const Bf16Kernel kernel = bf16_kernel();
      const bool amx = kernel == Bf16Kernel::amx, avx = kernel == Bf16Kernel::avx512bf16;
      // x w^T can read w's rows straight from the initializer: as AMX's A tiles where the sizes are
      // whole tiles, with vdpbf16ps where K is even (used for fewer than 64 rows only); other
      // products interleave panels of w.
      const bool direct = trans_b && (amx ? K % 32 == 0 && N % 32 == 0 : K % 2 == 0);
      if (!amx && !avx) {
        std::lock_guard<std::mutex> lock(mu);
        if (converted_for != pw) {  // a frozen initializer: once per session
          bf.resize(K * N);
          for (size_t k = 0; k < K; ++k)
            for (size_t n = 0; n < N; ++n)
              bf[k * N + n] = edgetune::from_bf16(trans_b ? pw[n * K + k] : pw[k * N + n]);
          converted_for = pw;
        }
      }
      const size_t stripes = (M + 31) / 32;
      // w interleaved for this call only (pack_b's layout, 32 columns per task; no copy is kept)
      // into the calling thread's buffer, kept at its largest size: fresh pages on every call would
      // cost as much as a tenth of the product in page faults.
      const size_t KB = (K + 31) / 32, NB = (N + 31) / 32;
      const auto pack = [&]() {
        thread_local std::vector<uint16_t> packed;
        packed.resize(std::max(packed.size(), NB * 2 * KB * 512 + 32));
        uint16_t* pb = packed.data() + (64 - reinterpret_cast<uintptr_t>(packed.data()) % 64) % 64 / 2;  // whole cache lines
        parallel(ctx, NB, [&](size_t b) {
          edgetune::pack_b_cols(pw, trans_b, K, N, b * 32, std::min<size_t>(32, N - b * 32), pb + b * 2 * KB * 512);
        });
        return pb;
      };
      if (avx && !(direct && M < 64)) {
        // All of a's rows rounded and interleaved once, then one task per 32 columns of w: it
        // interleaves its columns (a panel that stays in the core's L1 or L2) and multiplies every
        // row by them, so w is read once, next to the arithmetic that hides its memory latency,
        // and the tasks split evenly between the threads for any number of rows.
        const size_t G = (M + 15) / 16, KP = KB * 16;
        thread_local std::vector<uint16_t> rows_buf;  // kept at its largest size, as the panels
        rows_buf.resize(std::max(rows_buf.size(), G * KP * 32 + 32));
        uint16_t* ap = rows_buf.data() + (64 - reinterpret_cast<uintptr_t>(rows_buf.data()) % 64) % 64 / 2;
        parallel(ctx, G, [&](size_t g) { edgetune::avx512_bf16_pack_rows(pa, M, K, g, ap); });
        parallel(ctx, NB, [&](size_t b) {
          thread_local std::vector<uint16_t> panel;
          panel.resize(std::max(panel.size(), 2 * KB * 512 + 32));
          uint16_t* pb = panel.data() + (64 - reinterpret_cast<uintptr_t>(panel.data()) % 64) % 64 / 2;
          const size_t n0 = b * 32, cols = std::min<size_t>(32, N - n0);
          edgetune::pack_b_cols(pw, trans_b, K, N, n0, cols, pb);
          // The next block's part of w: 32 of its rows (trans_b), or 32 columns of each row.
          const size_t n1 = n0 + 32;
          const char* next = n1 < N ? reinterpret_cast<const char*>(trans_b ? pw + n1 * K : pw + n1) : nullptr;
          const size_t lines = !next ? 0 : trans_b ? (std::min<size_t>(32, N - n1) * K * 2 + 63) / 64 : K;
          const edgetune::LowRank lowr{ps.data(), lr, qt.data() + n0, N};
          edgetune::avx512_bf16_cols(ap, M, K, pb, cols, round ? nullptr : out + n0, N, round ? out16 + n0 : nullptr,
                                     add ? add + n0 : nullptr, next, lines, trans_b ? 64 : N * 2,
                                     low ? &lowr : nullptr);
        });
      } else if ((amx || avx) && direct) {
        parallel(ctx, stripes, [&](size_t s) {
          const size_t m0 = s * 32, rows = std::min<size_t>(32, M - m0);
          (amx ? edgetune::amx_bf16_rows_wt : edgetune::avx512_bf16_rows_wt)(pa + m0 * K, rows, K, pw, N,
                                                                              out + m0 * N, N);
        });
      } else if (amx) {
        // Each 32-row stripe of a, rounded to bfloat16, times all of the packed w.
        const size_t lda = KB * 32;
        const uint16_t* pb = pack();
        parallel(ctx, stripes, [&](size_t s) {
          const size_t m0 = s * 32, rows = std::min<size_t>(32, M - m0);
          std::vector<uint16_t> abf(32 * lda, 0);  // rows past M stay zero
          edgetune::rows_to_bf16(pa + m0 * K, rows, K, abf.data(), lda);
          edgetune::amx_bf16_rows(abf.data(), lda, pb, KB, rows, N, out + m0 * N, N);
        });
      } else {
        const float* pb = bf.data();
        parallel(ctx, stripes, [&](size_t s) {
          const size_t m0 = s * 32, rows = std::min<size_t>(32, M - m0);
          std::vector<float> acc(N);
          for (size_t r = 0; r < rows; ++r) {
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (size_t k = 0; k < K; ++k) {
              const float av = edgetune::from_bf16(edgetune::to_bf16(pa[(m0 + r) * K + k]));
              const float* brow = pb + k * N;
              for (size_t n = 0; n < N; ++n) acc[n] += av * brow[n];
            }
            std::copy(acc.begin(), acc.end(), out + (m0 + r) * N);
          }
        });
      }
      if (low && !avx_path(M, K, N))  // the paths that store plain sums: the low-rank term added after
        parallel(ctx, (M + 31) / 32, [&](size_t s) {
          const size_t m0 = s * 32;
          ::K().lora_add(ps.data() + m0 * lr, std::min<size_t>(32, M - m0), lr, qt.data(), N, out + m0 * N);
        });
      if (add && !avx_path(M, K, N))  // the paths that store plain sums: c added after, as an Add would
        parallel(ctx, blocks_of(M * N), [&](size_t b) {
          const size_t lo = b * BLOCK, hi = std::min(M * N, lo + BLOCK);
          for (size_t i = lo; i < hi; ++i) out[i] += add[i];
        });
      if (round && !whole.empty())
        parallel(ctx, (M + 63) / 64, [&](size_t s) {
          const size_t m0 = s * 64;
          edgetune::rows_to_bf16(out + m0 * N, std::min<size_t>(64, M - m0), N, out16 + m0 * N, N);
        });
      return Ort::Status{nullptr};
    });
  }

  // Whether product() takes the AVX512-BF16 blocks (which round block by block).
  bool avx_path(size_t M, size_t K, size_t /*N*/) const {
    const bool direct = trans_b && K % 2 == 0;
    return bf16_kernel() == Bf16Kernel::avx512bf16 && !(direct && M < 64);
  }
};

struct MatMulBF16 : Bf16Product {
  using Bf16Product::Bf16Product;
  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& a, const Tensor<Ort::BFloat16_t>& w,
                      Tensor<float>& y) {
    return product(ctx, "MatMulBF16", a, w, y);
  }
};

// MatMulBF16 and the Add after it: y = a w + c (c of y's shape), each sum added to c as it is stored,
// the same float32 add as an Add node's; the LoRA layers' base product plus the adapter's branch.
struct MatMulBF16Add : Bf16Product {
  using Bf16Product::Bf16Product;
  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& a, const Tensor<Ort::BFloat16_t>& w,
                      const Tensor<float>& c, Tensor<float>& y) {
    return product(ctx, "MatMulBF16Add", a, w, y, &c);
  }
};

// MatMulBF16Add with a LoRA branch's second product inside: y = a w + scale p q [+ c], p [..., r]
// (a's leading dimensions), q [r, N] (or [N, r] with trans_q), the low-rank term summed in float32
// where each block's sums are stored (AVX512-BF16; the other paths add it after). In a LoRA layer's
// forward pass p is the branch's h = x A^T and q is B (trans_q); in its input gradient, p is
// d loss / d h (LoRAGradH) and q is A: the branch's output or input gradient is never stored.
struct MatMulBF16LoRA : Bf16Product {
  bool trans_q = false;
  float scale = 1.0f;
  MatMulBF16LoRA(const OrtApi* api, const OrtKernelInfo* info) : Bf16Product(api, info) {
    Ort::ConstKernelInfo k(info);
    trans_q = k.GetAttribute<int64_t>("trans_q") != 0;
    scale = k.GetAttribute<float>("scale");
  }
  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& a, const Tensor<Ort::BFloat16_t>& w,
                      const Tensor<float>& p, const Tensor<float>& q, std::optional<const Tensor<float>*> c,
                      Tensor<float>& y) {
    const Low low{&p, &q, trans_q, scale};
    return product(ctx, "MatMulBF16LoRA", a, w, y, c.has_value() ? *c : nullptr, &low);
  }
};

// MatMulBF16 with its output rounded to bfloat16 (nearest even): the products that feed only
// SwiGLUBF16 and SwiGLUBF16Grad, so the backward pass keeps half the bytes of them.
struct MatMulBF16Round : Bf16Product {
  using Bf16Product::Bf16Product;
  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& a, const Tensor<Ort::BFloat16_t>& w,
                      Tensor<Ort::BFloat16_t>& y) {
    return product(ctx, "MatMulBF16Round", a, w, y);
  }
};

// The AdamW update of every adapter tensor in one call. The scalars come from the optimizer graph's
// schedule: step_size = lr / (1 - beta1^t), decay = 1 - lr * weight_decay, bc2_sqrt = sqrt(1 - beta2^t).
// Each element takes exactly the plain graph's float32 operations in its order (this file is built
// without contracting a * b + c into one rounding), so both forms give the same bits.
struct AdamW {
  // 1 - beta as its own attribute: the graph rounds the exact difference to float32 once, which
  // 1.0f - beta1 (a difference of two roundings) does not reproduce.
  float b1, c1b, b2, c2b, eps;
  AdamW(const OrtApi*, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo k(info);
    b1 = k.GetAttribute<float>("beta1");
    c1b = k.GetAttribute<float>("one_minus_beta1");
    b2 = k.GetAttribute<float>("beta2");
    c2b = k.GetAttribute<float>("one_minus_beta2");
    eps = k.GetAttribute<float>("epsilon");
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& step_size, const Tensor<float>& decay,
                      const Tensor<float>& bc2_sqrt, const Ort::Custom::Variadic& in, Ort::Custom::Variadic& out) {
    return guarded("AdamW", [&]() -> Ort::Status {
      for (const auto* s : {&step_size, &decay, &bc2_sqrt})
        if (s->NumberOfElement() != 1) return fail("AdamW", "step_size, decay and bc2_sqrt must be scalars");
      const size_t n = in.Size();
      if (n == 0 || n % 4) return fail("AdamW", std::to_string(n) + " tensor inputs after the scalars: want 4 per tensor (p, g, m, v)");
      const size_t count = n / 4;
      if (auto st = outputs_missing(ctx, 3 * count, "AdamW"); !st.IsOK()) return st;
      struct Job { const float *p, *g, *m, *v; float *p1, *m1, *v1; size_t len; };
      std::vector<Job> jobs;
      for (size_t t = 0; t < count; ++t) {
        const auto& shape = in[4 * t]->Shape();
        for (size_t j = 1; j < 4; ++j)
          if (in[4 * t + j]->Shape() != shape)
            return fail("AdamW", "tensor " + std::to_string(t) + ": p " + shape_str(shape) + " and input " +
                                     std::to_string(j) + " " + shape_str(in[4 * t + j]->Shape()) + " differ");
        const float* src[4];
        for (size_t j = 0; j < 4; ++j) src[j] = static_cast<const float*>(in[4 * t + j]->DataRaw());
        float* p1 = out.AllocateOutput<float>(3 * t, shape);
        float* m1 = out.AllocateOutput<float>(3 * t + 1, shape);
        float* v1 = out.AllocateOutput<float>(3 * t + 2, shape);
        const size_t len = static_cast<size_t>(in[4 * t]->NumberOfElement());
        for (size_t lo = 0; lo < len; lo += BLOCK)
          jobs.push_back({src[0] + lo, src[1] + lo, src[2] + lo, src[3] + lo, p1 + lo, m1 + lo, v1 + lo,
                          std::min(BLOCK, len - lo)});
      }
      const float ss = step_size.Data()[0], dec = decay.Data()[0], bc2 = bc2_sqrt.Data()[0];
      const float c1 = b1, c2 = b2, e = eps;
      parallel(ctx, jobs.size(), [&](size_t i) {
        const Job& J = jobs[i];
        for (size_t k = 0; k < J.len; ++k) {
          const float g = J.g[k];
          const float m1 = J.m[k] * c1 + g * c1b;
          const float v1 = J.v[k] * c2 + (g * g) * c2b;
          const float denom = std::sqrt(v1) / bc2 + e;
          J.p1[k] = J.p[k] * dec - ss * (m1 / denom);
          J.m1[k] = m1;
          J.v1[k] = v1;
        }
      });
      return Ort::Status{nullptr};
    });
  }
};

}  // namespace

#if defined(_WIN32)
#define EDGETUNE_EXPORT __declspec(dllexport)
#else
#define EDGETUNE_EXPORT __attribute__((visibility("default")))
#endif

// The instruction set the kernels run with, for `edgetune doctor` and run.json.
extern "C" EDGETUNE_EXPORT const char* EdgetuneFusedIsa() { return K().name; }

// The ops this library implements, comma-separated: a bundle whose fused graphs use one it lacks
// runs its plain graphs.
// The bfloat16 ops (MatMulBF16, MatMulBF16Add, MatMulBF16LoRA, MatMulBF16Round, SwiGLUBF16, SwiGLUBF16Grad, CrossEntropyHeadBF16,
// AttentionTBF16, AttentionTBF16Grad)
// only where AMX or AVX512-BF16 runs the products (their plain C++ paths are there for tests and
// correctness, not speed).
extern "C" EDGETUNE_EXPORT const char* EdgetuneFusedOps() {
  static const std::string ops =
      std::string("SwiGLU,SwiGLUGrad,RMSNorm,RMSNormGrad,Rotary,RotaryGrad,RotaryT,RotaryTGrad,Attention,AttentionGrad,"
                  "AttentionT,AttentionTGrad,CrossEntropyHead,AdamW,"
                  "AddRMSNorm,AddRMSNormGrad,LoRA,LoRAGrad,LoRADown,LoRAGradH") +
      (bf16_kernel() != Bf16Kernel::none ? ",MatMulBF16,MatMulBF16Add,MatMulBF16LoRA,MatMulBF16Round,SwiGLUBF16,SwiGLUBF16Grad,"
                                           "CrossEntropyHeadBF16,AttentionTBF16,AttentionTBF16Grad"
                                         : "");
  return ops.c_str();
}

// Which instructions MatMulBF16 runs on: "amx", "avx512bf16", or "" (not listed in EdgetuneFusedOps).
extern "C" EDGETUNE_EXPORT const char* EdgetuneBF16() { return bf16_kernel_name(); }

// Bumped when an op's inputs, outputs or meaning change; a bundle's fused graph names the one it needs.
extern "C" EDGETUNE_EXPORT int EdgetuneFusedAbi() { return 1; }

extern "C" EDGETUNE_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  // The ops and their domain must outlive every session that uses them: they live for the process.
  static std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>> ops;
  static std::unique_ptr<Ort::CustomOpDomain> domain;
  try {
    if (!domain) {
      domain = std::make_unique<Ort::CustomOpDomain>("edgetune");
      const char* cpu = "CPUExecutionProvider";
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp("SwiGLU", cpu, SwiGLU));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp("SwiGLUGrad", cpu, SwiGLUGrad));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp<RMSNorm>("RMSNorm", cpu));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp("RMSNormGrad", cpu, RMSNormGrad));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp<AddRMSNorm>("AddRMSNorm", cpu));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp("AddRMSNormGrad", cpu, AddRMSNormGrad));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp("Rotary", cpu, Rotary));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp("RotaryGrad", cpu, RotaryGrad));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp("RotaryT", cpu, RotaryT));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp("RotaryTGrad", cpu, RotaryTGrad));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp<Attention>("Attention", cpu));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp<AttentionGrad>("AttentionGrad", cpu));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp<AttentionT>("AttentionT", cpu));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp<AttentionTGrad>("AttentionTGrad", cpu));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp<CrossEntropyHead>("CrossEntropyHead", cpu));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp<AdamW>("AdamW", cpu));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp<LoRA>("LoRA", cpu));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp<LoRAGrad>("LoRAGrad", cpu));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp<LoRADown>("LoRADown", cpu));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp<LoRAGradH>("LoRAGradH", cpu));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp<MatMulBF16>("MatMulBF16", cpu));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp<MatMulBF16Add>("MatMulBF16Add", cpu));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp<MatMulBF16LoRA>("MatMulBF16LoRA", cpu));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp<MatMulBF16Round>("MatMulBF16Round", cpu));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp("SwiGLUBF16", cpu, SwiGLUBF16));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp("SwiGLUBF16Grad", cpu, SwiGLUBF16Grad));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp<CrossEntropyHeadBF16>("CrossEntropyHeadBF16", cpu));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp<AttentionTBF16>("AttentionTBF16", cpu));
      ops.emplace_back(Ort::Custom::CreateLiteCustomOp<AttentionTBF16Grad>("AttentionTBF16Grad", cpu));
      for (auto& op : ops) domain->Add(op.get());
    }
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
