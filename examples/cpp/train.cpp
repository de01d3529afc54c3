// edgetune-train-cpp: trains a bundle's adapters with the ONNX Runtime C++ API alone, as an app
// without Python does. Every computation is one of the bundle's graphs:
//
//   dora_norms.onnx  (DoRA only)  adapter -> the training graph's dora_norm.* inputs
//   train.onnx                    batch + adapter -> loss + adapter gradients
//   optimizer.onnx                adapter, gradients, AdamW moments, step -> updated ones + lr
//
// The batches come from `edgetune tokenize` (safetensors, one group of chunks per optimizer step);
// checkpoints and the adapter are written in edgetune's formats, atomically, so that
// `edgetune train --resume`, `eval`, `merge` and `pack` take over from here.
//
//   edgetune-train-cpp BUNDLE BATCHES --out RUN --steps N [--resume] [--save-every K]
//                      [--threads T] [--kernels LIBRARY] [--keep-checkpoints K] [--quiet] [--json]

#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdlib>
#include <deque>
#include <iostream>
#include <set>

#include <sys/file.h>
#include <sys/stat.h>

#include "support.hpp"

using namespace et;

namespace {

const char* kUsage =
    "usage: edgetune-train-cpp BUNDLE BATCHES --out RUN --steps N [--resume] [--save-every K]\n"
    "                          [--threads T] [--kernels LIBRARY] [--keep-checkpoints K] [--quiet] [--json]\n"
    "\n"
    "Trains the adapters of an edgetune bundle on a batch file written by\n"
    "  edgetune tokenize DATA --bundle BUNDLE --out BATCHES\n"
    "with ONNX Runtime alone, into the run directory RUN (checkpoints/, adapter/, metrics.jsonl, run.json).\n"
    "  --steps N          train until optimizer step N (at most the batch file's steps)\n"
    "  --resume           continue RUN from its newest intact checkpoint (written by this program or edgetune)\n"
    "  --save-every K     write a checkpoint every K steps (and always at the end)\n"
    "  --keep-checkpoints K   checkpoints kept (default 2)\n"
    "  --threads T        ONNX Runtime intra-op threads (default: all cores)\n"
    "  --quiet            no progress lines (metrics still go to RUN/metrics.jsonl)\n"
    "  --json             print the run's summary as JSON on stdout at the end\n"
    "  --kernels LIBRARY  edgetune's fused-kernel library (libedgetune_ops.so): run the bundle's fused graphs\n"
    "\n"
    "Example:\n"
    "  edgetune tokenize examples/data/tickets --bundle bundle/ --out batches.safetensors --steps 20\n"
    "  edgetune-train-cpp bundle/ batches.safetensors --out run/ --steps 20 --save-every 5\n"
    "  edgetune-train-cpp bundle/ batches.safetensors --out run/ --steps 20 --resume   # after a crash\n";

const int kRunFormat = 1;
int64_t kScalar[1] = {0};  // the shape pointer of a scalar (rank 0)
const int kAppTrainingVersion = 1;
const int kBatchVersion = 1;

struct Args {
  fs::path bundle, batches, out;
  long long steps = 0;
  bool resume = false, quiet = false, json = false;
  long long save_every = 0, keep = 2;
  int threads = 0;
  std::string kernels;
};

Args parse_args(int argc, char** argv) {
  Args a;
  std::vector<std::string> pos;
  auto need = [&](int& i, const std::string& flag) -> std::string {
    if (i + 1 >= argc) throw Fail(flag + " needs a value\n" + kUsage);
    return argv[++i];
  };
  auto number = [&](const std::string& flag, const std::string& v, long long lo) {
    char* end = nullptr;
    long long n = std::strtoll(v.c_str(), &end, 10);
    if (v.empty() || *end || n < lo) throw Fail(flag + " must be an integer >= " + std::to_string(lo) + ", got " + v);
    return n;
  };
  for (int i = 1; i < argc; ++i) {
    std::string s = argv[i];
    if (s == "-h" || s == "--help") { std::cout << kUsage; std::exit(0); }
    else if (s == "--out") a.out = need(i, s);
    else if (s == "--steps") a.steps = number(s, need(i, s), 1);
    else if (s == "--resume") a.resume = true;
    else if (s == "--quiet") a.quiet = true;
    else if (s == "--json") a.json = true;
    else if (s == "--save-every") a.save_every = number(s, need(i, s), 0);
    else if (s == "--keep-checkpoints") a.keep = number(s, need(i, s), 1);
    else if (s == "--threads") a.threads = int(number(s, need(i, s), 0));
    else if (s == "--kernels") a.kernels = need(i, s);
    else if (!s.empty() && s[0] == '-') throw Fail("unknown option " + s + "\n" + kUsage);
    else pos.push_back(s);
  }
  if (pos.size() != 2 || a.out.empty() || !a.steps)
    throw Fail(std::string("BUNDLE, BATCHES, --out and --steps are required\n") + kUsage);
  a.bundle = pos[0];
  a.batches = pos[1];
  return a;
}

// Test hook, as edgetune's: EDGETUNE_FAULT=point[:n] ends the process at the n-th pass, like kill -9.
void fault(const std::string& point) {
  static std::map<std::string, int> hits;
  const char* want = std::getenv("EDGETUNE_FAULT");
  if (!want) return;
  std::string w = want, name = w.substr(0, w.find(':'));
  if (name != point) return;
  int nth = w.find(':') == std::string::npos ? 1 : std::atoi(w.c_str() + w.find(':') + 1);
  if (++hits[point] >= std::max(1, nth)) std::_Exit(137);
}

std::string step_name(long long step) {
  char b[32];
  std::snprintf(b, sizeof b, "step-%06lld", step);
  return b;
}

// ---------------------------------------------------------------------------------------------
struct Bundle {
  fs::path root;
  Json manifest, app;
  std::vector<std::string> trainable;
  std::map<std::string, std::vector<int64_t>> shapes;
  std::string base_id;
  long long vocab = 0, context = 0;

  fs::path file(const std::string& name) const { return root / name; }

  static Bundle load(const fs::path& root) {
    Bundle b;
    b.root = root;
    fs::path mpath = root / "edgetune.json";
    if (!fs::is_directory(root)) throw Fail("bundle not found: " + root.string() + " (export one with edgetune export)");
    b.manifest = JsonParser(read_file(mpath, "the bundle manifest"), mpath.string()).parse();
    const std::string again = "; export the bundle again with this edgetune";
    const Json* kind = b.manifest.find("kind");
    if (!kind || kind->text != "edgetune-bundle") throw Fail(mpath.string() + " is not an edgetune bundle manifest");
    const Json* format = b.manifest.find("format");
    if (!format || format->integer() != 2)
      throw Fail(mpath.string() + ": bundle format " + (format ? format->text : "(none)") +
                 " is not the one this trainer reads (2)" + again);
    const Json* app = b.manifest.find("app_training");
    if (!app || app->kind != Json::Object)
      throw Fail(mpath.string() + ": the bundle has no app_training entry (it was exported by an older edgetune)" + again);
    if (app->at("version", mpath.string()).integer() != kAppTrainingVersion)
      throw Fail(mpath.string() + ": app_training version " + app->at("version", mpath.string()).text +
                 " is not the one this trainer reads (" + std::to_string(kAppTrainingVersion) + ")" + again);
    b.app = *app;
    for (auto& t : b.manifest.at("trainable", mpath.string()).items) b.trainable.push_back(t.text);
    for (auto& f : b.manifest.at("trainable_shapes", mpath.string()).fields) {
      std::vector<int64_t> s;
      for (auto& d : f.second.items) s.push_back(d.integer());
      b.shapes[f.first] = s;
    }
    b.base_id = b.manifest.at("base_id", mpath.string()).text;
    const Json* mc = b.manifest.find("model_config");
    if (mc && mc->find("vocab_size")) b.vocab = mc->find("vocab_size")->integer();
    if (const Json* c = b.manifest.find("context")) b.context = c->integer();
    return b;
  }

  // The files this trainer opens must have the sizes the manifest lists: a cut copy is named here.
  void check_sizes(const std::vector<std::string>& names) const {
    const Json* sizes = manifest.find("sizes");
    if (!sizes) return;
    for (auto& n : names) {
      const Json* want = sizes->find(n);
      if (!want) continue;
      std::error_code ec;
      auto got = fs::file_size(file(n), ec);
      if (ec) throw Fail(file(n).string() + " is missing; copy the bundle again or export it again");
      if ((long long)got != want->integer())
        throw Fail(file(n).string() + " is damaged (" + std::to_string(got) + " bytes, the manifest says " + want->text +
                   "); copy the bundle again or export it again");
    }
  }
};

// ---------------------------------------------------------------------------------------------
struct Batches {
  SafeTensors st;
  Json meta;
  long long steps = 0;
  std::vector<long long> chunks;
  Json states, schedule;

  static Batches load(const fs::path& path, const Bundle& b) {
    Batches out;
    const std::string again = "; write it again with: edgetune tokenize DATA --bundle " + b.root.string() + " --out " +
                              path.string();
    if (!fs::is_regular_file(path)) throw Fail("batch file not found: " + path.string() + again);
    out.st = SafeTensors::load(path, "write it again with edgetune tokenize");
    std::string m = out.st.metadata_string("edgetune");
    if (m.empty()) throw Fail(path.string() + " is not an edgetune batch file (no edgetune metadata)" + again);
    out.meta = JsonParser(m, path.string() + "'s metadata").parse();
    const Json* kind = out.meta.find("kind");
    const Json* version = out.meta.find("version");
    if (!kind || kind->text != "edgetune-batches" || !version || version->integer() != kBatchVersion)
      throw Fail(path.string() + " is not an edgetune batch file of version " + std::to_string(kBatchVersion) + again);
    const std::string where = path.string();
    if (out.meta.at("bundle_id", where).text != b.base_id)
      throw Fail(path.string() + " was tokenized for another bundle (id " + out.meta.at("bundle_id", where).text.substr(0, 12) +
                 ", this bundle's is " + b.base_id.substr(0, 12) + ")" + again);
    const Json* vocab = out.meta.find("vocab_size");
    if (vocab && b.vocab && vocab->integer() != b.vocab)
      throw Fail(path.string() + " was tokenized with a vocabulary of " + vocab->text + " tokens, the bundle has " +
                 std::to_string(b.vocab) + again);
    const Json* packed = out.meta.find("packed");
    if (packed && packed->kind == Json::Bool && packed->b && !b.manifest.find("packing"))
      throw Fail(path.string() + " packs several records into each row, and bundle " + b.root.string() +
                 " was exported before sequence packing (its graphs would let the records see each other); "
                 "export the bundle again, or tokenize with --packing off");
    out.steps = out.meta.at("steps", where).integer();
    for (auto& c : out.meta.at("chunks", where).items) out.chunks.push_back(c.integer());
    out.states = out.meta.at("states", where);
    out.schedule = out.meta.at("schedule", where);
    if ((long long)out.chunks.size() != out.steps || (long long)out.states.items.size() != out.steps)
      throw Fail(path.string() + ": its metadata lists " + std::to_string(out.chunks.size()) + " steps of chunks for " +
                 std::to_string(out.steps) + " steps" + again);
    return out;
  }

  static std::string key(long long step, long long chunk, const char* what) {
    return "step" + std::to_string(step) + "/chunk" + std::to_string(chunk) + "/" + what;
  }

  // The tensors of every chunk of a step, checked against the bundle before they are fed.
  void check_step(long long step, const Bundle& b) const {
    for (long long j = 0; j < chunks[size_t(step - 1)]; ++j) {
      const TensorInfo& ids = st.info(key(step, j, "input_ids"));
      if (ids.dtype != "I64" || ids.shape.size() != 2)
        throw Fail(st.path + ": " + key(step, j, "input_ids") + " is not an int64 [rows, tokens] tensor");
      if (b.context && ids.shape[1] > b.context)
        throw Fail(st.path + ": step " + std::to_string(step) + " has sequences of " + std::to_string(ids.shape[1]) +
                   " tokens, longer than the bundle's context of " + std::to_string(b.context) +
                   "; tokenize again with a smaller --max-seq-len");
      for (const char* what : {"attention_mask", "labels"}) {
        const TensorInfo& t = st.info(key(step, j, what));
        if (t.dtype != "I64" || t.shape != ids.shape)
          throw Fail(st.path + ": " + key(step, j, what) + " does not match the shape of its input_ids");
      }
      const TensorInfo& norm = st.info(key(step, j, "label_norm"));
      if (norm.dtype != "F32" || norm.count() != 1) throw Fail(st.path + ": " + key(step, j, "label_norm") + " is not a float32 scalar");
      const int64_t* p = st.data<int64_t>(key(step, j, "input_ids"));
      for (size_t k = 0; k < ids.count(); ++k)
        if (p[k] < 0 || (b.vocab && p[k] >= b.vocab))
          throw Fail(st.path + ": " + key(step, j, "input_ids") + " holds token id " + std::to_string(p[k]) +
                     ", outside the bundle's vocabulary of " + std::to_string(b.vocab));
    }
  }
};

// ---------------------------------------------------------------------------------------------
struct State {  // edgetune's TrainerState: the same keys, no others (edgetune refuses unknown keys)
  long long step = 0, epoch = 0, batch_index = 0, tokens = 0, labelled = 0;
  double elapsed = 0;
  Json last_loss, last_valid_loss;

  Json to_json(const Bundle& b) const {
    Json j = Json::object();
    j.set("adapter", b.manifest.at("adapter", "manifest"));
    j.set("batch_index", Json::integer(batch_index));
    j.set("bundle_id", Json::str(b.base_id));
    j.set("elapsed", Json::num(elapsed));
    j.set("epoch", Json::integer(epoch));
    j.set("labelled", Json::integer(labelled));
    j.set("last_loss", last_loss);
    j.set("last_valid_loss", last_valid_loss);
    j.set("step", Json::integer(step));
    j.set("tokens", Json::integer(tokens));
    return j;
  }
};

// The newest intact checkpoint, as edgetune finds it: the `latest` pointer's, else the newest
// folder whose files are all there and match the checksums written with them.
std::string checkpoint_problem(const fs::path& d) {
  if (!fs::is_directory(d)) return "missing";
  for (const char* f : {"adapter.safetensors", "trainer_state.json"})
    if (!fs::is_regular_file(d / f)) return std::string(f) + " is missing";
  try {
    Json state = JsonParser(read_file(d / "trainer_state.json", "checkpoint state"), (d / "trainer_state.json").string()).parse();
    const Json* step = state.find("step");
    if (step && step->integer() > 0 && !fs::is_regular_file(d / "optimizer.safetensors"))
      return "optimizer.safetensors is missing (the optimizer's state after step " + step->text + ")";
    if (fs::is_regular_file(d / "checksums.json")) {
      Json sums = JsonParser(read_file(d / "checksums.json", "checksums"), (d / "checksums.json").string()).parse();
      for (auto& f : sums.fields) {
        if (f.first.empty() || f.first[0] == '.' || f.first.find('/') != std::string::npos ||
            f.first.find('\\') != std::string::npos)
          return "checksums.json names " + f.first + ", which is not a file of the checkpoint";
        if (!fs::is_regular_file(d / f.first)) return f.first + " is missing";
        if (sha256_file(d / f.first) != f.second.text) return f.first + " does not match its checksum (damaged)";
      }
    }
  } catch (const Fail& e) {
    return e.what();
  }
  return "";
}

fs::path latest_checkpoint(const fs::path& run, std::vector<std::string>* skipped) {
  fs::path ck = run / "checkpoints";
  std::vector<fs::path> cands;
  if (fs::is_regular_file(ck / "latest")) {
    std::string name = read_file(ck / "latest", "checkpoint pointer");
    while (!name.empty() && std::isspace((unsigned char)name.back())) name.pop_back();
    if (name.rfind("step-", 0) == 0 && name.find('/') == std::string::npos && name.find('\\') == std::string::npos)
      cands.push_back(ck / name);
  }
  std::vector<fs::path> dirs;
  if (fs::is_directory(ck))
    for (auto& e : fs::directory_iterator(ck))
      if (e.is_directory() && e.path().filename().string().rfind("step-", 0) == 0) dirs.push_back(e.path());
  std::sort(dirs.rbegin(), dirs.rend());
  for (auto& d : dirs) if (std::find(cands.begin(), cands.end(), d) == cands.end()) cands.push_back(d);
  for (auto& d : cands) {
    std::string p = checkpoint_problem(d);
    if (p.empty()) return d;
    if (skipped && fs::is_directory(d)) skipped->push_back(d.filename().string() + ": " + p);
  }
  return {};
}

// PEFT's file names for graph names (edgetune.formats.peft_io.to_peft_name).
std::string to_peft_name(const std::string& g) {
  const std::string mag = ".lora_magnitude_vector.default.weight";
  if (g.size() > mag.size() && g.compare(g.size() - mag.size(), mag.size(), mag) == 0)
    return g.substr(0, g.size() - mag.size()) + ".lora_magnitude_vector";
  std::string s = g;
  for (auto [from, to] : {std::pair<std::string, std::string>{".default.weight", ".weight"}, {".default", ""}}) {
    size_t at = 0;
    while ((at = s.find(from, at)) != std::string::npos) { s.replace(at, from.size(), to); at += to.size(); }
  }
  return s;
}

// edgetune.formats.peft_io.tensors_sha256: names, dtypes, shapes and bytes, in name order.
std::string tensors_sha256(const std::map<std::string, FloatTensor>& tensors) {
  Sha256 h;
  for (auto& [name, t] : tensors) {
    std::string head = name + "|<f4|[";
    for (size_t k = 0; k < t.shape.size(); ++k) head += (k ? ", " : "") + std::to_string(t.shape[k]);
    head += "]|";
    h.update(head);
    h.update(t.data.data(), t.data.size() * 4);
  }
  return h.hex();
}

std::string rel_path(const fs::path& p, const fs::path& base) {
  return fs::relative(fs::absolute(p), fs::absolute(base)).string();
}

// One writer per run folder: the lock edgetune's own trainer takes (`.RUN.lock` beside RUN, flock),
// which the kernel releases when a process ends, however it ends.
class FolderLock {
 public:
  explicit FolderLock(const fs::path& folder) {
    fs::path abs = fs::absolute(folder);
    if (abs.filename().empty()) abs = abs.parent_path();
    path_ = abs.parent_path() / ("." + abs.filename().string() + ".lock");
    fs::create_directories(path_.parent_path());
    for (;;) {
      fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT, 0644);
      if (fd_ < 0) throw Fail("cannot create the lock " + path_.string());
      if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
        char buf[32] = {0};
        ssize_t n = ::pread(fd_, buf, sizeof buf - 1, 0);
        ::close(fd_);
        fd_ = -1;
        throw Fail(folder.string() + " is being trained into by another process" +
                   (n > 0 ? " (pid " + std::string(buf, size_t(n)) + ")" : std::string()) +
                   "; wait for it to finish, or use another --out (the lock is " + path_.string() + ")");
      }
      struct stat a {}, b {};
      if (::fstat(fd_, &a) == 0 && ::stat(path_.c_str(), &b) == 0 && a.st_ino == b.st_ino && a.st_dev == b.st_dev) break;
      ::close(fd_);  // the previous holder removed the file after we opened it: lock the one that is there
    }
    std::string pid = std::to_string(::getpid());
    if (::ftruncate(fd_, 0) == 0 && ::pwrite(fd_, pid.data(), pid.size(), 0) < 0) {}
  }
  ~FolderLock() {
    if (fd_ >= 0) {
      ::unlink(path_.c_str());
      ::close(fd_);
    }
  }
  FolderLock(const FolderLock&) = delete;
  FolderLock& operator=(const FolderLock&) = delete;

 private:
  fs::path path_;
  int fd_ = -1;
};

// ---------------------------------------------------------------------------------------------
class Trainer {
 public:
  Trainer(const Args& a) : args_(a), bundle_(Bundle::load(a.bundle)), env_(ORT_LOGGING_LEVEL_ERROR, "edgetune") {
    batches_ = Batches::load(a.batches, bundle_);
    if (a.steps > batches_.steps)
      throw Fail("--steps " + std::to_string(a.steps) + " is more than the " + std::to_string(batches_.steps) +
                 " steps in " + a.batches.string() + "; tokenize with --steps " + std::to_string(a.steps));
    const Json& app = bundle_.app;
    train_graph_ = app.at("train", "app_training").text;
    optimizer_graph_ = app.at("optimizer", "app_training").text;
    if (!a.kernels.empty()) {
      const Json* fused = bundle_.manifest.find("fused");
      if (!fused || fused->kind != Json::Object)
        throw Fail(bundle_.file("edgetune.json").string() + ": the bundle has no fused graphs for --kernels; "
                   "export it where edgetune's kernel library builds, or leave --kernels out");
      train_graph_ = fused->at("train", "fused").text;
      // The optimizer step as one edgetune.AdamW call, where the bundle has it (the same bits).
      const Json* opt = fused->find("optimizer");
      if (opt && opt->kind == Json::String) optimizer_graph_ = opt->text;
    }
    std::vector<std::string> files = {train_graph_, "train.onnx.data", optimizer_graph_,
                                      "adapter_init.safetensors"};
    const Json& norms = app.at("dora_norms", "app_training");
    if (!norms.is_null()) files.push_back(norms.text);
    bundle_.check_sizes(files);
    for (auto& f : app.at("feeds", "app_training").fields) feeds_[f.first] = f.second;
  }

  int run() {
    FolderLock lock(args_.out);
    bool created = !fs::exists(args_.out) || fs::is_empty(args_.out);
    fs::path resume_from = check_out_dir();
    open_sessions();
    load_params(resume_from);
    if (state_.step >= args_.steps)
      throw Fail("the run " + args_.out.string() + " is already at step " + std::to_string(state_.step) +
                 "; raise --steps to train further");
    for (long long s = state_.step + 1; s <= args_.steps; ++s) batches_.check_step(s, bundle_);
    try {
      fs::create_directories(args_.out);
      write_run_json("running");
      train_loop();
    } catch (...) {
      // A run that stops before its first checkpoint has nothing to resume: leave nothing behind.
      if (created && latest_checkpoint(args_.out, nullptr).empty()) {
        std::error_code ec;
        fs::remove_all(args_.out, ec);
      }
      throw;
    }
    return 0;
  }

 private:
  Args args_;
  Bundle bundle_;
  Batches batches_;
  Ort::Env env_;
  Ort::MemoryInfo mem_ = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  std::unique_ptr<Ort::Session> train_, optimizer_, norms_;
  std::string train_graph_, optimizer_graph_;
  std::map<std::string, Json> feeds_;
  std::deque<uint8_t> u8_feeds_;  // deques: the tensors of one run point into them
  std::deque<int64_t> i64_feeds_;
  std::deque<float> f32_feeds_;
  std::map<std::string, FloatTensor> params_, exp_avg_, exp_avg_sq_, grads_, scratch_, dora_norms_;
  std::map<std::string, FloatTensor> next_params_, next_avg_, next_avg_sq_;  // the optimizer's outputs
  State state_;

  fs::path check_out_dir() {
    bool exists = fs::exists(args_.out) && !fs::is_empty(args_.out);
    if (!args_.resume) {
      if (exists) throw Fail(args_.out.string() + " already holds a run; pass --resume to continue it or choose another --out");
      return {};
    }
    if (!exists) throw Fail("--resume: " + args_.out.string() + " holds no run to resume");
    std::vector<std::string> skipped;
    fs::path ck = latest_checkpoint(args_.out, &skipped);
    if (!skipped.empty()) {
      std::string s;
      for (auto& k : skipped) s += (s.empty() ? "" : "; ") + k;
      std::cerr << "--resume: passed over damaged checkpoint(s): " << s
                << (ck.empty() ? "" : "; resuming from " + ck.filename().string()) << "\n";
    }
    if (ck.empty() && skipped.empty() && same_run_started()) {
      std::cerr << "--resume: " << args_.out.string() << " stopped before its first checkpoint; starting from step 0\n";
      trim_metrics(0);
      return {};
    }
    if (ck.empty())
      throw Fail("--resume: no intact checkpoint in " + (args_.out / "checkpoints").string() +
                 "; train again from the start into another --out");
    fs::path sp = ck / "trainer_state.json";
    Json saved = JsonParser(read_file(sp, "checkpoint state"), sp.string()).parse();
    if (saved.at("bundle_id", sp.string()).text != bundle_.base_id)
      throw Fail("--resume: bundle " + bundle_.root.string() + " does not match the checkpoint " + ck.string() +
                 " (bundle id " + bundle_.base_id.substr(0, 12) + " differs from the run's " +
                 saved.at("bundle_id", sp.string()).text.substr(0, 12) + ")");
    if (!same(saved.at("adapter", sp.string()), bundle_.manifest.at("adapter", "manifest")))
      throw Fail("--resume: bundle " + bundle_.root.string() + " does not match the checkpoint " + ck.string() +
                 " (its adapter config differs)");
    state_.step = saved.at("step", sp.string()).integer();
    state_.epoch = saved.at("epoch", sp.string()).integer();
    state_.batch_index = saved.at("batch_index", sp.string()).integer();
    state_.tokens = saved.at("tokens", sp.string()).integer();
    state_.labelled = saved.at("labelled", sp.string()).integer();
    state_.elapsed = saved.at("elapsed", sp.string()).number();
    state_.last_loss = saved.at("last_loss", sp.string());
    state_.last_valid_loss = saved.at("last_valid_loss", sp.string());
    trim_metrics(state_.step);
    if (state_.step > batches_.steps)
      throw Fail("--resume: the run is at step " + std::to_string(state_.step) + ", past the " +
                 std::to_string(batches_.steps) + " steps of " + args_.batches.string());
    return ck;
  }

  bool same_run_started() {
    try {
      fs::path p = args_.out / "run.json";
      Json run = JsonParser(read_file(p, "the run manifest"), p.string()).parse();
      const Json* kind = run.find("kind");
      const Json* id = run.find("bundle_id");
      return kind && kind->text == "edgetune-run" && id && id->text == bundle_.base_id;
    } catch (const Fail&) {
      return false;
    }
  }

  // The metrics of steps after the checkpoint a resume starts from are of work that is redone.
  void trim_metrics(long long step) {
    fs::path p = args_.out / "metrics.jsonl";
    if (!fs::is_regular_file(p)) return;
    std::istringstream in(read_file(p, "metrics"));
    std::string line, kept;
    bool dropped = false;
    while (std::getline(in, line)) {
      if (line.empty()) continue;
      try {
        Json rec = JsonParser(line, p.string()).parse();
        const Json* s = rec.find("step");
        if (s && s->integer() > step) { dropped = true; continue; }
      } catch (const Fail&) {
        dropped = true;  // a line cut by the kill
        continue;
      }
      kept += line + "\n";
    }
    if (dropped) write_atomic(p, kept);
  }

  Ort::SessionOptions options(bool training, bool fused) {
    Ort::SessionOptions so;
    if (args_.threads) so.SetIntraOpNumThreads(args_.threads);
    so.SetLogSeverityLevel(3);
    so.AddConfigEntry("session.set_denormal_as_zero", "1");  // as edgetune's sessions
    so.AddConfigEntry("session.disable_prepacking", "1");
    so.DisableMemPattern();
    // ONNX Runtime's inference sessions would otherwise remove the training graph's Dropout nodes.
    if (training) so.AddConfigEntry("optimization.disable_specified_optimizers", "EliminateDropout");
    if (fused) so.RegisterCustomOpsLibrary(args_.kernels.c_str());
    return so;
  }

  std::unique_ptr<Ort::Session> open(const std::string& name, bool training, bool fused = false) {
    fs::path p = bundle_.file(name);
    if (!fs::is_regular_file(p)) throw Fail(p.string() + " is missing; copy the bundle again or export it again");
    try {
      return std::make_unique<Ort::Session>(env_, p.c_str(), options(training, fused));
    } catch (const Ort::Exception& e) {
      std::string m = e.what();
      throw Fail(p.string() + " cannot be loaded by this ONNX Runtime (" + m.substr(0, std::min<size_t>(m.size(), 200)) +
                 "); copy the bundle again, or export it again with the edgetune that matches this runtime");
    }
  }

  void open_sessions() {
    train_ = open(train_graph_, true, !args_.kernels.empty());
    optimizer_ = open(optimizer_graph_, false, optimizer_graph_ != bundle_.app.at("optimizer", "app_training").text);
    const Json& norms = bundle_.app.at("dora_norms", "app_training");
    if (!norms.is_null()) norms_ = open(norms.text, false);
  }

  void check_params(const std::map<std::string, FloatTensor>& t, const fs::path& where) {
    for (auto& n : bundle_.trainable) {
      auto it = t.find(n);
      if (it == t.end()) throw Fail(where.string() + " does not fit bundle " + bundle_.root.string() + ": " + n + " is missing");
      if (it->second.shape != bundle_.shapes[n])
        throw Fail(where.string() + " does not fit bundle " + bundle_.root.string() + ": " + n + " has another shape");
    }
    for (auto& [n, v] : t)
      if (!bundle_.shapes.count(n)) throw Fail(where.string() + ": " + n + " is not a tensor of bundle " + bundle_.root.string());
  }

  void load_params(const fs::path& ck) {
    fs::path src = ck.empty() ? bundle_.file("adapter_init.safetensors") : ck / "adapter.safetensors";
    params_ = read_float_tensors(src, ck.empty() ? "export the bundle again" : "resume from an earlier checkpoint");
    check_params(params_, src);
    for (auto& n : bundle_.trainable) {
      exp_avg_[n] = {params_[n].shape, std::vector<float>(params_[n].data.size(), 0.f)};
      exp_avg_sq_[n] = exp_avg_[n];
    }
    if (!ck.empty() && state_.step > 0) {
      fs::path op = ck / "optimizer.safetensors";
      auto moments = read_float_tensors(op, "resume from an earlier checkpoint");
      for (auto& n : bundle_.trainable) {
        auto m = moments.find("exp_avg/" + n), v = moments.find("exp_avg_sq/" + n);
        if (m == moments.end() || v == moments.end() || m->second.data.size() != params_[n].data.size() ||
            v->second.data.size() != params_[n].data.size())
          throw Fail(op.string() + " lacks the AdamW moments of " + n + "; resume from an earlier checkpoint");
        exp_avg_[n] = m->second;
        exp_avg_sq_[n] = v->second;
      }
    }
  }

  Ort::Value feed_value(const std::string& name) {
    auto it = feeds_.find(name);
    if (it == feeds_.end())
      throw Fail(bundle_.root.string() + ": a graph wants the input " + name + ", which this trainer does not know; "
                 "build this program from the edgetune that exported the bundle");
    const std::string dtype = it->second.at("dtype", "feed").text;
    double v = it->second.at("value", "feed").number();
    if (dtype == "uint8") {
      u8_feeds_.push_back(uint8_t(v));
      return Ort::Value::CreateTensor<uint8_t>(mem_, &u8_feeds_.back(), 1, kScalar, 0);
    }
    if (dtype == "int64") {
      i64_feeds_.push_back(int64_t(v));
      return Ort::Value::CreateTensor<int64_t>(mem_, &i64_feeds_.back(), 1, kScalar, 0);
    }
    f32_feeds_.push_back(float(v));
    return Ort::Value::CreateTensor<float>(mem_, &f32_feeds_.back(), 1, kScalar, 0);
  }

  static Ort::Value tensor(const Ort::MemoryInfo& mem, FloatTensor& t) {
    return Ort::Value::CreateTensor<float>(mem, t.data.data(), t.data.size(), t.shape.data(), t.shape.size());
  }

  static std::vector<std::string> names(Ort::Session& s, bool inputs) {
    Ort::AllocatorWithDefaultOptions alloc;
    std::vector<std::string> out;
    size_t n = inputs ? s.GetInputCount() : s.GetOutputCount();
    for (size_t k = 0; k < n; ++k)
      out.push_back((inputs ? s.GetInputNameAllocated(k, alloc) : s.GetOutputNameAllocated(k, alloc)).get());
    return out;
  }

  // Every run binds its inputs and outputs to the trainer's own buffers (I/O binding): the graphs
  // read the adapter, moments, gradients and batch in place and write their outputs in place; the
  // optimizer writes into a second set of buffers that then changes places with the first.
  void run_bound(Ort::Session& s, Ort::IoBinding& b) {
    Ort::RunOptions ro;
    ro.AddConfigEntry("memory.enable_memory_arena_shrinkage", "cpu:0");
    s.Run(ro, b);
  }

  static FloatTensor zeros_like(const FloatTensor& t) { return {t.shape, std::vector<float>(t.data.size(), 0.f)}; }

  // DoRA: the norms of the adapter as it is before this step.
  void compute_norms() {
    if (!norms_) return;
    auto in = names(*norms_, true), out = names(*norms_, false);
    Ort::IoBinding b(*norms_);
    for (auto& n : in) b.BindInput(n.c_str(), params_.count(n) ? tensor(mem_, params_[n]) : feed_value(n));
    for (size_t k = 0; k < out.size(); ++k) {
      if (!dora_norms_.count(out[k])) {
        auto shape = norms_->GetOutputTypeInfo(k).GetTensorTypeAndShapeInfo().GetShape();
        size_t count = 1;
        for (auto d : shape) count *= size_t(std::max<int64_t>(d, 1));
        dora_norms_[out[k]] = {shape, std::vector<float>(count, 0.f)};
      }
      b.BindOutput(out[k].c_str(), tensor(mem_, dora_norms_[out[k]]));
    }
    run_bound(*norms_, b);
  }

  double train_step(long long step) {
    u8_feeds_.clear();
    i64_feeds_.clear();
    f32_feeds_.clear();
    compute_norms();
    auto in = names(*train_, true);
    double loss = 0;
    const SafeTensors& st = batches_.st;
    for (auto& p : bundle_.trainable)
      if (!grads_.count(p)) { grads_[p] = zeros_like(params_[p]); scratch_[p] = zeros_like(params_[p]); }
    for (long long j = 0; j < batches_.chunks[size_t(step - 1)]; ++j) {
      Ort::IoBinding b(*train_);
      for (auto& n : in) {
        if (n == "input_ids" || n == "attention_mask" || n == "labels") {
          const TensorInfo& t = st.info(Batches::key(step, j, n.c_str()));
          auto* p = const_cast<int64_t*>(st.data<int64_t>(Batches::key(step, j, n.c_str())));
          b.BindInput(n.c_str(), Ort::Value::CreateTensor<int64_t>(mem_, p, t.count(), t.shape.data(), t.shape.size()));
        } else if (n == "label_norm") {
          auto* p = const_cast<float*>(st.data<float>(Batches::key(step, j, "label_norm")));
          b.BindInput(n.c_str(), Ort::Value::CreateTensor<float>(mem_, p, 1, kScalar, 0));
        } else if (params_.count(n)) {
          b.BindInput(n.c_str(), tensor(mem_, params_[n]));
        } else if (dora_norms_.count(n)) {
          b.BindInput(n.c_str(), tensor(mem_, dora_norms_[n]));
        } else {
          b.BindInput(n.c_str(), feed_value(n));
        }
      }
      float chunk_loss = 0;
      b.BindOutput("loss", Ort::Value::CreateTensor<float>(mem_, &chunk_loss, 1, kScalar, 0));
      // The first chunk's gradients go straight into the step's sums; later ones into a scratch set.
      auto& target = j == 0 ? grads_ : scratch_;
      for (auto& p : bundle_.trainable) b.BindOutput((p + "_grad").c_str(), tensor(mem_, target[p]));
      run_bound(*train_, b);
      loss += double(chunk_loss);
      if (j > 0)
        for (auto& p : bundle_.trainable) {
          float* acc = grads_[p].data.data();
          const float* g = scratch_[p].data.data();
          for (size_t e = 0; e < grads_[p].data.size(); ++e) acc[e] += g[e];
        }
    }
    return loss;
  }

  bool grads_finite() const {
    for (auto& [n, g] : grads_)
      for (float v : g.data) if (!std::isfinite(v)) return false;
    return true;
  }

  // One AdamW step and the learning rate, all in optimizer.onnx.
  double optimizer_step(long long step) {
    auto in = names(*optimizer_, true);
    const Json& s = batches_.schedule;
    std::map<std::string, float> scalars = {
        {"step", float(step)},
        {"base_lr", float(s.at("base_lr", "schedule").number())},
        {"warmup_steps", float(s.at("warmup_steps", "schedule").number())},
        {"total_steps", float(s.at("total_steps", "schedule").number())},
        {"weight_decay", float(s.at("weight_decay", "schedule").number())}};
    int64_t schedule = s.at("schedule", "schedule").integer();
    Ort::IoBinding b(*optimizer_);
    for (auto& n : in) {
      if (scalars.count(n)) b.BindInput(n.c_str(), Ort::Value::CreateTensor<float>(mem_, &scalars[n], 1, kScalar, 0));
      else if (n == "schedule") b.BindInput(n.c_str(), Ort::Value::CreateTensor<int64_t>(mem_, &schedule, 1, kScalar, 0));
      else if (params_.count(n)) b.BindInput(n.c_str(), tensor(mem_, params_[n]));
      else if (n.size() > 5 && n.compare(n.size() - 5, 5, "_grad") == 0 && grads_.count(n.substr(0, n.size() - 5)))
        b.BindInput(n.c_str(), tensor(mem_, grads_[n.substr(0, n.size() - 5)]));
      else if (n.rfind("exp_avg_sq/", 0) == 0 && exp_avg_sq_.count(n.substr(11))) b.BindInput(n.c_str(), tensor(mem_, exp_avg_sq_[n.substr(11)]));
      else if (n.rfind("exp_avg/", 0) == 0 && exp_avg_.count(n.substr(8))) b.BindInput(n.c_str(), tensor(mem_, exp_avg_[n.substr(8)]));
      else throw Fail(bundle_.file(optimizer_graph_).string() + " wants the input " + n + ", which this trainer does not know");
    }
    float lr = 0;
    b.BindOutput("lr", Ort::Value::CreateTensor<float>(mem_, &lr, 1, kScalar, 0));
    for (auto& p : bundle_.trainable) {
      if (!next_params_.count(p)) {
        next_params_[p] = zeros_like(params_[p]);
        next_avg_[p] = zeros_like(params_[p]);
        next_avg_sq_[p] = zeros_like(params_[p]);
      }
      b.BindOutput((p + "/updated").c_str(), tensor(mem_, next_params_[p]));
      b.BindOutput(("exp_avg/" + p + "/updated").c_str(), tensor(mem_, next_avg_[p]));
      b.BindOutput(("exp_avg_sq/" + p + "/updated").c_str(), tensor(mem_, next_avg_sq_[p]));
    }
    run_bound(*optimizer_, b);
    for (auto& p : bundle_.trainable) {  // the updated buffers become the current ones (no copy)
      params_[p].data.swap(next_params_[p].data);
      exp_avg_[p].data.swap(next_avg_[p].data);
      exp_avg_sq_[p].data.swap(next_avg_sq_[p].data);
    }
    return lr;
  }

  void train_loop() {
    using clock = std::chrono::steady_clock;
    const long long total = args_.steps;
    if (!args_.quiet)
      std::cerr << "training " << bundle_.trainable.size() << " adapter tensors of " << bundle_.root.string()
                << " with " << train_graph_ << "; steps " << state_.step << "->" << total << "\n";
    auto window = clock::now();
    long long window_tokens = 0;
    const long long first = state_.step + 1;
    while (state_.step < total) {
      long long step = state_.step + 1;
      auto t0 = clock::now();
      double loss = train_step(step);
      if (!std::isfinite(loss) || !grads_finite()) {
        fs::path prev = latest_checkpoint(args_.out, nullptr);
        throw Fail(std::string(std::isfinite(loss) ? "a gradient is not finite" : "the loss is not finite") +
                   " at step " + std::to_string(step) + "; training stopped before the update, " +
                   (prev.empty() ? "no checkpoint was written yet" : "the last good checkpoint is " + prev.string()) +
                   ". Lower the learning rate, add warmup, or check the data; resume with --resume");
      }
      double lr = optimizer_step(step);
      const Json& st = batches_.states.items[size_t(step - 1)];
      long long before = state_.tokens;
      state_.step = step;
      state_.epoch = st.at("epoch", "states").integer();
      state_.batch_index = st.at("batch_index", "states").integer();
      state_.tokens = st.at("tokens", "states").integer();
      state_.labelled = st.at("labelled", "states").integer();
      state_.last_loss = Json::num(loss);
      state_.elapsed += std::chrono::duration<double>(clock::now() - t0).count();
      window_tokens += state_.tokens - before;
      double tps = window_tokens / std::max(1e-9, std::chrono::duration<double>(clock::now() - window).count());
      Json rec = Json::object();
      rec.set("elapsed", Json::num(state_.elapsed));
      rec.set("loss", Json::num(loss));
      rec.set("lr", Json::num(lr));
      rec.set("step", Json::integer(step));
      rec.set("tokens", Json::integer(state_.tokens));
      rec.set("tokens_per_s", Json::num(std::round(tps * 10) / 10));
      append_metric(rec);
      if (!args_.quiet) {
        double per_step = std::chrono::duration<double>(clock::now() - window).count() / double(step - first + 1);
        double eta = per_step * double(total - step);
        char line[200];
        std::snprintf(line, sizeof line, "step %lld/%lld  loss %.6f  lr %.3g  %.0f tokens/s  ETA %lldm%02llds\n", step,
                      total, loss, lr, tps, (long long)eta / 60, (long long)eta % 60);
        std::cerr << line;
      }
      if (args_.save_every && step % args_.save_every == 0 && step < total) save_checkpoint();
      fault("step");
    }
    save_checkpoint();
    save_adapter();
    Json run = write_run_json("complete");
    if (args_.json) std::cout << dumps(run.at("summary", "run"), 2) << "\n";
    if (!args_.quiet) std::cerr << "adapter: " << (args_.out / "adapter").string() << "   (PEFT format)\n";
  }

  void append_metric(const Json& rec) {
    std::ofstream f(args_.out / "metrics.jsonl", std::ios::app);
    f << dumps(rec) << "\n";
  }

  void save_checkpoint() {
    fs::path root = args_.out / "checkpoints";
    std::string name = step_name(state_.step);
    try {
      write_dir_atomic(root / name, [&](const fs::path& tmp) {
        write_atomic(tmp / "adapter.safetensors", safetensors_bytes(params_, Json()));
        std::map<std::string, FloatTensor> moments;
        for (auto& n : bundle_.trainable) {
          moments["exp_avg/" + n] = exp_avg_[n];
          moments["exp_avg_sq/" + n] = exp_avg_sq_[n];
        }
        if (state_.step) write_atomic(tmp / "optimizer.safetensors", safetensors_bytes(moments, Json()));
        fault("checkpoint-write");
        write_atomic(tmp / "trainer_state.json", dumps(state_.to_json(bundle_), 2) + "\n");
        Json sums = Json::object();
        std::vector<std::string> files;
        for (auto& e : fs::directory_iterator(tmp)) files.push_back(e.path().filename().string());
        std::sort(files.begin(), files.end());
        for (auto& f : files) sums.set(f, Json::str(sha256_file(tmp / f)));
        write_atomic(tmp / "checksums.json", dumps(sums, 2) + "\n");
      });
      write_atomic(root / "latest", name + "\n");
    } catch (const fs::filesystem_error& e) {
      fs::path prev = latest_checkpoint(args_.out, nullptr);
      throw Fail("could not write checkpoint " + name + " (" + e.code().message() + "); the previous checkpoint " +
                 (prev.empty() ? "(none)" : prev.filename().string()) + " is intact; free some disk space and run again with --resume");
    }
    std::vector<fs::path> all;
    for (auto& e : fs::directory_iterator(root))
      if (e.is_directory() && e.path().filename().string().rfind("step-", 0) == 0) all.push_back(e.path());
    std::sort(all.begin(), all.end());
    for (size_t k = 0; k + size_t(args_.keep) < all.size(); ++k) fs::remove_all(all[k]);
  }

  // The adapter in PEFT's format, with the checksums edgetune checks when it reads it back.
  void save_adapter() {
    std::map<std::string, FloatTensor> named;
    for (auto& [n, t] : params_) named[to_peft_name(n)] = t;
    Json meta = Json::object();
    meta.set("format", Json::str("pt"));
    meta.set("edgetune_base_id", Json::str(bundle_.base_id));
    meta.set("step", Json::str(std::to_string(state_.step)));
    meta.set("trained_by", Json::str("edgetune-train-cpp"));
    meta.set("edgetune_tensors_sha256", Json::str(tensors_sha256(named)));
    meta.set("edgetune_config_sha256", bundle_.app.at("peft_config_sha256", "app_training"));
    const Json& config = bundle_.app.at("peft_config", "app_training");
    write_dir_atomic(args_.out / "adapter", [&](const fs::path& tmp) {
      write_atomic(tmp / "adapter_model.safetensors", safetensors_bytes(named, meta));
      write_atomic(tmp / "adapter_config.json", dumps(config, 2) + "\n");
    });
  }

  Json write_run_json(const std::string& status) {
    Json run = Json::object();
    run.set("adapter", bundle_.manifest.at("adapter", "manifest"));
    run.set("bundle", Json::str(rel_path(bundle_.root, args_.out)));
    run.set("bundle_id", Json::str(bundle_.base_id));
    Json data = Json::object();
    data.set("batches", Json::str(rel_path(args_.batches, args_.out)));
    data.set("steps", Json::integer(batches_.steps));
    run.set("data", data);
    run.set("format", Json::integer(kRunFormat));
    run.set("graphs", [&] { Json g = Json::object(); g.set("train", Json::str(train_graph_));
      g.set("optimizer", Json::str(optimizer_graph_)); return g; }());
    run.set("kernels", Json::str(args_.kernels.empty() ? "plain" : "fused"));
    run.set("kind", Json::str("edgetune-run"));
    run.set("status", Json::str(status));
    run.set("trainer", Json::str("edgetune-train-cpp"));
    if (status == "complete") {
      Json s = Json::object();
      s.set("steps", Json::integer(state_.step));
      s.set("final_loss", state_.last_loss);
      s.set("tokens", Json::integer(state_.tokens));
      s.set("labelled_tokens", Json::integer(state_.labelled));
      s.set("elapsed_s", Json::num(state_.elapsed));
      s.set("tokens_per_s", Json::num(state_.tokens / std::max(1e-9, state_.elapsed)));
      s.set("adapter", Json::str("adapter"));
      run.set("summary", s);
    }
    write_atomic(args_.out / "run.json", dumps(run, 2) + "\n");
    return run;
  }
};

}  // namespace

int main(int argc, char** argv) {
  try {
    Args a = parse_args(argc, argv);
    Trainer t(a);
    return t.run();
  } catch (const Fail& e) {
    std::cerr << "Error: " << e.what() << "\n";
  } catch (const Ort::Exception& e) {
    std::cerr << "Error: ONNX Runtime: " << e.what() << "\n";
  } catch (const fs::filesystem_error& e) {
    std::cerr << "Error: " << e.what() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "Error: " << e.what() << "\n";
  }
  return 1;
}
