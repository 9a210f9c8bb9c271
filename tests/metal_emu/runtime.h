// Fiber runtime of the GPU emulation harness: runs one threadgroup's threads as cooperative fibers on one CPU
// thread, so threadgroup barriers and SIMD-group collectives synchronise exactly as a GPU requires, and reports
// the GPU bugs a CPU would hide: a barrier that not every thread reaches, a collective that some lanes skip,
// threadgroup memory read before it is written (the arena is poisoned with 0xFF bytes = NaN for floats) or over
// its 32 KiB limit.
//
// Fibers start with makecontext/setcontext and switch with _setjmp/_longjmp (no signal-mask syscall per switch).
// Included by the MSL and CUDA shims before their keyword macros, so it uses only plain C++.
#pragma once

#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace emu {

constexpr int kSimdWidth = 32;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kSharedLimit = 32 * 1024;  // Apple GPUs: 32 KiB threadgroup memory
constexpr int kSlotBytes = 16;              // largest value a collective exchanges

enum State { RUNNABLE, AT_BARRIER, AT_COLLECTIVE, DONE };

struct Dim3 {
  unsigned x, y, z;
};

struct Fiber {
  jmp_buf jb;
  ucontext_t uc;
  char* stack = nullptr;
  bool started = false;
  State state = RUNNABLE;
  Dim3 pos{};           // position in the threadgroup
  unsigned linear = 0;  // x + y*X + z*X*Y
  unsigned simd = 0, lane = 0;
  unsigned seq = 0;     // collectives this lane has completed
  int op = 0;           // which collective it waits at (divergence check)
  size_t shared_off = 0;  // bump pointer into the shared arena
};

struct Launch {
  Dim3 grid{}, group{}, n_groups{};  // grid and group sizes in threads; groups per grid
  Dim3 group_pos{}, group_actual{};  // this threadgroup and its real size (edge groups may be partial)
  std::vector<Fiber> fibers;
  unsigned n_simd = 0;
  std::vector<unsigned char> shared;  // threadgroup memory arena
  std::vector<unsigned char> slots;   // [n_simd][2 parities][32 lanes][kSlotBytes]
  std::vector<uint64_t> active;       // [n_simd][2]: lanes that took part in the last collective
  bool reverse = false;
  void (*body)() = nullptr;
  char error[512] = {0};
};

inline Launch* g_launch = nullptr;
inline Fiber* g_cur = nullptr;
inline jmp_buf g_sched;
inline bool g_in_fiber = false;

// Records the first error; from a fiber it jumps back to the scheduler, which rethrows on its own stack.
[[noreturn]] inline void fail(const char* msg) {
  if (!g_launch->error[0]) {
    std::snprintf(g_launch->error, sizeof(g_launch->error), "%s (threadgroup %u,%u,%u thread %u)", msg,
                  g_launch->group_pos.x, g_launch->group_pos.y, g_launch->group_pos.z, g_cur ? g_cur->linear : 0u);
  }
  if (g_in_fiber) _longjmp(g_sched, 2);
  throw 0;
}

inline void yield_to_scheduler() {
  if (!_setjmp(g_cur->jb)) _longjmp(g_sched, 1);
}

inline void trampoline() {
  g_launch->body();
  g_cur->state = DONE;
  _longjmp(g_sched, 1);
}

inline void resume(Fiber& f) {
  g_cur = &f;
  int rc = _setjmp(g_sched);
  if (rc == 0) {
    g_in_fiber = true;
    if (!f.started) {
      f.started = true;
      getcontext(&f.uc);
      f.uc.uc_stack.ss_sp = f.stack;
      f.uc.uc_stack.ss_size = kStackBytes;
      f.uc.uc_link = nullptr;
      makecontext(&f.uc, trampoline, 0);
      setcontext(&f.uc);
    }
    _longjmp(f.jb, 1);
  }
  g_in_fiber = false;
  g_cur = nullptr;
  if (rc == 2) throw 0;  // fail() already wrote the message
}

// ---- synchronisation points called from kernel code (through the shims) ----

inline void threadgroup_barrier_impl() {
  g_cur->state = AT_BARRIER;
  yield_to_scheduler();
}

// Publish `bytes` for this lane, wait for every live lane of the SIMD-group, return the exchange row.
inline const unsigned char* collective(const void* value, size_t bytes, int op, uint64_t* active_out) {
  Fiber& f = *g_cur;
  Launch& L = *g_launch;
  unsigned parity = f.seq & 1u;
  unsigned char* row = L.slots.data() + ((size_t)(f.simd * 2 + parity) * kSimdWidth) * kSlotBytes;
  std::memcpy(row + (size_t)f.lane * kSlotBytes, value, bytes);
  f.op = op;
  f.state = AT_COLLECTIVE;
  yield_to_scheduler();
  f.seq++;
  *active_out = L.active[f.simd * 2 + parity];
  return row;
}

inline void* shared_alloc(size_t bytes, size_t align) {
  Fiber& f = *g_cur;
  size_t off = (f.shared_off + align - 1) / align * align;
  if (off + bytes > kSharedLimit) fail("threadgroup memory over the 32 KiB limit");
  f.shared_off = off + bytes;
  return g_launch->shared.data() + off;
}

template <typename A>
A& shared_array() {
  return *reinterpret_cast<A*>(shared_alloc(sizeof(A), alignof(A) < 16 ? 16 : alignof(A)));
}

// A device buffer argument: bounds-checked, and (for inputs) counting reads per element, so tests can prove
// e.g. that every weight word is read exactly once. The harness substitutes it for `device T*` parameters.
template <typename T>
struct checked_ptr {
  T* base;
  long size;          // elements from base to the end of the buffer
  uint32_t* reads;    // per-element read counters (inputs) or nullptr (outputs)
  const char* name;
  long offset = 0;    // of base within the buffer, for messages and counters

  T& operator[](long i) const {
    if (i < 0 || i >= size) {
      char msg[200];
      std::snprintf(msg, sizeof msg, "out-of-bounds access to '%s' at element %ld (buffer has %ld)", name,
                    i + offset, size + offset);
      fail(msg);
    }
    if (reads) reads[offset + i]++;
    return base[i];
  }
  T& operator*() const { return (*this)[0]; }
  checked_ptr operator+(long k) const { return {base + k, size - k, reads, name, offset + k}; }
  checked_ptr operator-(long k) const { return *this + (-k); }
};

// ---- the scheduler ----

// Release SIMD-groups whose live lanes all wait at a collective, or the whole group at a barrier.
inline bool release_waiters(Launch& L) {
  bool released = false;
  for (unsigned s = 0; s < L.n_simd; ++s) {
    bool any = false, all_waiting = true;
    int op = 0;
    unsigned seq = 0;
    uint64_t mask = 0;
    for (auto& f : L.fibers) {
      if (f.simd != s || f.state == DONE) continue;
      if (f.state != AT_COLLECTIVE) { all_waiting = false; break; }
      if (any && (f.op != op || f.seq != seq)) {
        g_cur = &f;
        fail("SIMD-group lanes reached different collectives (divergent simd_* / __shfl_* call)");
      }
      any = true, op = f.op, seq = f.seq;
      mask |= 1ull << f.lane;
    }
    if (!any || !all_waiting) continue;
    L.active[s * 2 + (seq & 1u)] = mask;
    for (auto& f : L.fibers)
      if (f.simd == s && f.state == AT_COLLECTIVE) f.state = RUNNABLE;
    released = true;
  }
  if (released) return true;
  bool all_barrier = true, any_done = false;
  for (auto& f : L.fibers) {
    any_done |= f.state == DONE;
    all_barrier &= f.state == AT_BARRIER || f.state == DONE;
  }
  for (auto& f : L.fibers) {
    if (f.state != AT_BARRIER) continue;
    g_cur = &f;
    if (any_done) fail("threadgroup barrier not reached by every thread (some returned early)");
    if (!all_barrier) fail("deadlock: threads wait at a threadgroup barrier while others wait at a collective");
  }
  if (!all_barrier) return false;
  for (auto& f : L.fibers) f.state = f.state == DONE ? DONE : RUNNABLE;
  return true;
}

inline void run_group(Launch& L) {
  std::memset(L.shared.data(), 0xFF, L.shared.size());
  std::memset(L.slots.data(), 0xFF, L.slots.size());
  for (auto& f : L.fibers) f.started = false, f.state = RUNNABLE, f.seq = 0, f.shared_off = 0;
  for (;;) {
    bool ran = false;
    for (size_t k = 0; k < L.fibers.size(); ++k) {
      Fiber& f = L.fibers[L.reverse ? L.fibers.size() - 1 - k : k];
      if (f.state != RUNNABLE) continue;
      resume(f);
      ran = true;
    }
    bool all_done = true;
    for (auto& f : L.fibers) all_done &= f.state == DONE;
    if (all_done) return;
    if (!release_waiters(L) && !ran) {
      g_cur = &L.fibers[0];
      fail("deadlock: no thread can proceed");
    }
  }
}

inline unsigned div_up(unsigned a, unsigned b) { return (a + b - 1) / b; }

enum Flags { REVERSE = 1, FULL_GROUPS = 2 };

// Runs the whole grid, threadgroup by threadgroup. dims = grid (threads) then group size. Metal's
// dispatchThreads trims the groups at the grid's edge; with FULL_GROUPS (CUDA: ceil(grid / block) whole blocks)
// they keep every thread. Returns 0, or 1 with the message in `err`.
inline int launch(void (*body)(), const long* dims, int flags, char* err, int err_len) {
  Launch L;
  g_launch = &L;
  L.body = body;
  L.reverse = (flags & REVERSE) != 0;
  const bool full_groups = (flags & FULL_GROUPS) != 0;
  L.grid = {(unsigned)dims[0], (unsigned)dims[1], (unsigned)dims[2]};
  // MLX clamps the threadgroup to the grid (custom_kernel.cpp: std::min(tx, gx)).
  L.group = {(unsigned)std::min(dims[3], dims[0]), (unsigned)std::min(dims[4], dims[1]),
             (unsigned)std::min(dims[5], dims[2])};
  L.n_groups = {div_up(L.grid.x, L.group.x), div_up(L.grid.y, L.group.y), div_up(L.grid.z, L.group.z)};
  unsigned max_threads = L.group.x * L.group.y * L.group.z;
  if (max_threads > 1024) {
    std::snprintf(err, err_len, "threadgroup of %u threads is over the limit of 1024", max_threads);
    return 1;
  }
  std::vector<char*> stacks(max_threads);
  for (auto& s : stacks) s = static_cast<char*>(std::malloc(kStackBytes));
  L.shared.resize(kSharedLimit);
  int rc = 0;
  try {
    for (unsigned gz = 0; gz < L.n_groups.z; ++gz)
      for (unsigned gy = 0; gy < L.n_groups.y; ++gy)
        for (unsigned gx = 0; gx < L.n_groups.x; ++gx) {
          L.group_pos = {gx, gy, gz};
          // dispatchThreads: edge groups hold only the threads inside the grid
          L.group_actual = L.group;
          if (!full_groups)
            L.group_actual = {std::min(L.group.x, L.grid.x - gx * L.group.x),
                              std::min(L.group.y, L.grid.y - gy * L.group.y),
                              std::min(L.group.z, L.grid.z - gz * L.group.z)};
          unsigned n = L.group_actual.x * L.group_actual.y * L.group_actual.z;
          L.fibers.assign(n, Fiber{});
          for (unsigned i = 0; i < n; ++i) {
            Fiber& f = L.fibers[i];
            f.linear = i;
            f.pos = {i % L.group_actual.x, (i / L.group_actual.x) % L.group_actual.y,
                     i / (L.group_actual.x * L.group_actual.y)};
            f.simd = i / kSimdWidth, f.lane = i % kSimdWidth;
            f.stack = stacks[i];
          }
          L.n_simd = div_up(n, kSimdWidth);
          L.slots.assign((size_t)L.n_simd * 2 * kSimdWidth * kSlotBytes, 0xFF);
          L.active.assign(L.n_simd * 2, 0);
          run_group(L);
        }
  } catch (int) {
    std::snprintf(err, err_len, "%s", L.error);
    rc = 1;
  }
  for (auto& s : stacks) std::free(s);
  g_launch = nullptr;
  return rc;
}

}  // namespace emu
