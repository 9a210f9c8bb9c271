// qmm_small: y[m, n] = sum_k x[m, k] * (scale[n, g] * q[n, k] + bias[n, g]) + LoRA, for M = 1..8 rows.
// Body for mx.fast.metal_kernel; the signature is generated from:
//   inputs  x[M, K] (T), w[N, K*BITS/32] (uint32, low bits first, as mx.quantize packs), scales, biases [N, K/GS] (S),
//           lora_t[M, rank] (float: lora_scale * x @ A), lora_b[rank, N] (BT), k, n, rank (int scalars)
//   outputs y[M, N] (T)
//   template T, S, BT, M, BITS, GS, R (rows per SIMD-group), HAS_LORA
// Grid (64 * ceil(N / (2 * R)), 1, 1), threadgroup (64, 1, 1): two SIMD-groups, each owning R output rows.
// Each lane walks uint32 words of its R rows and applies every word to all M activation rows, so every weight
// byte is read once per call whatever M is; the per-group affine part is factored as scale * (q . x) + bias * sum(x).
constexpr int PACK = 32 / BITS;
constexpr uint MASK = (1u << BITS) - 1u;
const int lane = int(thread_index_in_simdgroup);
const int row0 = int(threadgroup_position_in_grid.x * simdgroups_per_threadgroup + simdgroup_index_in_threadgroup) * R;
if (row0 >= n) {
  return;  // the whole SIMD-group leaves together; there is no threadgroup barrier below
}
const int words = k / PACK;
const int groups = k / GS;

float acc[R][M];
for (int r = 0; r < R; ++r) {
  for (int m = 0; m < M; ++m) {
    acc[r][m] = 0.0f;
  }
}
for (int j = lane; j < words; j += 32) {
  const int k0 = j * PACK;
  const int g = k0 / GS;  // a word never straddles a group: PACK divides GS
  uint word[R];
  float sc[R];
  float bi[R];
  for (int r = 0; r < R; ++r) {
    const int64_t row = row0 + r;
    const bool live = row0 + r < n;  // uniform across the SIMD-group
    word[r] = live ? w[row * words + j] : 0u;
    sc[r] = live ? static_cast<float>(scales[row * groups + g]) : 0.0f;
    bi[r] = live ? static_cast<float>(biases[row * groups + g]) : 0.0f;
  }
  float dot[R][M];
  float xsum[M];
  for (int m = 0; m < M; ++m) {
    xsum[m] = 0.0f;
    for (int r = 0; r < R; ++r) {
      dot[r][m] = 0.0f;
    }
  }
  for (int i = 0; i < PACK; ++i) {
    float q[R];
    for (int r = 0; r < R; ++r) {
      q[r] = static_cast<float>((word[r] >> (i * BITS)) & MASK);
    }
    for (int m = 0; m < M; ++m) {
      const float xv = static_cast<float>(x[m * k + k0 + i]);
      xsum[m] += xv;
      for (int r = 0; r < R; ++r) {
        dot[r][m] += q[r] * xv;
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < M; ++m) {
      acc[r][m] += sc[r] * dot[r][m] + bi[r] * xsum[m];
    }
  }
}
if (HAS_LORA) {
  // acc += (lora_scale * x @ A) @ B, the rank split across lanes; summed with the main term below.
  for (int r = 0; r < R && row0 + r < n; ++r) {
    const int row = row0 + r;
    for (int j = lane; j < rank; j += 32) {
      const float b = static_cast<float>(lora_b[j * n + row]);
      for (int m = 0; m < M; ++m) {
        acc[r][m] += lora_t[m * rank + j] * b;
      }
    }
  }
}
for (int r = 0; r < R; ++r) {
  for (int m = 0; m < M; ++m) {
    const float total = simd_sum(acc[r][m]);
    if (lane == 0 && row0 + r < n) {
      y[m * n + row0 + r] = static_cast<T>(total);
    }
  }
}
