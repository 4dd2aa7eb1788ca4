// The CPU kernels' thread pool: work-claiming units, a calling thread that always works, passive workers.
//
// Why not an OpenMP parallel region: its closing barrier waits for every thread of the team, so on a machine
// where another process (or torch's own intra-op threads) holds a core, each region waits a whole scheduler
// slice for the descheduled thread, even when the running threads could have done all the work; and spinning
// OpenMP workers (the default wait policy, which cannot be changed once the runtime has started) take cycles
// from whatever else runs. Here:
//   - units are claimed one at a time from an atomic counter, so a running thread takes the units a descheduled
//     one never got to;
//   - the caller only waits for workers that have actually joined the job and hold a unit; a worker that wakes
//     up after the caller has claimed the last unit finds the job closed and goes back to sleep;
//   - idle workers sleep on a condition variable, after watching for the next job for at most 50 us;
//   - only one job uses the workers at a time; a concurrent caller (another Python thread) runs its job alone
//     on its own thread instead of waiting.
// Results never depend on which thread runs a unit: units write disjoint memory, and every value is a function
// of its global index only.
#pragma once

#include <cstdint>
#include <type_traits>

namespace mezo {
namespace cpu {

using UnitFn = void (*)(void* ctx, int64_t unit);

// Calls fn(ctx, u) once for every u in [0, n), on the calling thread and up to max_threads - 1 pool workers.
// fn must not throw. Returns when every call has returned (their writes are visible to the caller).
void parallel_units(int64_t n, int max_threads, UnitFn fn, void* ctx);

template <class F>
void parallel_for(int64_t n, int max_threads, F&& f) {
  using Fn = typename std::remove_reference<F>::type;
  parallel_units(
      n, max_threads, [](void* c, int64_t u) { (*static_cast<Fn*>(c))(u); }, static_cast<void*>(&f));
}

// Threads the kernels use by default: OMP_NUM_THREADS when it is set to a positive number (as before the pool,
// so existing job scripts keep their meaning), else the CPUs this process may run on.
int default_threads();

}  // namespace cpu
}  // namespace mezo
