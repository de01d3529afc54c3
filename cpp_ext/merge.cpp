// Adapter merge kernels: W += sum_i coef_i * B_i @ A_i, in place, a tile at a time.
//
// A merge reads and writes every weight once, like a copy. The kernels never build the
// full-size B @ A: they compute a block of rows of the product into a small buffer that
// stays in cache, add it into W, and move on. Threads split W by rows.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace nb = nanobind;

namespace {

enum class DType { F32, F16, BF16 };

// Vector width comes from -march (EDGETUNE_ARCH in CMakeLists.txt).

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { man <<= 1; ++e; } while ((man & 0x400u) == 0);
      u = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow to inf
  if (a < 0x38800000u) {  // half subnormal: units of 2^-24, scaling by a power of two is exact
    float mag;
    std::memcpy(&mag, &a, 4);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(mag * 16777216.0f)));
  }
  uint32_t e = (a >> 23) - 112u;
  uint32_t m = a & 0x7fffffu;
  uint32_t q = (e << 10) | (m >> 13);
  uint32_t rem = m & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) ++q;
  return static_cast<uint16_t>(sign | q);
}

struct Adapter {
  std::vector<float> a;  // r x cols, float32
  std::vector<float> ap; // A packed by 16-column tiles: [cols / 16][r][16], read sequentially by the micro-kernel
  std::vector<float> b;  // rows x r, float32, already multiplied by coef
  size_t r;
};

constexpr size_t ROWS = 4;    // rows of W per register block
constexpr size_t COLS = 256;  // columns per tile: ROWS * COLS floats stay in L1

// acc[ROWS][COLS] = sum_i B_i[row0:row0+ROWS, :] @ A_i[:, c0:c0+n]
void tile_product(const std::vector<Adapter>& ads, size_t row0, size_t nrows, size_t c0, size_t n, size_t cols,
                  float* acc) {
  std::fill(acc, acc + ROWS * COLS, 0.0f);
  for (const Adapter& ad : ads) {
    for (size_t k = 0; k < ad.r; ++k) {
      const float* arow = ad.a.data() + k * cols + c0;
      float b0 = nrows > 0 ? ad.b[(row0 + 0) * ad.r + k] : 0.0f;
      float b1 = nrows > 1 ? ad.b[(row0 + 1) * ad.r + k] : 0.0f;
      float b2 = nrows > 2 ? ad.b[(row0 + 2) * ad.r + k] : 0.0f;
      float b3 = nrows > 3 ? ad.b[(row0 + 3) * ad.r + k] : 0.0f;
      float* a0 = acc;
      float* a1 = acc + COLS;
      float* a2 = acc + 2 * COLS;
      float* a3 = acc + 3 * COLS;
      for (size_t j = 0; j < n; ++j) {
        float x = arow[j];
        a0[j] += b0 * x;
        a1[j] += b1 * x;
        a2[j] += b2 * x;
        a3[j] += b3 * x;
      }
    }
  }
}

template <DType D>
inline float load(const void* w, size_t i) {
  if constexpr (D == DType::F32) return static_cast<const float*>(w)[i];
  else if constexpr (D == DType::BF16) return bf16_to_f32(static_cast<const uint16_t*>(w)[i]);
  else return f16_to_f32(static_cast<const uint16_t*>(w)[i]);
}

template <DType D>
inline void store(void* w, size_t i, float v) {
  if constexpr (D == DType::F32) static_cast<float*>(w)[i] = v;
  else if constexpr (D == DType::BF16) static_cast<uint16_t*>(w)[i] = f32_to_bf16(v);
  else static_cast<uint16_t*>(w)[i] = f32_to_f16(v);
}

typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

// Eight bfloat16 values in, eight floats out, and back with round-to-nearest-even, as vectors.
inline v8f bf16x8_to_f32(const uint16_t* p) {
  v8h h;
  std::memcpy(&h, p, 16);
  v8u u = __builtin_convertvector(h, v8u) << 16;
  v8f f;
  std::memcpy(&f, &u, 32);
  return f;
}

inline void f32x8_to_bf16(uint16_t* p, v8f f) {
  v8u u;
  std::memcpy(&u, &f, 32);
  v8u r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  v8u q = (u >> 16) | 0x40u;
  v8i nan = (v8i)((u & 0x7fffffffu) > 0x7f800000u);  // all-ones where NaN
  v8u out = (q & (v8u)nan) | (r & ~(v8u)nan);
  v8h h = __builtin_convertvector(out, v8h);
  std::memcpy(p, &h, 16);
}
constexpr size_t NR = 16;   // columns per micro-tile: two 8-float vectors
constexpr size_t A_BLOCK_BYTES = 256 * 1024;  // the packed A of one column block stays in L2

inline v8f loadu8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// W[row0 + i, j0:j0+16] += sum over adapters and k of B[row0 + i, k] * A[k, j0:j0+16], for i < nr.
// A 6 x 16 register tile: 12 accumulators, two A vectors and one broadcast fill the 16 AVX
// registers, so each k costs 2 loads and 6 broadcasts for 12 FMAs. W is read and written once.
constexpr size_t MR = 6;

template <DType D>
void micro_16(void* w, size_t row0, size_t nr, size_t j0, size_t cols, const std::vector<Adapter>& ads) {
  v8f c00 = {}, c01 = {}, c10 = {}, c11 = {}, c20 = {}, c21 = {}, c30 = {}, c31 = {}, c40 = {}, c41 = {}, c50 = {},
      c51 = {};
  for (const Adapter& ad : ads) {
    // B is padded with zero rows past the end, so the loop has no branch.
    const float* bp = ad.b.data() + row0 * ad.r;
    const size_t r = ad.r;
    const float* ap = ad.ap.data() + (j0 / NR) * r * NR;
    for (size_t k = 0; k < r; ++k, ap += NR) {
      v8f x0 = loadu8(ap), x1 = loadu8(ap + 8);
#if defined(__GNUC__)
      asm("" : "+x"(x0), "+x"(x1));  // keep A in registers instead of reloading it for every row
#endif
      float b0 = bp[k], b1 = bp[r + k], b2 = bp[2 * r + k], b3 = bp[3 * r + k], b4 = bp[4 * r + k], b5 = bp[5 * r + k];
      c00 += b0 * x0; c01 += b0 * x1;
      c10 += b1 * x0; c11 += b1 * x1;
      c20 += b2 * x0; c21 += b2 * x1;
      c30 += b3 * x0; c31 += b3 * x1;
      c40 += b4 * x0; c41 += b4 * x1;
      c50 += b5 * x0; c51 += b5 * x1;
    }
  }
  const v8f acc[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (size_t i = 0; i < nr; ++i) {
    size_t base = (row0 + i) * cols + j0;
    if constexpr (D == DType::F32) {
      float* row = static_cast<float*>(w) + base;
      v8f r0 = loadu8(row) + acc[i][0], r1 = loadu8(row + 8) + acc[i][1];
      std::memcpy(row, &r0, 32);
      std::memcpy(row + 8, &r1, 32);
    } else if constexpr (D == DType::BF16) {
      uint16_t* row = static_cast<uint16_t*>(w) + base;
      f32x8_to_bf16(row, bf16x8_to_f32(row) + acc[i][0]);
      f32x8_to_bf16(row + 8, bf16x8_to_f32(row + 8) + acc[i][1]);
    } else {
      float tmp[NR];
      std::memcpy(tmp, &acc[i][0], 32);
      std::memcpy(tmp + 8, &acc[i][1], 32);
      for (size_t l = 0; l < NR; ++l) store<D>(w, base + l, load<D>(w, base + l) + tmp[l]);
    }
  }
}

// Columns left over after the 16-wide tiles: plain scalar loop.
template <DType D>
void tail_cols(void* w, size_t row0, size_t nr, size_t j0, size_t j1, size_t cols, const std::vector<Adapter>& ads) {
  for (size_t i = 0; i < nr; ++i) {
    for (size_t j = j0; j < j1; ++j) {
      float s = 0.0f;
      for (const Adapter& ad : ads)
        for (size_t k = 0; k < ad.r; ++k) s += ad.b[(row0 + i) * ad.r + k] * ad.a[k * cols + j];
      size_t idx = (row0 + i) * cols + j;
      store<D>(w, idx, load<D>(w, idx) + s);
    }
  }
}

template <DType D>
void merge_rows(void* w, size_t r0, size_t r1, size_t cols, const std::vector<Adapter>& ads) {
  size_t full = cols / NR * NR;
  size_t rank = 0;
  for (const Adapter& ad : ads) rank += ad.r;
  // Widest column block whose A fits the budget: at low rank whole rows, so W streams contiguously.
  size_t CB = std::max(NR, A_BLOCK_BYTES / (sizeof(float) * std::max<size_t>(1, rank)) / NR * NR);
  for (size_t c0 = 0; c0 < full; c0 += CB) {
    size_t c1 = std::min(full, c0 + CB);
    for (size_t row = r0; row < r1; row += MR) {
      size_t nr = std::min(MR, r1 - row);
      for (size_t j = c0; j < c1; j += NR) micro_16<D>(w, row, nr, j, cols, ads);
    }
  }
  if (full < cols)
    for (size_t row = r0; row < r1; row += ROWS) tail_cols<D>(w, row, std::min(ROWS, r1 - row), full, cols, cols, ads);
}

// DoRA: W'[o,:] = m[o] * (W[o,:] + s B[o,:] A) / ||W[o,:] + s B[o,:] A||, a block of rows at a time.
template <DType D>
void dora_rows(void* w, size_t r0, size_t r1, size_t cols, const std::vector<Adapter>& ads, const float* mag) {
  std::vector<float> acc(ROWS * COLS);
  std::vector<float> merged(ROWS * cols);
  for (size_t row = r0; row < r1; row += ROWS) {
    size_t nr = std::min(ROWS, r1 - row);
    for (size_t c0 = 0; c0 < cols; c0 += COLS) {
      size_t n = std::min(COLS, cols - c0);
      tile_product(ads, row, nr, c0, n, cols, acc.data());
      for (size_t i = 0; i < nr; ++i)
        for (size_t j = 0; j < n; ++j)
          merged[i * cols + c0 + j] = load<D>(w, (row + i) * cols + c0 + j) + acc[i * COLS + j];
    }
    for (size_t i = 0; i < nr; ++i) {
      double ss = 0.0;
      for (size_t j = 0; j < cols; ++j) ss += static_cast<double>(merged[i * cols + j]) * merged[i * cols + j];
      float k = static_cast<float>(mag[row + i] / std::sqrt(ss));
      for (size_t j = 0; j < cols; ++j) store<D>(w, (row + i) * cols + j, merged[i * cols + j] * k);
    }
  }
}

template <typename F>
void parallel_rows(size_t rows, int threads, F&& fn) {
  size_t nt = threads > 0 ? static_cast<size_t>(threads) : std::max(1u, std::thread::hardware_concurrency());
  nt = std::max<size_t>(1, std::min(nt, (rows + ROWS - 1) / ROWS));
  if (nt == 1) {
    fn(0, rows);
    return;
  }
  size_t blocks = (rows + ROWS - 1) / ROWS;
  std::vector<std::thread> pool;
  for (size_t t = 0; t < nt; ++t) {
    size_t b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;
    size_t r0 = std::min(rows, b0 * ROWS), r1 = std::min(rows, b1 * ROWS);
    pool.emplace_back([&fn, r0, r1] { fn(r0, r1); });
  }
  for (auto& th : pool) th.join();
}

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
    for (size_t i = 0; i < n; ++i) out[i] = f16_to_f32(p[i]);
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
  std::vector<Adapter> ads;
  size_t rows, cols;
  DType dt;
};

Prepared prepare(AnyArray w, const std::vector<AnyArray>& as, const std::vector<AnyArray>& bs,
                 const std::vector<double>& coefs, const std::string& kind, const std::string& name) {
  if (w.ndim() != 2) throw std::invalid_argument(name + ": W must be 2-D, got shape " + shape_str(w));
  if (!is_contiguous(w)) throw std::invalid_argument(name + ": W must be C-contiguous (got strides of a view)");
  if (as.size() != bs.size() || as.size() != coefs.size())
    throw std::invalid_argument(name + ": need as many A, B and coefficients");
  Prepared p;
  p.rows = w.shape(0);
  p.cols = w.shape(1);
  p.dt = weight_dtype(w, kind, name);
  for (size_t i = 0; i < as.size(); ++i) {
    const AnyArray& a = as[i];
    const AnyArray& b = bs[i];
    if (a.ndim() != 2 || b.ndim() != 2 || b.shape(1) != a.shape(0) || b.shape(0) != p.rows || a.shape(1) != p.cols)
      throw std::invalid_argument(name + ": shapes do not fit: W " + shape_str(w) + ", A " + shape_str(a) + ", B " +
                                  shape_str(b) + " (need A (r, " + std::to_string(p.cols) + "), B (" +
                                  std::to_string(p.rows) + ", r))");
    Adapter ad;
    ad.r = a.shape(0);
    ad.a = to_f32(a, name + ": A");
    ad.b = to_f32(b, name + ": B");
    for (float& x : ad.b) x *= static_cast<float>(coefs[i]);
    ad.b.resize((p.rows + MR) * ad.r, 0.0f);  // zero rows past the end: the micro-kernel never branches
    size_t tiles = p.cols / NR;
    ad.ap.resize(tiles * ad.r * NR);
    for (size_t t = 0; t < tiles; ++t)
      for (size_t k = 0; k < ad.r; ++k)
        std::memcpy(&ad.ap[(t * ad.r + k) * NR], &ad.a[k * p.cols + t * NR], NR * sizeof(float));
    p.ads.push_back(std::move(ad));
  }
  return p;
}

template <typename F>
void dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: f(std::integral_constant<DType, DType::F32>{}); break;
    case DType::F16: f(std::integral_constant<DType, DType::F16>{}); break;
    case DType::BF16: f(std::integral_constant<DType, DType::BF16>{}); break;
  }
}

void lora_merge(AnyArray w, std::vector<AnyArray> as, std::vector<AnyArray> bs, std::vector<double> coefs,
                const std::string& kind, double sign, int threads, const std::string& name) {
  for (double& c : coefs) c *= sign;
  Prepared p = prepare(w, as, bs, coefs, kind, name);
  void* data = w.data();
  nb::gil_scoped_release release;
  dispatch(p.dt, [&](auto tag) {
    constexpr DType D = decltype(tag)::value;
    parallel_rows(p.rows, threads, [&](size_t r0, size_t r1) { merge_rows<D>(data, r0, r1, p.cols, p.ads); });
  });
}

void dora_merge(AnyArray w, AnyArray a, AnyArray b, double scale, AnyArray mag, const std::string& kind, int threads,
                const std::string& name) {
  Prepared p = prepare(w, {a}, {b}, {scale}, kind, name);
  std::vector<float> m = to_f32(mag, name + ": magnitude");
  if (m.size() != p.rows)
    throw std::invalid_argument(name + ": magnitude has " + std::to_string(m.size()) + " values, W has " +
                                std::to_string(p.rows) + " rows");
  void* data = w.data();
  nb::gil_scoped_release release;
  dispatch(p.dt, [&](auto tag) {
    constexpr DType D = decltype(tag)::value;
    parallel_rows(p.rows, threads, [&](size_t r0, size_t r1) { dora_rows<D>(data, r0, r1, p.cols, p.ads, m.data()); });
  });
}

// Index of the first non-finite value, or -1.
int64_t first_nonfinite(AnyArray w, const std::string& kind) {
  size_t n = w.size();
  DType dt = weight_dtype(w, kind, "tensor");
  const void* d = w.data();
  nb::gil_scoped_release release;
  for (size_t i = 0; i < n; ++i) {
    float v = dt == DType::F32 ? load<DType::F32>(d, i) : dt == DType::BF16 ? load<DType::BF16>(d, i) : load<DType::F16>(d, i);
    if (!std::isfinite(v)) return static_cast<int64_t>(i);
  }
  return -1;
}

void convert(AnyArray src, const std::string& src_kind, AnyArray dst, const std::string& dst_kind) {
  if (src.size() != dst.size()) throw std::invalid_argument("convert: sizes differ");
  DType s = weight_dtype(src, src_kind, "source"), d = weight_dtype(dst, dst_kind, "destination");
  const void* in = src.data();
  void* out = dst.data();
  size_t n = src.size();
  nb::gil_scoped_release release;
  dispatch(s, [&](auto st) {
    dispatch(d, [&](auto dt) {
      constexpr DType S = decltype(st)::value;
      constexpr DType T = decltype(dt)::value;
      for (size_t i = 0; i < n; ++i) store<T>(out, i, load<S>(in, i));
    });
  });
}

}  // namespace

NB_MODULE(_ext, m) {
  m.doc() = "edgetune's adapter merge kernels (see edgetune.merge for the numpy reference)";
  m.def("lora_merge", &lora_merge, nb::arg("w"), nb::arg("a"), nb::arg("b"), nb::arg("coefs"), nb::arg("dtype"),
        nb::arg("sign") = 1.0, nb::arg("threads") = 0, nb::arg("name") = "W",
        "W += sign * sum_i coefs[i] * b[i] @ a[i], in place, tile by tile.");
  m.def("dora_merge", &dora_merge, nb::arg("w"), nb::arg("a"), nb::arg("b"), nb::arg("scale"), nb::arg("magnitude"),
        nb::arg("dtype"), nb::arg("threads") = 0, nb::arg("name") = "W",
        "W = magnitude * (W + scale * b @ a) / row_norm(W + scale * b @ a), in place.");
  m.def("first_nonfinite", &first_nonfinite, nb::arg("w"), nb::arg("dtype"));
  m.def("convert", &convert, nb::arg("src"), nb::arg("src_dtype"), nb::arg("dst"), nb::arg("dst_dtype"));
}
