// Threads that outlive a call, for the CPU search: `Workers::instance().run(count, work)` runs `work()` on
// the calling thread and on count - 1 helper threads, and returns when every one that started has
// returned.
//
// Why not start threads per call: on the 2-core KVM guests fastvq is developed and tested on (whose
// scheduler packs runnable threads onto few vCPUs, `kernel.sched_vcpu_pack`), a new thread, and a
// sleeping one woken by a call, was placed on its waker's core and ran only after the waker's slice,
// about 2 ms later; a 2-thread search of a few ms then ran at one thread's speed, and slower after any
// idle gap (8191 x 1024 codes, D = 16: 1.9 ms back to back, 4.1 ms after a 0.1 s pause). So the helpers
// are started once per process and sleep on a condition variable between calls (no spinning: an idle
// helper costs nothing), and before each call the caller binds helper i to a core of its own affinity
// mask other than the one it runs on (started within ~0.1 ms there, measured). Work is handed out
// dynamically by the caller's `work`, so a helper that starts late, or whose core another process
// shares, simply takes less of it, and one that has not started when the caller's share is done is not
// waited for.
//
// One call at a time uses the helpers; a call made while another holds them (two Python threads
// searching at once) runs on its caller alone. A forked child starts its own helpers (the parent's do
// not exist there).

#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#ifdef __linux__
#include <pthread.h>
#include <sched.h>
#endif

namespace fastvq_cpu {

class Workers {
 public:
  // This process's helpers (created at first use, never destroyed: they sleep until the process exits).
  static Workers& instance() {
    static std::once_flag registered;
#ifdef __linux__
    std::call_once(registered, [] { pthread_atfork(nullptr, nullptr, [] { current().store(nullptr); }); });
#endif
    Workers* workers = current().load(std::memory_order_acquire);
    if (workers) return *workers;
    Workers* created = new Workers();
    if (current().compare_exchange_strong(workers, created, std::memory_order_acq_rel)) return *created;
    delete created;  // another thread created this process's first
    return *workers;
  }

  // Runs work() on the caller and on count - 1 helpers (fewer if the system refuses to start one, none
  // when another call holds the helpers); rethrows the first exception a thread raised.
  template <typename F>
  void run(int count, const F& work) {
    std::unique_lock<std::mutex> call(call_, std::try_to_lock);
    const int helpers = call.owns_lock() ? start_helpers(count - 1) : 0;
    if (helpers == 0) return work();
    bind_helpers(helpers);
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      job_ = [](const void* f) { (*static_cast<const F*>(f))(); };
      job_arg_ = &work;
      joining_ = helpers, error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    std::exception_ptr error;
    try {
      work();
    } catch (...) {
      error = std::current_exception();
    }
    std::unique_lock<std::mutex> lock(mutex_);
    joining_ = 0;  // the caller's share is done: a helper that has not started has nothing left to take
    finished_.wait(lock, [&] { return running_ == 0; });
    if (!error) error = error_;
    if (error) std::rethrow_exception(error);
  }

 private:
  Workers() = default;
  static std::atomic<Workers*>& current() {
    static std::atomic<Workers*> workers{nullptr};
    return workers;
  }

  // At least `wanted` helpers if the system allows; returns how many of them this call uses.
  int start_helpers(int wanted) {
    while (static_cast<int>(handles_.size()) < wanted) {
      const int id = static_cast<int>(handles_.size());
      try {
        std::thread helper([this, id] { serve(id); });
        handles_.push_back(helper.native_handle());
        helper.detach();
      } catch (const std::system_error&) {
        break;
      }
    }
    return std::clamp(wanted, 0, static_cast<int>(handles_.size()));
  }

  // Helper i onto the i-th core of the caller's affinity mask counted from the one after the caller's,
  // cyclically, the caller's own last (so with fewer cores than threads every core takes its share).
  void bind_helpers(int helpers) const {
#ifdef __linux__
    cpu_set_t allowed;
    if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0) return;
    const int here = std::max(sched_getcpu(), 0);
    std::vector<int> cores;
    for (int step = 1; step <= CPU_SETSIZE; ++step)
      if (CPU_ISSET((here + step) % CPU_SETSIZE, &allowed)) cores.push_back((here + step) % CPU_SETSIZE);
    for (int i = 0; i < helpers && !cores.empty(); ++i) {
      cpu_set_t core;
      CPU_ZERO(&core);
      CPU_SET(cores[i % cores.size()], &core);
      pthread_setaffinity_np(handles_[i], sizeof(core), &core);  // a failure leaves the helper unbound
    }
#else
    (void)helpers;
#endif
  }

  // Helper `id`: sleeps until a call wants it, runs the call's work, and sleeps again.
  void serve(int id) {
    std::uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (id >= joining_) continue;  // not wanted, or the call's work is already done
      ++running_;
      void (*const job)(const void*) = job_;
      const void* const arg = job_arg_;
      lock.unlock();
      std::exception_ptr error;
      try {
        job(arg);
      } catch (...) {
        error = std::current_exception();
      }
      lock.lock();
      if (error && !error_) error_ = error;
      if (--running_ == 0) finished_.notify_all();
    }
  }

  std::mutex call_;                       // held by the call that uses the helpers
  std::vector<std::thread::native_handle_type> handles_;  // the helpers, in id order (only the holder of call_ reads or adds)
  std::mutex mutex_;                      // guards the fields below
  std::condition_variable wake_, finished_;
  std::uint64_t generation_ = 0;          // calls so far
  int joining_ = 0;                       // helpers 0 .. joining_ - 1 may still join the current call
  int running_ = 0;                       // helpers inside the current call's work
  void (*job_)(const void*) = nullptr;    // the current call's work
  const void* job_arg_ = nullptr;
  std::exception_ptr error_;              // the first exception a helper raised in the current call
};

}  // namespace fastvq_cpu
