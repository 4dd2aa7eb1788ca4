// Thread pool of the CPU kernels (see pool.h for why it exists and what it guarantees).
//
// Protocol, all under mu_ except the unit counter and the lock-free read of active_:
//   caller: publish (fn, ctx, n), reset next_, open the job, bump gen_, wake the workers; claim units until none
//           is left; close the job; wait until active_ == 0 (a short spin, then the done_ condition variable).
//   worker: sleep until gen_ changes; if the job is still open and has room, join it (active_ += 1), claim units
//           until none is left, leave (active_ -= 1, wake the caller when it was the last).
// Joining and closing both happen under mu_, so a worker either joins before the close (and the caller waits for
// it) or sees the job closed (and never touches it): the caller's stack-held job state cannot be used after the
// caller returned. gen_ only changes while the caller holds busy_, and a new job starts only after the previous
// one has no active worker, so a worker can never take a unit index of one job and run it with another's fn.
#include "pool.h"

#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MEZO_PAUSE() _mm_pause()
#else
#define MEZO_PAUSE() std::this_thread::yield()
#endif

namespace mezo {
namespace cpu {
namespace {

constexpr int kDoneSpins = 500;  // ~10-40 us of pause before sleeping: a worker mid-unit usually ends by then
// After a job a worker watches for the next one this long before it sleeps: the passes of one step follow each
// other within microseconds, and a sleeping worker takes a futex wake-up (tens of us) to rejoin. Short enough
// that it never competes with other work for a scheduler slice.
constexpr auto kIdleSpin = std::chrono::microseconds(50);

class Pool {
 public:
  void run(int64_t n, int max_threads, UnitFn fn, void* ctx) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || max_threads <= 1 || n <= 1) {
      for (int64_t u = 0; u < n; ++u) fn(ctx, u);
      return;
    }
    const int helpers = static_cast<int>(std::min<int64_t>(max_threads - 1, n - 1));
    {
      std::lock_guard<std::mutex> lk(mu_);
      while (static_cast<int>(threads_.size()) < helpers) {
        // a new worker starts at the current generation, so it waits for the job published just below
        threads_.emplace_back([this, g = gen_.load(std::memory_order_relaxed)] { worker(g); });
        threads_.back().detach();
      }
      fn_ = fn;
      ctx_ = ctx;
      n_ = n;
      next_.store(0, std::memory_order_relaxed);
      open_ = true;
      room_ = helpers;
      gen_.store(gen_.load(std::memory_order_relaxed) + 1, std::memory_order_release);
    }
    wake_.notify_all();
    for (int64_t u; (u = next_.fetch_add(1, std::memory_order_relaxed)) < n;) fn(ctx, u);
    {
      std::lock_guard<std::mutex> lk(mu_);
      open_ = false;
    }
    for (int i = 0; i < kDoneSpins && active_.load(std::memory_order_acquire) > 0; ++i) MEZO_PAUSE();
    if (active_.load(std::memory_order_acquire) > 0) {
      std::unique_lock<std::mutex> lk(mu_);
      done_.wait(lk, [this] { return active_.load(std::memory_order_acquire) == 0; });
    }
  }

 private:
  void worker(uint64_t seen) {
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      if (gen_.load(std::memory_order_relaxed) == seen) {
        lk.unlock();
        const auto until = std::chrono::steady_clock::now() + kIdleSpin;
        while (gen_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < until) {
          for (int i = 0; i < 16; ++i) MEZO_PAUSE();
        }
        lk.lock();
        wake_.wait(lk, [&] { return gen_.load(std::memory_order_relaxed) != seen; });
      }
      seen = gen_.load(std::memory_order_relaxed);
      if (!open_ || room_ == 0) continue;
      --room_;
      active_.fetch_add(1, std::memory_order_relaxed);
      const UnitFn fn = fn_;
      void* const ctx = ctx_;
      const int64_t n = n_;
      lk.unlock();
      for (int64_t u; (u = next_.fetch_add(1, std::memory_order_relaxed)) < n;) fn(ctx, u);
      lk.lock();
      if (active_.fetch_sub(1, std::memory_order_release) == 1) done_.notify_one();
    }
  }

  std::mutex busy_;  // held by the one caller whose job the workers may join
  std::mutex mu_;
  std::condition_variable wake_, done_;
  std::atomic<uint64_t> gen_{0};  // changed under mu_ only; read without it by a worker's idle spin
  bool open_ = false;
  int room_ = 0;  // workers that may still join the open job
  UnitFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<int> active_{0};
  std::vector<std::thread> threads_;  // detached; kept only for the count
};

// Never destroyed: its workers sleep in wake_ until the process exits. After fork() the child has none of the
// parent's threads (and maybe a locked mutex), so it starts from a fresh pool.
std::atomic<Pool*> g_pool{nullptr};
std::once_flag g_atfork;

Pool& pool() {
  std::call_once(g_atfork, [] { pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr); }); });
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p == nullptr) {
    Pool* fresh = new Pool();
    if (g_pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) return *fresh;
    delete fresh;  // another thread installed one first; p now holds it
  }
  return *p;
}

}  // namespace

void parallel_units(int64_t n, int max_threads, UnitFn fn, void* ctx) {
  if (n <= 0) return;
  pool().run(n, max_threads, fn, ctx);
}

int default_threads() {
  if (const char* env = std::getenv("OMP_NUM_THREADS")) {
    const long v = std::strtol(env, nullptr, 10);  // "4" or the first entry of a list such as "4,2"
    if (v > 0 && v < 4096) return static_cast<int>(v);
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  const unsigned hc = std::thread::hardware_concurrency();
  return hc > 0 ? static_cast<int>(hc) : 1;
}

}  // namespace cpu
}  // namespace mezo
