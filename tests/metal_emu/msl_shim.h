// MSL shim: the Metal Shading Language types and builtins our kernels use, in plain C++, so the kernel text that
// mx.fast.metal_kernel would compile (header + generated signature + body) compiles with g++ and runs on fibers.
// Stands in for what MLX prepends on a Mac (metal_stdlib + mlx/backend/metal/kernels/utils.h).
#pragma once

#include "runtime.h"  // before the keyword macros below

#include <cmath>
#include <limits>
#include <type_traits>

// ---- scalar types ----
#include "fp_types.h"
typedef emu_half half;
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;

typedef half float16_t;
typedef bfloat bfloat16_t;

// ---- vector types: T<N> with .x .y .z .w, element-wise arithmetic ----
template <typename T, int N>
struct vec;
template <typename T>
struct vec<T, 2> {
  T x, y;
  T& operator[](int i) { return (&x)[i]; }
  const T& operator[](int i) const { return (&x)[i]; }
};
template <typename T>
struct vec<T, 3> {
  T x, y, z;
  T& operator[](int i) { return (&x)[i]; }
  const T& operator[](int i) const { return (&x)[i]; }
};
template <typename T>
struct vec<T, 4> {
  T x, y, z, w;
  T& operator[](int i) { return (&x)[i]; }
  const T& operator[](int i) const { return (&x)[i]; }
};
#define EMU_VEC_OP(op)                                                              \
  template <typename T, int N>                                                      \
  vec<T, N> operator op(const vec<T, N>& a, const vec<T, N>& b) {                   \
    vec<T, N> r;                                                                    \
    for (int i = 0; i < N; ++i) r[i] = a[i] op b[i];                                \
    return r;                                                                       \
  }                                                                                 \
  template <typename T, int N, typename S, typename = std::enable_if_t<std::is_arithmetic_v<S>>> \
  vec<T, N> operator op(const vec<T, N>& a, S b) {                                  \
    vec<T, N> r;                                                                    \
    for (int i = 0; i < N; ++i) r[i] = a[i] op(T) b;                                \
    return r;                                                                       \
  }                                                                                 \
  template <typename T, int N>                                                      \
  vec<T, N>& operator op##=(vec<T, N>& a, const vec<T, N>& b) { return a = a op b; }
EMU_VEC_OP(+)
EMU_VEC_OP(-)
EMU_VEC_OP(*)
EMU_VEC_OP(/)
#undef EMU_VEC_OP

#define EMU_VEC_ALIASES(T, name) \
  typedef vec<T, 2> name##2;     \
  typedef vec<T, 3> name##3;     \
  typedef vec<T, 4> name##4;
EMU_VEC_ALIASES(float, float)
EMU_VEC_ALIASES(half, half)
EMU_VEC_ALIASES(int, int)
EMU_VEC_ALIASES(uint, uint)
EMU_VEC_ALIASES(short, short)
EMU_VEC_ALIASES(ushort, ushort)
EMU_VEC_ALIASES(int8_t, char)
EMU_VEC_ALIASES(uchar, uchar)
#undef EMU_VEC_ALIASES

// ---- math: namespace metal (MLX's bf16.h does `using namespace metal`, so bodies may call these unqualified) --
namespace metal {
template <typename T>
using numeric_limits = std::numeric_limits<T>;
template <typename T, typename U>
auto max(T a, U b) { return a > b ? a : b; }
template <typename T, typename U>
auto min(T a, U b) { return a < b ? a : b; }
template <typename T>
T clamp(T x, T lo, T hi) { return x < lo ? lo : (x > hi ? hi : x); }
template <typename T, int N>
T dot(const vec<T, N>& a, const vec<T, N>& b) {
  T r = 0;
  for (int i = 0; i < N; ++i) r += a[i] * b[i];
  return r;
}
template <typename T>
T select(T a, T b, bool c) { return c ? b : a; }
template <typename T, typename F>
T as_type(F f) {
  static_assert(sizeof(T) == sizeof(F), "as_type needs equal sizes");
  T t;
  std::memcpy(&t, &f, sizeof(T));
  return t;
}
#define EMU_UNARY(name, impl) \
  inline float name(float x) { return impl(x); }    \
  inline half name(half x) { return (half)impl((float)x); }
EMU_UNARY(exp, std::exp)
EMU_UNARY(exp2, std::exp2)
EMU_UNARY(log, std::log)
EMU_UNARY(log2, std::log2)
EMU_UNARY(sqrt, std::sqrt)
EMU_UNARY(abs, std::fabs)
EMU_UNARY(fabs, std::fabs)
EMU_UNARY(tanh, std::tanh)
EMU_UNARY(floor, std::floor)
EMU_UNARY(ceil, std::ceil)
EMU_UNARY(round, std::round)
#undef EMU_UNARY
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
inline float pow(float a, float b) { return std::pow(a, b); }
inline float fmax(float a, float b) { return std::fmax(a, b); }
inline float fmin(float a, float b) { return std::fmin(a, b); }
inline bool isnan(float x) { return std::isnan(x); }
inline bool isinf(float x) { return std::isinf(x); }
namespace fast {
using metal::exp;
using metal::exp2;
using metal::log;
using metal::rsqrt;
using metal::sqrt;
}  // namespace fast
namespace precise {
using metal::exp;
using metal::exp2;
using metal::log;
using metal::rsqrt;
using metal::sqrt;
}  // namespace precise
}  // namespace metal
using namespace metal;

// ---- synchronisation ----
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags((int)a | (int)b); }
inline void threadgroup_barrier(mem_flags) { emu::threadgroup_barrier_impl(); }
// A SIMD-group executes in lockstep on the GPU; here its lanes meet at a collective point.
inline void simdgroup_barrier(mem_flags) {
  uint64_t m;
  int z = 0;
  emu::collective(&z, sizeof z, 1, &m);
}

// ---- SIMD-group collectives ----
namespace emu {
enum Op { OP_BARRIER = 1, OP_SUM, OP_MAX, OP_MIN, OP_SHUFFLE, OP_SHUFFLE_DOWN, OP_SHUFFLE_UP, OP_SHUFFLE_XOR,
          OP_BROADCAST, OP_BROADCAST_FIRST, OP_PREFIX_EX, OP_PREFIX_IN };
template <typename T>
const T& slot(const unsigned char* row, unsigned lane) {
  return *reinterpret_cast<const T*>(row + (size_t)lane * kSlotBytes);
}
template <typename T, typename F>
T reduce(T x, int op, F f) {
  static_assert(sizeof(T) <= kSlotBytes, "collective value too large");
  uint64_t mask;
  const unsigned char* row = collective(&x, sizeof x, op, &mask);
  bool first = true;
  T r{};
  for (unsigned l = 0; l < (unsigned)kSimdWidth; ++l) {
    if (!(mask >> l & 1u)) continue;
    r = first ? slot<T>(row, l) : f(r, slot<T>(row, l));
    first = false;
  }
  return r;
}
// Value of lane `src`; a lane that is out of range or inactive reads its own value (MSL leaves it undefined).
template <typename T>
T from_lane(T x, int op, long src) {
  uint64_t mask;
  const unsigned char* row = collective(&x, sizeof x, op, &mask);
  if (src < 0 || src >= kSimdWidth || !(mask >> src & 1u)) return x;
  return slot<T>(row, (unsigned)src);
}
}  // namespace emu

template <typename T>
T simd_sum(T x) { return emu::reduce(x, emu::OP_SUM, [](T a, T b) { return T(a + b); }); }
template <typename T>
T simd_max(T x) { return emu::reduce(x, emu::OP_MAX, [](T a, T b) { return a > b ? a : b; }); }
template <typename T>
T simd_min(T x) { return emu::reduce(x, emu::OP_MIN, [](T a, T b) { return a < b ? a : b; }); }
template <typename T>
T simd_shuffle(T x, ushort lane) { return emu::from_lane(x, emu::OP_SHUFFLE, lane); }
template <typename T>
T simd_broadcast(T x, ushort lane) { return emu::from_lane(x, emu::OP_BROADCAST, lane); }
template <typename T>
T simd_shuffle_down(T x, ushort d) { return emu::from_lane(x, emu::OP_SHUFFLE_DOWN, (long)emu::g_cur->lane + d); }
template <typename T>
T simd_shuffle_up(T x, ushort d) { return emu::from_lane(x, emu::OP_SHUFFLE_UP, (long)emu::g_cur->lane - d); }
template <typename T>
T simd_shuffle_xor(T x, ushort m) { return emu::from_lane(x, emu::OP_SHUFFLE_XOR, (long)(emu::g_cur->lane ^ m)); }
template <typename T>
T simd_broadcast_first(T x) {
  uint64_t mask;
  const unsigned char* row = emu::collective(&x, sizeof x, emu::OP_BROADCAST_FIRST, &mask);
  return emu::slot<T>(row, (unsigned)__builtin_ctzll(mask));
}
template <typename T>
T simd_prefix_exclusive_sum(T x) {
  uint64_t mask;
  const unsigned char* row = emu::collective(&x, sizeof x, emu::OP_PREFIX_EX, &mask);
  T r = T(0);
  for (unsigned l = 0; l < emu::g_cur->lane; ++l)
    if (mask >> l & 1u) r = T(r + emu::slot<T>(row, l));
  return r;
}

// ---- thread-position attributes (the generated signature receives them as arguments) ----
namespace emu::attr {
inline vec<uint, 3> u3(Dim3 d) { return {d.x, d.y, d.z}; }
inline vec<uint, 3> thread_position_in_threadgroup() { return u3(g_cur->pos); }
inline vec<uint, 3> threadgroup_position_in_grid() { return u3(g_launch->group_pos); }
inline vec<uint, 3> threads_per_threadgroup() { return u3(g_launch->group_actual); }
inline vec<uint, 3> dispatch_threads_per_threadgroup() { return u3(g_launch->group); }
inline vec<uint, 3> threadgroups_per_grid() { return u3(g_launch->n_groups); }
inline vec<uint, 3> threads_per_grid() { return u3(g_launch->grid); }
inline vec<uint, 3> grid_size() { return u3(g_launch->grid); }
inline vec<uint, 3> grid_origin() { return {0, 0, 0}; }
inline vec<uint, 3> thread_position_in_grid() {
  Dim3 g = g_launch->group_pos, s = g_launch->group, p = g_cur->pos;
  return {g.x * s.x + p.x, g.y * s.y + p.y, g.z * s.z + p.z};
}
inline uint thread_index_in_threadgroup() { return g_cur->linear; }
inline uint thread_index_in_simdgroup() { return g_cur->lane; }
inline uint simdgroup_index_in_threadgroup() { return g_cur->simd; }
inline uint simdgroups_per_threadgroup() { return g_launch->n_simd; }
inline uint dispatch_simdgroups_per_threadgroup() {
  return div_up(g_launch->group.x * g_launch->group.y * g_launch->group.z, kSimdWidth);
}
inline uint threads_per_simdgroup() { return kSimdWidth; }
inline uint thread_execution_width() { return kSimdWidth; }
inline uint thread_index_in_quadgroup() { return g_cur->linear % 4; }
inline uint quadgroup_index_in_threadgroup() { return g_cur->linear / 4; }
inline uint quadgroups_per_threadgroup() { return div_up((unsigned)g_launch->fibers.size(), 4u); }
inline uint dispatch_quadgroups_per_threadgroup() {
  return div_up(g_launch->group.x * g_launch->group.y * g_launch->group.z, 4u);
}
}  // namespace emu::attr

// ---- address-space keywords: one flat address space on the CPU ----
// `threadgroup T name[N];` declarations are rewritten by the harness into views of the shared arena.
#define device
#define constant
#define threadgroup
#define thread
#define kernel
