// Small pieces the trainer needs and C++17 lacks: JSON, SHA-256, safetensors, atomic files.
// Kept dependency-free so that an app can copy them as they are.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

namespace et {

namespace fs = std::filesystem;

// An error the program reports as one line and exits 1 on.
struct Fail : std::runtime_error {
  explicit Fail(const std::string& m) : std::runtime_error(m) {}
};

// ---------------------------------------------------------------------------------------------
// JSON: a value tree that keeps the order of object keys and the text of numbers as read.
struct Json {
  enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
  bool b = false;
  std::string text;  // a number's text, a string's value
  std::vector<Json> items;
  std::vector<std::pair<std::string, Json>> fields;

  static Json num(double v) {
    Json j;
    j.kind = Number;
    char buf[40];
    if (v == std::floor(v) && std::fabs(v) < 1e15) std::snprintf(buf, sizeof buf, "%.1f", v);
    else std::snprintf(buf, sizeof buf, "%.17g", v);
    j.text = buf;
    return j;
  }
  static Json integer(long long v) { Json j; j.kind = Number; j.text = std::to_string(v); return j; }
  static Json str(const std::string& s) { Json j; j.kind = String; j.text = s; return j; }
  static Json boolean(bool v) { Json j; j.kind = Bool; j.b = v; return j; }
  static Json array() { Json j; j.kind = Array; return j; }
  static Json object() { Json j; j.kind = Object; return j; }

  const Json* find(const std::string& k) const {
    if (kind != Object) return nullptr;
    for (auto& f : fields) if (f.first == k) return &f.second;
    return nullptr;
  }
  const Json& at(const std::string& k, const std::string& where) const {
    const Json* v = find(k);
    if (!v) throw Fail(where + ": no \"" + k + "\" entry");
    return *v;
  }
  Json& set(const std::string& k, Json v) {
    for (auto& f : fields) if (f.first == k) { f.second = std::move(v); return f.second; }
    fields.emplace_back(k, std::move(v));
    return fields.back().second;
  }
  double number() const { return kind == Number ? std::strtod(text.c_str(), nullptr) : NAN; }
  long long integer() const { return kind == Number ? std::llround(number()) : 0; }
  bool is_null() const { return kind == Null; }
};

class JsonParser {
 public:
  JsonParser(const std::string& s, std::string where) : s_(s), where_(std::move(where)) {}
  Json parse() {
    Json v = value(0);
    ws();
    if (i_ != s_.size()) err("extra text after the JSON value");
    return v;
  }

 private:
  const std::string& s_;
  std::string where_;
  size_t i_ = 0;
  [[noreturn]] void err(const std::string& m) {
    throw Fail(where_ + " is not valid JSON (" + m + " at byte " + std::to_string(i_) + ")");
  }
  void ws() { while (i_ < s_.size() && std::strchr(" \t\r\n", s_[i_])) ++i_; }
  Json value(int depth) {
    if (depth > 64) err("nested too deeply");
    ws();
    if (i_ >= s_.size()) err("unexpected end");
    char c = s_[i_];
    if (c == '{') {
      ++i_;
      Json o = Json::object();
      ws();
      if (i_ < s_.size() && s_[i_] == '}') { ++i_; return o; }
      for (;;) {
        ws();
        if (i_ >= s_.size() || s_[i_] != '"') err("expected a key");
        std::string k = string();
        ws();
        if (i_ >= s_.size() || s_[i_] != ':') err("expected ':'");
        ++i_;
        o.fields.emplace_back(k, value(depth + 1));
        ws();
        if (i_ < s_.size() && s_[i_] == ',') { ++i_; continue; }
        if (i_ < s_.size() && s_[i_] == '}') { ++i_; return o; }
        err("expected ',' or '}'");
      }
    }
    if (c == '[') {
      ++i_;
      Json a = Json::array();
      ws();
      if (i_ < s_.size() && s_[i_] == ']') { ++i_; return a; }
      for (;;) {
        a.items.push_back(value(depth + 1));
        ws();
        if (i_ < s_.size() && s_[i_] == ',') { ++i_; continue; }
        if (i_ < s_.size() && s_[i_] == ']') { ++i_; return a; }
        err("expected ',' or ']'");
      }
    }
    if (c == '"') return Json::str(string());
    if (s_.compare(i_, 4, "true") == 0) { i_ += 4; return Json::boolean(true); }
    if (s_.compare(i_, 5, "false") == 0) { i_ += 5; return Json::boolean(false); }
    if (s_.compare(i_, 4, "null") == 0) { i_ += 4; return Json(); }
    size_t start = i_;
    while (i_ < s_.size() && std::strchr("+-0123456789.eE", s_[i_])) ++i_;
    if (start == i_) err("unexpected character");
    Json n;
    n.kind = Json::Number;
    n.text = s_.substr(start, i_ - start);
    return n;
  }
  unsigned hex4() {
    if (i_ + 4 > s_.size()) err("short \\u escape");
    unsigned v = 0;
    for (int k = 0; k < 4; ++k) {
      char h = s_[i_++];
      v <<= 4;
      if (h >= '0' && h <= '9') v |= h - '0';
      else if (h >= 'a' && h <= 'f') v |= h - 'a' + 10;
      else if (h >= 'A' && h <= 'F') v |= h - 'A' + 10;
      else err("bad \\u escape");
    }
    return v;
  }
  static void utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) out += char(cp);
    else if (cp < 0x800) { out += char(0xC0 | (cp >> 6)); out += char(0x80 | (cp & 0x3F)); }
    else if (cp < 0x10000) {
      out += char(0xE0 | (cp >> 12)); out += char(0x80 | ((cp >> 6) & 0x3F)); out += char(0x80 | (cp & 0x3F));
    } else {
      out += char(0xF0 | (cp >> 18)); out += char(0x80 | ((cp >> 12) & 0x3F));
      out += char(0x80 | ((cp >> 6) & 0x3F)); out += char(0x80 | (cp & 0x3F));
    }
  }
  std::string string() {
    ++i_;  // the opening quote
    std::string out;
    while (i_ < s_.size() && s_[i_] != '"') {
      char c = s_[i_++];
      if (c != '\\') { out += c; continue; }
      if (i_ >= s_.size()) err("unterminated string");
      char e = s_[i_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && s_.compare(i_, 2, "\\u") == 0) {
            i_ += 2;
            unsigned lo = hex4();
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          utf8(out, cp);
          break;
        }
        default: err("bad escape");
      }
    }
    if (i_ >= s_.size()) err("unterminated string");
    ++i_;
    return out;
  }
};

inline void json_string(std::string& out, const std::string& s) {
  out += '"';
  for (unsigned char c : s) {
    if (c == '"') out += "\\\"";
    else if (c == '\\') out += "\\\\";
    else if (c == '\n') out += "\\n";
    else if (c < 0x20) { char b[8]; std::snprintf(b, sizeof b, "\\u%04x", c); out += b; }
    else out += char(c);
  }
  out += '"';
}

// Compact JSON, or with ``indent`` spaces per level.
inline void dump(std::string& out, const Json& v, int indent = 0, int level = 0) {
  auto nl = [&](int l) { if (indent) { out += '\n'; out.append(size_t(indent * l), ' '); } };
  switch (v.kind) {
    case Json::Null: out += "null"; break;
    case Json::Bool: out += v.b ? "true" : "false"; break;
    case Json::Number: out += v.text; break;
    case Json::String: json_string(out, v.text); break;
    case Json::Array:
      out += '[';
      for (size_t k = 0; k < v.items.size(); ++k) {
        if (k) out += indent ? "," : ",";
        nl(level + 1);
        dump(out, v.items[k], indent, level + 1);
      }
      if (!v.items.empty()) nl(level);
      out += ']';
      break;
    case Json::Object:
      out += '{';
      for (size_t k = 0; k < v.fields.size(); ++k) {
        if (k) out += ",";
        nl(level + 1);
        json_string(out, v.fields[k].first);
        out += indent ? ": " : ":";
        dump(out, v.fields[k].second, indent, level + 1);
      }
      if (!v.fields.empty()) nl(level);
      out += '}';
      break;
  }
}

inline std::string dumps(const Json& v, int indent = 0) { std::string s; dump(s, v, indent); return s; }

// Structural equality (numbers by value), for comparing configs written by different programs.
inline bool same(const Json& a, const Json& b) {
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Json::Null: return true;
    case Json::Bool: return a.b == b.b;
    case Json::Number: return a.number() == b.number();
    case Json::String: return a.text == b.text;
    case Json::Array:
      if (a.items.size() != b.items.size()) return false;
      for (size_t k = 0; k < a.items.size(); ++k) if (!same(a.items[k], b.items[k])) return false;
      return true;
    case Json::Object:
      if (a.fields.size() != b.fields.size()) return false;
      for (auto& f : a.fields) {
        const Json* o = b.find(f.first);
        if (!o || !same(f.second, *o)) return false;
      }
      return true;
  }
  return false;
}

// ---------------------------------------------------------------------------------------------
// SHA-256 (FIPS 180-4).
class Sha256 {
 public:
  Sha256() { reset(); }
  void update(const void* data, size_t n) {
    auto p = static_cast<const uint8_t*>(data);
    len_ += n;
    while (n) {
      size_t take = std::min(n, size_t(64) - fill_);
      std::memcpy(buf_ + fill_, p, take);
      fill_ += take; p += take; n -= take;
      if (fill_ == 64) { block(buf_); fill_ = 0; }
    }
  }
  void update(const std::string& s) { update(s.data(), s.size()); }
  std::string hex() {
    uint64_t bits = len_ * 8;
    uint8_t pad = 0x80;
    update(&pad, 1);
    uint8_t zero = 0;
    while (fill_ != 56) update(&zero, 1);
    uint8_t l[8];
    for (int k = 0; k < 8; ++k) l[k] = uint8_t(bits >> (56 - 8 * k));
    update(l, 8);
    char out[65];
    for (int k = 0; k < 8; ++k) std::snprintf(out + 8 * k, 9, "%08x", h_[k]);
    return std::string(out, 64);
  }

 private:
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t fill_ = 0;
  uint64_t len_ = 0;
  void reset() {
    static const uint32_t init[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                     0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    std::memcpy(h_, init, sizeof h_);
  }
  static uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }
  void block(const uint8_t* p) {
    static const uint32_t K[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
    uint32_t w[64];
    for (int t = 0; t < 16; ++t)
      w[t] = uint32_t(p[4 * t]) << 24 | uint32_t(p[4 * t + 1]) << 16 | uint32_t(p[4 * t + 2]) << 8 | p[4 * t + 3];
    for (int t = 16; t < 64; ++t) {
      uint32_t s0 = rotr(w[t - 15], 7) ^ rotr(w[t - 15], 18) ^ (w[t - 15] >> 3);
      uint32_t s1 = rotr(w[t - 2], 17) ^ rotr(w[t - 2], 19) ^ (w[t - 2] >> 10);
      w[t] = w[t - 16] + s0 + w[t - 7] + s1;
    }
    uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6], h = h_[7];
    for (int t = 0; t < 64; ++t) {
      uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + K[t] + w[t];
      uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h_[0] += a; h_[1] += b; h_[2] += c; h_[3] += d; h_[4] += e; h_[5] += f; h_[6] += g; h_[7] += h;
  }
};

// ---------------------------------------------------------------------------------------------
// Files.
inline std::string read_file(const fs::path& p, const std::string& what) {
  std::ifstream f(p, std::ios::binary);
  if (!f) throw Fail(p.string() + " is missing or unreadable (" + what + ")");
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

inline std::string sha256_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  if (!f) throw Fail(p.string() + " is missing or unreadable");
  Sha256 h;
  std::vector<char> buf(1 << 20);
  while (f) {
    f.read(buf.data(), std::streamsize(buf.size()));
    h.update(buf.data(), size_t(f.gcount()));
  }
  return h.hex();
}

inline void fsync_path(const fs::path& p, bool dir) {
  int fd = ::open(p.c_str(), dir ? O_RDONLY | O_DIRECTORY : O_RDONLY);
  if (fd >= 0) { ::fsync(fd); ::close(fd); }
}

// Write through a temp file beside ``p``, fsync, rename: a killed process leaves the old file.
inline void write_atomic(const fs::path& p, const std::string& data) {
  fs::create_directories(p.parent_path());
  fs::path tmp = p.parent_path() / ("." + p.filename().string() + "." + std::to_string(::getpid()) + ".tmp");
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) throw Fail("cannot write " + tmp.string());
    f.write(data.data(), std::streamsize(data.size()));
    f.flush();
    if (!f) { fs::remove(tmp); throw Fail("cannot write " + p.string() + " (disk full?)"); }
  }
  fsync_path(tmp, false);
  fs::rename(tmp, p);
  fsync_path(p.parent_path(), true);
}

// A folder filled by ``fill(tmp)`` that replaces ``dest`` only once complete.
template <class F>
void write_dir_atomic(const fs::path& dest, F fill) {
  fs::create_directories(dest.parent_path());
  fs::path tmp = dest.parent_path() / ("." + dest.filename().string() + "." + std::to_string(::getpid()) + ".tmp");
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  try {
    fill(tmp);
    for (auto& e : fs::directory_iterator(tmp)) fsync_path(e.path(), false);
    fs::path old;
    if (fs::exists(dest)) {
      old = dest.parent_path() / ("." + dest.filename().string() + ".old");
      fs::remove_all(old);
      fs::rename(dest, old);
    }
    fs::rename(tmp, dest);
    fsync_path(dest.parent_path(), true);
    if (!old.empty()) fs::remove_all(old);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
}

// ---------------------------------------------------------------------------------------------
// safetensors: an 8-byte little-endian header length, a JSON header, the tensor bytes.
struct TensorInfo {
  std::string dtype;
  std::vector<int64_t> shape;
  size_t begin = 0, end = 0;
  size_t count() const { size_t n = 1; for (auto d : shape) n *= size_t(d); return n; }
};

struct SafeTensors {
  std::string path;
  std::string bytes;  // the whole file
  size_t data_start = 0;
  std::map<std::string, TensorInfo> tensors;
  Json metadata;

  static size_t dtype_size(const std::string& d) {
    if (d == "F32" || d == "I32" || d == "U32") return 4;
    if (d == "I64" || d == "F64" || d == "U64") return 8;
    if (d == "F16" || d == "BF16" || d == "I16") return 2;
    if (d == "U8" || d == "I8" || d == "BOOL") return 1;
    return 0;
  }

  static SafeTensors load(const fs::path& p, const std::string& what) {
    SafeTensors st;
    st.path = p.string();
    st.bytes = read_file(p, what);
    const std::string bad = p.string() + " is not a readable safetensors file (";
    if (st.bytes.size() < 8) throw Fail(bad + "shorter than its header); " + what);
    uint64_t n = 0;
    for (int k = 7; k >= 0; --k) n = (n << 8) | uint8_t(st.bytes[size_t(k)]);
    if (n > st.bytes.size() - 8 || n > (100u << 20)) throw Fail(bad + "its header claims " + std::to_string(n) +
                                                                " bytes, the file has " +
                                                                std::to_string(st.bytes.size()) + "); " + what);
    st.data_start = 8 + size_t(n);
    Json h = JsonParser(st.bytes.substr(8, size_t(n)), p.string() + "'s header").parse();
    if (h.kind != Json::Object) throw Fail(bad + "the header is not an object); " + what);
    size_t avail = st.bytes.size() - st.data_start;
    for (auto& f : h.fields) {
      if (f.first == "__metadata__") { st.metadata = f.second; continue; }
      TensorInfo t;
      t.dtype = f.second.at("dtype", p.string()).text;
      for (auto& d : f.second.at("shape", p.string()).items) {
        if (d.integer() < 0 || d.integer() > (1ll << 40)) throw Fail(bad + "tensor " + f.first + " has a bad shape); " + what);
        t.shape.push_back(d.integer());
      }
      auto& off = f.second.at("data_offsets", p.string()).items;
      if (off.size() != 2) throw Fail(bad + "tensor " + f.first + " has bad offsets); " + what);
      t.begin = size_t(off[0].integer());
      t.end = size_t(off[1].integer());
      size_t es = dtype_size(t.dtype);
      if (!es || t.end < t.begin || t.end > avail || (t.end - t.begin) != t.count() * es)
        throw Fail(bad + "tensor " + f.first + " does not fit its offsets or the file); " + what);
      st.tensors[f.first] = t;
    }
    return st;
  }
  const TensorInfo& info(const std::string& name) const {
    auto it = tensors.find(name);
    if (it == tensors.end()) throw Fail(path + " has no tensor " + name);
    return it->second;
  }
  template <class T>
  const T* data(const std::string& name) const {
    return reinterpret_cast<const T*>(bytes.data() + data_start + info(name).begin);
  }
  std::string metadata_string(const std::string& key) const {
    const Json* v = metadata.find(key);
    return v ? v->text : std::string();
  }
};

struct FloatTensor {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

// A safetensors file of float32 tensors, names in sorted order.
inline std::string safetensors_bytes(const std::map<std::string, FloatTensor>& tensors, const Json& metadata) {
  Json h = Json::object();
  if (metadata.kind == Json::Object && !metadata.fields.empty()) h.set("__metadata__", metadata);
  size_t off = 0;
  for (auto& [name, t] : tensors) {
    Json e = Json::object();
    e.set("dtype", Json::str("F32"));
    Json shape = Json::array();
    for (auto d : t.shape) shape.items.push_back(Json::integer(d));
    e.set("shape", shape);
    Json offs = Json::array();
    offs.items.push_back(Json::integer((long long)off));
    off += t.data.size() * 4;
    offs.items.push_back(Json::integer((long long)off));
    e.set("data_offsets", offs);
    h.set(name, e);
  }
  std::string header = dumps(h);
  while ((header.size() + 8) % 8) header += ' ';
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int k = 0; k < 8; ++k) out[size_t(k)] = char((n >> (8 * k)) & 0xFF);
  out += header;
  for (auto& [name, t] : tensors) out.append(reinterpret_cast<const char*>(t.data.data()), t.data.size() * 4);
  return out;
}

inline std::map<std::string, FloatTensor> read_float_tensors(const fs::path& p, const std::string& what) {
  SafeTensors st = SafeTensors::load(p, what);
  std::map<std::string, FloatTensor> out;
  for (auto& [name, info] : st.tensors) {
    if (info.dtype != "F32") throw Fail(p.string() + ": tensor " + name + " is " + info.dtype + ", not F32; " + what);
    FloatTensor t;
    t.shape = info.shape;
    const float* d = st.data<float>(name);
    t.data.assign(d, d + info.count());
    out[name] = std::move(t);
  }
  return out;
}

}  // namespace et
