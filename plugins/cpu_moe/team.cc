// r1c's CPU kernel library: `Team`, the thread team of the native decode step (decode_cpu.cc; declared in
// panels.h). Inside an ONNX Runtime node the kernels share ORT's intra-op threads; a decode step run outside ORT's
// executor has none, and after a step's weights have streamed through the caches a wake-up per parallel loop (a
// futex, ~5-50 us) would cost more than the loop's own fork and join. So the workers spin: each waits for the
// team's generation counter to move (a `pause` per probe) for up to kSpinUs after its last unit, then sleeps on
// a condition variable until the next loop. A loop's units are claimed one at a time from an atomic counter
// (balanced whatever each unit costs); the caller claims units too and returns when every worker is done.
#include "panels.h"

#include <pthread.h>

#include <chrono>

namespace r1c_cpu {
namespace {

// How long an idle worker spins before it sleeps: longer than the Python between two decode steps (~0.1-0.3 ms
// on this project's VM), so a token stream never sleeps between steps, and short enough that an idle engine
// gives its cores back within a few milliseconds.
constexpr int64_t kSpinUs = 3000;

inline void relax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

// Forks of this process so far, as seen by the child: a forked child has none of its parent's workers, so a team
// made before the fork runs its loops on the calling thread alone (a loop waiting for them would never end).
std::atomic<int> forks{0};

int fork_count() {
  static std::once_flag once;
  std::call_once(once, [] { pthread_atfork(nullptr, nullptr, [] { forks.fetch_add(1); }); });
  return forks.load(std::memory_order_relaxed);
}

}  // namespace

Team::Team(int threads) : forks_(fork_count()) {
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { work(); });
}

Team::~Team() {
  if (forks_ != fork_count()) {  // a forked child: the workers are not in this process
    for (std::thread& w : workers_) w.detach();
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_.store(true, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
  }
  wake_.notify_all();
  for (std::thread& w : workers_) w.join();
}

void Team::drain() {
  for (;;) {
    const size_t u = next_.fetch_add(1, std::memory_order_relaxed);
    if (u >= n_) return;
    fn_(data_, u);
  }
}

void Team::run(void (*fn)(void*, size_t), size_t n, void* data) {
  if (workers_.empty() || n <= 1 || forks_ != forks.load(std::memory_order_relaxed)) {
    for (size_t u = 0; u < n; ++u) fn(data, u);
    return;
  }
  fn_ = fn;
  data_ = data;
  n_ = n;
  next_.store(0, std::memory_order_relaxed);
  busy_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
  {
    // under the lock: a worker about to sleep either sees the new generation in its wait predicate or is woken
    std::lock_guard<std::mutex> lock(mutex_);
    generation_.fetch_add(1, std::memory_order_release);
    if (sleeping_ > 0) wake_.notify_all();
  }
  drain();
  while (busy_.load(std::memory_order_acquire) != 0) relax();
}

void Team::work() {
  uint64_t seen = 0;  // the generation before any loop (not a load: a loop may start before this thread does)
  for (;;) {
    auto start = std::chrono::steady_clock::now();
    for (int probe = 0; generation_.load(std::memory_order_acquire) == seen; ++probe) {
      relax();
      if ((probe & 255) == 255 &&
          std::chrono::steady_clock::now() - start > std::chrono::microseconds(kSpinUs)) {
        std::unique_lock<std::mutex> lock(mutex_);
        ++sleeping_;
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        --sleeping_;
        break;
      }
    }
    seen = generation_.load(std::memory_order_acquire);
    if (stop_.load(std::memory_order_relaxed)) return;
    drain();
    busy_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

}  // namespace r1c_cpu
