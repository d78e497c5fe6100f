// r1c's CPU kernel library: `Team`, the thread team of the native decode step (decode_cpu.cc; declared in
// panels.h). Inside an ONNX Runtime node the kernels share ORT's intra-op threads; a decode step run outside ORT's
// executor has none, and after a step's weights have streamed through the caches a wake-up per parallel loop (a
// futex, ~5-50 us) would cost more than the loop's own fork and join. So the workers spin: each waits for the
// team's generation counter to move (a `pause` per probe) for up to kSpinUs after its last unit, then sleeps on
// a condition variable until the next loop. A loop's n units are dealt as contiguous ranges, thread t's
// [t n / T, (t + 1) n / T), so that each thread streams one run of consecutive weight panels (dealt one at a time
// from a shared counter, the two threads' panels interleave: a decode step of the issue-11 benchmark model, batch
// 1, 2 threads, was 1.035x slower that way, interleaved blocks against this); a thread whose range is done takes
// the others' remaining units from their ends (one compare-and-swap per unit on the range's word, owner and thief
// alike), so an uneven loop still balances. The caller takes part and returns when every unit has run: a worker
// the OS has not scheduled simply takes none (its range is drained by the others).
#include "panels.h"

#include <pthread.h>

#include <chrono>

namespace r1c_cpu {
namespace {

// How long an idle worker spins before it sleeps: longer than the Python between two decode steps (~0.1-0.3 ms
// on this project's VM), so a token stream never sleeps between steps, and short enough that an idle engine
// gives its cores back within a few milliseconds.
constexpr int64_t kSpinUs = 3000;

// Waits probe with `pause` for the first kPauseProbes (~50 us), then yield the core on each probe: when the machine
// has fewer free cores than the team has threads (another process busy on one), the thread waited for may be
// descheduled, and a waiter that only paused would hold its core for its whole time slice (measured: a tiny
// generate call stalling up to 2.85 s with a CPU-bound process beside it).
constexpr int kPauseProbes = 1024;

inline void relax(int probe) {
  if (probe < kPauseProbes) {
#if defined(__x86_64__)
    _mm_pause();
#endif
  } else {
    std::this_thread::yield();
  }
}

// Forks of this process so far, as seen by the child: a forked child has none of its parent's workers, so a team
// made before the fork runs its loops on the calling thread alone (a loop waiting for them would never end).
std::atomic<int> forks{0};

int fork_count() {
  static std::once_flag once;
  std::call_once(once, [] { pthread_atfork(nullptr, nullptr, [] { forks.fetch_add(1); }); });
  return forks.load(std::memory_order_relaxed);
}

// A range word: the loop's tag (its generation, 20 bits), then begin and end (22 bits each). A thread takes a
// unit only from a word of the loop it is in, so a worker that wakes late, after its loop has ended and the next
// has begun, takes nothing with the old loop's function.
constexpr int kUnitBits = 22;
constexpr uint64_t kUnitMask = (uint64_t{1} << kUnitBits) - 1, kTagMask = (uint64_t{1} << 20) - 1;

uint64_t pack(uint64_t tag, uint64_t begin, uint64_t end) {
  return (tag & kTagMask) << (2 * kUnitBits) | end << kUnitBits | begin;
}

// the next unit of `r` in loop `tag` from its front (its owner) or its back (a thief); false when it has none
bool take(std::atomic<uint64_t>& r, uint64_t tag, bool front, size_t& unit) {
  uint64_t cur = r.load(std::memory_order_acquire);
  for (;;) {
    const uint64_t begin = cur & kUnitMask, end = cur >> kUnitBits & kUnitMask;
    if ((cur >> (2 * kUnitBits)) != (tag & kTagMask) || begin >= end) return false;
    const uint64_t next = front ? pack(tag, begin + 1, end) : pack(tag, begin, end - 1);
    if (r.compare_exchange_weak(cur, next, std::memory_order_acq_rel, std::memory_order_acquire)) {
      unit = static_cast<size_t>(front ? begin : end - 1);
      return true;
    }
  }
}

}  // namespace

Team::Team(int threads) : ranges_(static_cast<size_t>(std::max(threads, 1))), forks_(fork_count()) {
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { work(i); });
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

// the units of loop `tag` this thread runs: its own range's, then the others' leftovers; returns how many
size_t Team::drain(int slot, uint64_t tag) {
  const int T = threads();
  size_t u = 0, ran = 0;
  for (int k = 0; k < T; ++k) {
    std::atomic<uint64_t>& r = ranges_[(slot + k) % T].units;
    while (take(r, tag, k == 0, u)) {
      fn_(data_, u);
      ++ran;
    }
  }
  return ran;
}

void Team::run(void (*fn)(void*, size_t), size_t n, void* data) {
  if (workers_.empty() || n <= 1 || n > kUnitMask || forks_ != forks.load(std::memory_order_relaxed)) {
    for (size_t u = 0; u < n; ++u) fn(data, u);
    return;
  }
  fn_ = fn;
  data_ = data;
  done_.store(0, std::memory_order_relaxed);
  const uint64_t tag = generation_.load(std::memory_order_relaxed) + 1, T = static_cast<uint64_t>(threads());
  for (uint64_t t = 0; t < T; ++t)  // release: a thread that takes a unit sees fn_ and data_
    ranges_[t].units.store(pack(tag, n * t / T, n * (t + 1) / T), std::memory_order_release);
  {
    // under the lock: a worker about to sleep either sees the new generation in its wait predicate or is woken
    std::lock_guard<std::mutex> lock(mutex_);
    generation_.store(tag, std::memory_order_release);
    if (sleeping_ > 0) wake_.notify_all();
  }
  size_t mine = drain(0, tag);
  // every unit is taken once drain returns; wait for those still running on a worker (none when no worker woke)
  for (int probe = 0; done_.load(std::memory_order_acquire) + mine != n; ++probe) relax(probe);
}

void Team::work(int slot) {
  uint64_t seen = 0;  // the generation before any loop (not a load: a loop may start before this thread does)
  for (;;) {
    auto start = std::chrono::steady_clock::now();
    for (int probe = 0; generation_.load(std::memory_order_acquire) == seen; ++probe) {
      relax(probe);
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
    const size_t ran = drain(slot, seen);
    if (ran > 0) done_.fetch_add(ran, std::memory_order_release);
  }
}

}  // namespace r1c_cpu
