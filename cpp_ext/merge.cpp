// Python bindings for the adapter merge kernels in kernels.hpp, through dispatch.cpp.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common.hpp"
#define EDGETUNE_ISA_NS isa_generic  // the scalar conversions, compiled for the baseline like isa_generic.cpp
#include "kernels.hpp"

namespace nb = nanobind;

namespace {

using edgetune::DType;
namespace scalar = edgetune::isa_generic;

using AnyArray = nb::ndarray<nb::device::cpu>;

std::string shape_str(const AnyArray& x) {
  std::string s = "(";
  for (size_t i = 0; i < x.ndim(); ++i) s += (i ? ", " : "") + std::to_string(x.shape(i));
  return s + (x.ndim() == 1 ? ",)" : ")");
}

bool is_contiguous(const AnyArray& x) {
  int64_t expect = 1;
  for (size_t i = x.ndim(); i-- > 0;) {
    if (x.shape(i) != 1 && x.stride(i) != expect) return false;
    expect *= static_cast<int64_t>(x.shape(i));
  }
  return true;
}

std::vector<float> to_f32(const AnyArray& x, const std::string& what) {
  if (!is_contiguous(x)) throw std::invalid_argument(what + " must be C-contiguous");
  size_t n = x.size();
  std::vector<float> out(n);
  if (x.dtype() == nb::dtype<float>()) {
    std::memcpy(out.data(), x.data(), n * 4);
  } else if (x.dtype() == nb::dtype<uint16_t>() || x.dtype().code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float)) {
    if (x.dtype().bits != 16) throw std::invalid_argument(what + " must be float32 or float16");
    const uint16_t* p = static_cast<const uint16_t*>(x.data());
    for (size_t i = 0; i < n; ++i) out[i] = scalar::f16_to_f32(p[i]);
  } else {
    throw std::invalid_argument(what + " must be float32 or float16");
  }
  return out;
}

DType weight_dtype(const AnyArray& w, const std::string& kind, const std::string& name) {
  auto dt = w.dtype();
  if (kind == "float32" && dt == nb::dtype<float>()) return DType::F32;
  if (kind == "float16" && dt.bits == 16) return DType::F16;
  if (kind == "bfloat16" && dt.bits == 16) return DType::BF16;
  throw std::invalid_argument(name + ": weight dtype does not match '" + kind +
                              "' (float32 needs a float32 array; float16/bfloat16 need 16-bit arrays)");
}

struct Prepared {
  size_t rows = 0, cols = 0;
  DType dt = DType::F32;
  std::vector<edgetune::Factor> fs;
  std::vector<std::vector<float>> widened;  // float16 adapters widened; fs points into them
};

// Checks every array; float32 adapters are read in place, float16 ones are widened first.
Prepared prepare(AnyArray w, const std::vector<AnyArray>& as, const std::vector<AnyArray>& bs,
                 const std::vector<double>& coefs, const std::string& kind, const std::string& name) {
  if (w.ndim() != 2) throw std::invalid_argument(name + ": W must be 2-D, got shape " + shape_str(w));
  if (!is_contiguous(w)) throw std::invalid_argument(name + ": W must be C-contiguous (got strides of a view)");
  if (as.size() != bs.size() || as.size() != coefs.size())
    throw std::invalid_argument(name + ": need as many A, B and coefficients");
  const size_t rows = w.shape(0), cols = w.shape(1);
  Prepared p;
  p.rows = rows;
  p.cols = cols;
  p.dt = weight_dtype(w, kind, name);
  std::vector<std::vector<float>>& widened = p.widened;
  widened.reserve(2 * as.size());  // pointers into it must stay valid
  auto as_f32 = [&](const AnyArray& x, const std::string& what) -> const float* {
    if (!is_contiguous(x)) throw std::invalid_argument(what + " must be C-contiguous");
    if (x.dtype() == nb::dtype<float>()) return static_cast<const float*>(x.data());
    widened.push_back(to_f32(x, what));
    return widened.back().data();
  };
  std::vector<edgetune::Factor>& fs = p.fs;
  for (size_t i = 0; i < as.size(); ++i) {
    const AnyArray& a = as[i];
    const AnyArray& b = bs[i];
    if (a.ndim() != 2 || b.ndim() != 2 || b.shape(1) != a.shape(0) || b.shape(0) != rows || a.shape(1) != cols)
      throw std::invalid_argument(name + ": shapes do not fit: W " + shape_str(w) + ", A " + shape_str(a) + ", B " +
                                  shape_str(b) + " (need A (r, " + std::to_string(cols) + "), B (" +
                                  std::to_string(rows) + ", r))");
    fs.push_back({as_f32(a, name + ": A"), as_f32(b, name + ": B"), a.shape(0), static_cast<float>(coefs[i])});
  }
  return p;
}

bool lora_merge(AnyArray w, std::vector<AnyArray> as, std::vector<AnyArray> bs, std::vector<double> coefs,
                const std::string& kind, double sign, int threads, const std::string& name) {
  for (double& c : coefs) c *= sign;
  Prepared p = prepare(w, as, bs, coefs, kind, name);
  const edgetune::Ops& ops = edgetune::selected_ops();
  void* data = w.data();
  nb::gil_scoped_release release;
  return ops.lora_merge(data, p.rows, p.cols, p.fs, p.dt, threads);
}

// Many weights at once (a whole model's adapters): each W is checked first, with the GIL held; then
// the small ones (work a single thread does in well under a millisecond) are dealt out to the
// threads whole, each thread merging its share one after another with no hand-off per matrix,
// and the large ones are split by rows as lora_merge does. Returns, per W, whether a non-finite
// value was written.
std::vector<bool> lora_merge_batch(std::vector<AnyArray> ws, std::vector<std::vector<AnyArray>> as,
                                   std::vector<std::vector<AnyArray>> bs, std::vector<std::vector<double>> coefs,
                                   const std::string& kind, double sign, int threads, std::vector<std::string> names) {
  const size_t n = ws.size();
  if (as.size() != n || bs.size() != n || coefs.size() != n || names.size() != n)
    throw std::invalid_argument("lora_merge_batch: need as many W, A lists, B lists, coefficient lists and names");
  std::vector<Prepared> ps;
  ps.reserve(n);
  std::vector<void*> data(n);
  for (size_t i = 0; i < n; ++i) {
    for (double& c : coefs[i]) c *= sign;
    ps.push_back(prepare(ws[i], as[i], bs[i], coefs[i], kind, names[i]));
    data[i] = ws[i].data();
  }
  const edgetune::Ops& ops = edgetune::selected_ops();
  const size_t hw = threads > 0 ? static_cast<size_t>(threads) : std::max(1u, std::thread::hardware_concurrency());
  std::vector<char> bad(n, 0);
  nb::gil_scoped_release release;
  // Work of one merge, in multiply-adds plus a load and a store per weight; below SMALL a matrix
  // goes to one thread whole.
  constexpr size_t SMALL = size_t(1) << 23;
  auto work = [&](size_t i) {
    size_t r = 0;
    for (const edgetune::Factor& f : ps[i].fs) r += f.r;
    return ps[i].rows * ps[i].cols * (r + 8);
  };
  std::vector<size_t> small;
  for (size_t i = 0; i < n; ++i) {
    if (work(i) >= SMALL || hw == 1)
      bad[i] = ops.lora_merge(data[i], ps[i].rows, ps[i].cols, ps[i].fs, ps[i].dt, threads);
    else
      small.push_back(i);
  }
  if (!small.empty()) {
    // Largest first, each to the least loaded thread.
    std::sort(small.begin(), small.end(), [&](size_t x, size_t y) { return work(x) > work(y); });
    const size_t nt = std::min(hw, small.size());
    std::vector<std::vector<size_t>> share(nt);
    std::vector<size_t> load(nt, 0);
    for (size_t i : small) {
      const size_t t = static_cast<size_t>(std::min_element(load.begin(), load.end()) - load.begin());
      share[t].push_back(i);
      load[t] += work(i);
    }
    edgetune::run_parallel(nt, [&](size_t t) {
      for (size_t i : share[t]) bad[i] = ops.lora_merge(data[i], ps[i].rows, ps[i].cols, ps[i].fs, ps[i].dt, 1);
    });
  }
  return std::vector<bool>(bad.begin(), bad.end());
}

void dora_merge(AnyArray w, AnyArray a, AnyArray b, double scale, AnyArray mag, const std::string& kind, int threads,
                const std::string& name) {
  Prepared p = prepare(w, {a}, {b}, {scale}, kind, name);
  std::vector<float> m = to_f32(mag, name + ": magnitude");
  if (m.size() != p.rows)
    throw std::invalid_argument(name + ": magnitude has " + std::to_string(m.size()) + " values, W has " +
                                std::to_string(p.rows) + " rows");
  const edgetune::Ops& ops = edgetune::selected_ops();
  void* data = w.data();
  nb::gil_scoped_release release;
  ops.dora_merge(data, p.rows, p.cols, p.fs, p.dt, m.data(), threads);
}

// Index of the first non-finite value, or -1. A value is non-finite when its exponent bits are
// all ones; blocks are tested branch-free on the raw bits (the compiler vectorises the loop), and
// only a block that has one is searched for its index.
template <typename U>
int64_t first_all_ones(const U* p, size_t n, U exp_mask) {
  constexpr size_t BLOCK = 4096;
  for (size_t b0 = 0; b0 < n; b0 += BLOCK) {
    const size_t b1 = std::min(n, b0 + BLOCK);
    unsigned bad = 0;
    for (size_t i = b0; i < b1; ++i) bad |= static_cast<unsigned>((p[i] & exp_mask) == exp_mask);
    if (bad)
      for (size_t i = b0; i < b1; ++i)
        if ((p[i] & exp_mask) == exp_mask) return static_cast<int64_t>(i);
  }
  return -1;
}

int64_t first_nonfinite(AnyArray w, const std::string& kind) {
  size_t n = w.size();
  DType dt = weight_dtype(w, kind, "tensor");
  const void* d = w.data();
  nb::gil_scoped_release release;
  if (dt == DType::F32) return first_all_ones(static_cast<const uint32_t*>(d), n, uint32_t{0x7f800000u});
  if (dt == DType::BF16) return first_all_ones(static_cast<const uint16_t*>(d), n, uint16_t{0x7f80u});
  return first_all_ones(static_cast<const uint16_t*>(d), n, uint16_t{0x7c00u});
}

void convert(AnyArray src, const std::string& src_kind, AnyArray dst, const std::string& dst_kind) {
  if (src.size() != dst.size()) throw std::invalid_argument("convert: sizes differ");
  DType s = weight_dtype(src, src_kind, "source"), d = weight_dtype(dst, dst_kind, "destination");
  const void* in = src.data();
  void* out = dst.data();
  size_t n = src.size();
  nb::gil_scoped_release release;
  scalar::dispatch(s, [&](auto st) {
    scalar::dispatch(d, [&](auto dt) {
      constexpr DType S = decltype(st)::value;
      constexpr DType T = decltype(dt)::value;
      for (size_t i = 0; i < n; ++i) scalar::store1<T>(out, i, scalar::load1<S>(in, i));
    });
  });
}

}  // namespace

NB_MODULE(_ext, m) {
  m.doc() = "edgetune's adapter merge kernels (see edgetune.kernels for the numpy reference)";
  m.def("lora_merge", &lora_merge, nb::arg("w"), nb::arg("a"), nb::arg("b"), nb::arg("coefs"), nb::arg("dtype"),
        nb::arg("sign") = 1.0, nb::arg("threads") = 0, nb::arg("name") = "W",
        "W += sign * sum_i coefs[i] * b[i] @ a[i], in place, tile by tile; True if a value written was not "
        "finite (float32 values before any 16-bit rounding).");
  m.def("lora_merge_batch", &lora_merge_batch, nb::arg("ws"), nb::arg("as"), nb::arg("bs"), nb::arg("coefs"),
        nb::arg("dtype"), nb::arg("sign"), nb::arg("threads"), nb::arg("names"),
        "lora_merge over many weights of one dtype in one call: small ones dealt out to the threads whole; "
        "returns per W whether a non-finite value was written");
  m.def("dora_merge", &dora_merge, nb::arg("w"), nb::arg("a"), nb::arg("b"), nb::arg("scale"), nb::arg("magnitude"),
        nb::arg("dtype"), nb::arg("threads") = 0, nb::arg("name") = "W",
        "W = magnitude * (W + scale * b @ a) / row_norm(W + scale * b @ a), in place.");
  // The selected kernels' throughput loops, run without the GIL.
  using Loop = double (*edgetune::Ops::*)(int, size_t);
  auto peak = [](Loop loop) {
    return [loop](int threads, size_t iters) {
      const edgetune::Ops& ops = edgetune::selected_ops();
      nb::gil_scoped_release release;
      return (ops.*loop)(threads, iters);
    };
  };
  m.def("peak_gflops", peak(&edgetune::Ops::peak_gflops), nb::arg("threads") = 0, nb::arg("iters") = 20000000,
        "Multiply-add throughput of this machine in GFLOP/s, with the selected kernels' vector width "
        "(for benchmarks).");
  m.def("peak_bf16_gflops", peak(&edgetune::Ops::peak_bf16_gflops), nb::arg("threads") = 0, nb::arg("iters") = 20000000,
        "bfloat16 dot-product (vdpbf16ps) throughput in GFLOP/s where the selected kernels have AVX512-BF16, "
        "else 0 (for benchmarks of bfloat16 products).");
  m.def(
      "isa", [] { return std::string(edgetune::selected_ops().name); },
      "The instruction set the kernels run with: the widest this CPU has, or EDGETUNE_ISA.");
  m.def(
      "isas",
      [] {
        std::vector<std::string> v;
        for (const auto& o : edgetune::available_ops()) v.push_back(o.name);
        return v;
      },
      "Every instruction-set build of the kernels this CPU can run.");
  m.def("first_nonfinite", &first_nonfinite, nb::arg("w"), nb::arg("dtype"));
  m.def("convert", &convert, nb::arg("src"), nb::arg("src_dtype"), nb::arg("dst"), nb::arg("dst_dtype"));
}
