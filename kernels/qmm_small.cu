// qmm_small for CUDA: the algorithm of qmm_small.metal with warps for SIMD-groups.
// Body for mx.fast.cuda_kernel (header: cuda_helpers.h); the signature is generated from:
//   inputs  x[M, K] (T), w[N, K*BITS/32] (uint32, low bits first), scales, biases [N, K/GS] (S),
//           lora_t[M, rank] (float), lora_b[rank, N] (BT), k, n, rank (int scalars, which arrive as pointers)
//   outputs y[M, N] (T)
//   template T, S, BT, M, BITS, GS, R, HAS_LORA (MLX writes them as `using` / `constexpr` lines)
// Grid (64 * ceil(N / (2 * R)), 1, 1) threads, block (64, 1, 1): two warps, each owning R output rows; every
// weight word is read once and applied to all M activation rows.
constexpr int PACK = 32 / BITS;
constexpr uint32_t MASK = (1u << BITS) - 1u;
const int K = k[0];
const int N = n[0];
const int lane = threadIdx.x & 31;
const int row0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * R;
if (row0 >= N) {
  return;  // whole warps leave together; no __syncthreads below
}
const int words = K / PACK;
const int groups = K / GS;

float acc[R][M];
#pragma unroll
for (int r = 0; r < R; ++r) {
#pragma unroll
  for (int m = 0; m < M; ++m) {
    acc[r][m] = 0.0f;
  }
}
for (int j = lane; j < words; j += 32) {
  const int k0 = j * PACK;
  const int g = k0 / GS;
  uint32_t word[R];
  float sc[R];
  float bi[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t row = row0 + r;
    const bool live = row0 + r < N;
    word[r] = live ? w[row * words + j] : 0u;
    sc[r] = live ? afm_to_float(scales[row * groups + g]) : 0.0f;
    bi[r] = live ? afm_to_float(biases[row * groups + g]) : 0.0f;
  }
  float dot[R][M];
  float xsum[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    xsum[m] = 0.0f;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      dot[r][m] = 0.0f;
    }
  }
#pragma unroll
  for (int i = 0; i < PACK; ++i) {
    float q[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      q[r] = static_cast<float>((word[r] >> (i * BITS)) & MASK);
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float xv = afm_to_float(x[m * K + k0 + i]);
      xsum[m] += xv;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        dot[r][m] += q[r] * xv;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      acc[r][m] += sc[r] * dot[r][m] + bi[r] * xsum[m];
    }
  }
}
if (HAS_LORA) {
  const int RANK = rank[0];
  for (int r = 0; r < R && row0 + r < N; ++r) {
    const int row = row0 + r;
    for (int j = lane; j < RANK; j += 32) {
      const float b = afm_to_float(lora_b[j * N + row]);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        acc[r][m] += lora_t[m * RANK + j] * b;
      }
    }
  }
}
#pragma unroll
for (int r = 0; r < R; ++r) {
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float total = afm_warp_sum(acc[r][m]);
    if (lane == 0 && row0 + r < N) {
      y[m * N + row0 + r] = afm_from_float<T>(total);
    }
  }
}
