// One process-wide pool of worker threads for the merge kernels: starting threads for every
// matrix costs tens of microseconds, as much as merging a small matrix.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "common.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#define EDGETUNE_PID() static_cast<int64_t>(getpid())
#else
#define EDGETUNE_PID() int64_t{0}
#endif

namespace edgetune {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Spins until done() or `us` microseconds have passed; returns done(). A merge calls the pool
// once per matrix, back to back: waking a sleeping thread costs tens of microseconds on a
// virtual machine, as much as merging a small matrix, so workers and the caller spin a while
// before they block.
template <typename F>
bool spin_until(F&& done, int us) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(us);
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (done()) return true;
      cpu_relax();
    }
    if (std::chrono::steady_clock::now() >= until) return done();
  }
}

constexpr int SPIN_US = 200;

class Pool {
 public:
  explicit Pool(size_t workers) : owner_(EDGETUNE_PID()) {
    for (size_t i = 0; i < workers; ++i) threads_.emplace_back([this] { loop(); });
  }
  int64_t owner() const { return owner_; }
  size_t size() const { return threads_.size() + 1; }

  // Runs fn(0..n-1) on the workers and the calling thread; returns when all are done.
  void run(size_t n, const std::function<void(size_t)>& fn) {
    std::lock_guard<std::mutex> one_at_a_time(run_);
    std::unique_lock<std::mutex> l(m_);
    job_ = &fn;
    njobs_ = n;
    next_ = 0;
    remaining_.store(n);
    generation_.fetch_add(1);
    wake_.notify_all();
    work(l);
    l.unlock();
    spin_until([&] { return remaining_.load() == 0; }, SPIN_US);
    l.lock();
    done_.wait(l, [&] { return remaining_.load() == 0; });
    job_ = nullptr;
  }

 private:
  void work(std::unique_lock<std::mutex>& l) {
    while (next_ < njobs_) {
      const size_t t = next_++;
      const auto* fn = job_;
      l.unlock();
      (*fn)(t);
      l.lock();
      if (remaining_.fetch_sub(1) == 1) done_.notify_all();
    }
  }
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      spin_until([&] { return generation_.load() != seen; }, SPIN_US);
      std::unique_lock<std::mutex> l(m_);
      wake_.wait(l, [&] { return generation_.load() != seen; });
      seen = generation_.load();
      work(l);
    }
  }

  int64_t owner_;
  std::vector<std::thread> threads_;
  std::mutex run_, m_;
  std::condition_variable wake_, done_;
  const std::function<void(size_t)>* job_ = nullptr;
  size_t njobs_ = 0, next_ = 0;  // guarded by m_
  std::atomic<size_t> remaining_{0};  // changed under m_, read without it while spinning
  std::atomic<uint64_t> generation_{0};
};

std::mutex pool_mutex;
Pool* pool = nullptr;  // never destroyed: its threads live as long as the process

}  // namespace

void run_parallel(size_t n, const std::function<void(size_t)>& fn) {
  if (n <= 1) {
    if (n == 1) fn(0);
    return;
  }
  Pool* p;
  {
    std::lock_guard<std::mutex> l(pool_mutex);
    // A forked child has none of its parent's threads: it starts a pool of its own.
    if (!pool || pool->owner() != EDGETUNE_PID()) {
      const size_t hw = std::max(1u, std::thread::hardware_concurrency());
      pool = new Pool(hw > 1 ? hw - 1 : 1);
    }
    p = pool;
  }
  p->run(n, fn);
}

}  // namespace edgetune
