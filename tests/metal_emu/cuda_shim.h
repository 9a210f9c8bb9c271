// CUDA shim: the CUDA device subset our kernels use, in plain C++, so the text mx.fast.cuda_kernel generates
// (MLX's default header is replaced by this file) compiles with g++ and runs on the same fiber runtime:
// a block is a threadgroup, a warp a SIMD-group of 32 lanes (linear thread id / 32, as on NVIDIA GPUs).
#pragma once

#include "runtime.h"  // before the keyword macros below

#include <cmath>
#include <limits>

#include "fp_types.h"

typedef emu_half __half;
typedef bfloat __nv_bfloat16;

inline float __half2float(__half h) { return (float)h; }
inline __half __float2half(float f) { return (__half)f; }
inline float __bfloat162float(__nv_bfloat16 b) { return (float)b; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline float __int_as_float(unsigned i) { return __int_as_float((int)i); }
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, 4);
  return i;
}
inline float expf(float x) { return std::exp(x); }
inline float __expf(float x) { return std::exp(x); }
inline float fmaxf(float a, float b) { return std::fmax(a, b); }
inline float fminf(float a, float b) { return std::fmin(a, b); }
inline float sqrtf(float x) { return std::sqrt(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
template <typename A, typename B>
auto min(A a, B b) { return a < b ? a : b; }
template <typename A, typename B>
auto max(A a, B b) { return a > b ? a : b; }

// ---- thread indices (macros so that `threadIdx.x` reads the running fiber's position) ----
struct dim3 {
  unsigned x, y, z;
};
namespace emu::cuda {
inline dim3 d3(Dim3 d) { return {d.x, d.y, d.z}; }
inline dim3 thread_idx() { return d3(g_cur->pos); }
inline dim3 block_idx() { return d3(g_launch->group_pos); }
inline dim3 block_dim() { return d3(g_launch->group); }
inline dim3 grid_dim() { return d3(g_launch->n_groups); }
}  // namespace emu::cuda
#define threadIdx (::emu::cuda::thread_idx())
#define blockIdx (::emu::cuda::block_idx())
#define blockDim (::emu::cuda::block_dim())
#define gridDim (::emu::cuda::grid_dim())
#define warpSize 32

namespace cooperative_groups {
struct grid_group {
  unsigned long long thread_rank() const {
    auto g = emu::g_launch->group_pos, n = emu::g_launch->n_groups;
    unsigned long long block = g.x + (unsigned long long)n.x * (g.y + (unsigned long long)n.y * g.z);
    return block * emu::g_launch->fibers.size() + emu::g_cur->linear;
  }
  unsigned long long size() const {
    auto n = emu::g_launch->n_groups;
    return (unsigned long long)n.x * n.y * n.z * emu::g_launch->fibers.size();
  }
  void sync() const { emu::fail("grid.sync() is not emulated"); }
};
struct thread_block {
  unsigned thread_rank() const { return emu::g_cur->linear; }
  void sync() const { emu::threadgroup_barrier_impl(); }
};
inline grid_group this_grid() { return {}; }
inline thread_block this_thread_block() { return {}; }
}  // namespace cooperative_groups

// ---- synchronisation and warp shuffles ----
inline void __syncthreads() { emu::threadgroup_barrier_impl(); }
namespace emu::cuda {
enum Op { OP_SYNCWARP = 101, OP_SHFL, OP_SHFL_XOR, OP_SHFL_DOWN, OP_SHFL_UP };
// Value of lane `src` (within segments of `width`); a lane outside the warp reads its own value, as CUDA does
// for __shfl_down/up past the segment.
template <typename T>
T from_lane(T x, int op, long src) {
  static_assert(sizeof(T) <= kSlotBytes, "shuffled value too large");
  uint64_t mask;
  const unsigned char* row = collective(&x, sizeof x, op, &mask);
  if (src < 0 || src >= kSimdWidth) return x;
  if (!(mask >> src & 1u)) fail("__shfl_*_sync reads a lane that has exited");
  return *reinterpret_cast<const T*>(row + (size_t)src * kSlotBytes);
}
}  // namespace emu::cuda
inline void __syncwarp(unsigned = 0xffffffffu) {
  uint64_t m;
  int z = 0;
  emu::collective(&z, sizeof z, emu::cuda::OP_SYNCWARP, &m);
}
template <typename T>
T __shfl_sync(unsigned, T v, int src, int width = 32) {
  long base = emu::g_cur->lane / width * width;
  return emu::cuda::from_lane(v, emu::cuda::OP_SHFL, base + ((src % width) + width) % width);
}
template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32) {
  long lane = emu::g_cur->lane;
  long src = lane ^ lane_mask;
  if (src / width != lane / width) src = lane;  // outside the segment: own value
  return emu::cuda::from_lane(v, emu::cuda::OP_SHFL_XOR, src);
}
template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  long lane = emu::g_cur->lane;
  long src = lane + delta;
  if (src / width != lane / width) src = lane;
  return emu::cuda::from_lane(v, emu::cuda::OP_SHFL_DOWN, src);
}
template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  long lane = emu::g_cur->lane;
  long src = lane - (long)delta;
  if (src < 0 || src / width != lane / width) src = lane;
  return emu::cuda::from_lane(v, emu::cuda::OP_SHFL_UP, src);
}

// ---- keywords ----
// `__shared__ T name[N];` declarations are rewritten by the harness into views of the shared arena.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
#define __grid_constant__
#define __shared__
