// Header for the CUDA kernel bodies (passed as mx.fast.cuda_kernel's `header`; it lands before MLX's
// `namespace mlx::core::cu {`). MLX's default header already includes cuda_fp16.h, cuda_bf16.h and
// cooperative_groups.h.

template <typename U>
__device__ __forceinline__ float afm_to_float(U v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float afm_to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float afm_to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename U>
__device__ __forceinline__ U afm_from_float(float v) {
  return static_cast<U>(v);
}
template <>
__device__ __forceinline__ __half afm_from_float<__half>(float v) {
  return __float2half(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 afm_from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

__device__ __forceinline__ float afm_warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

__device__ __forceinline__ float afm_warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

__device__ __forceinline__ float afm_neg_inf() {
  return __int_as_float(0xff800000);
}
