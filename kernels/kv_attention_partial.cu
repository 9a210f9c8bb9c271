// kv_attention pass 1 for CUDA: the algorithm of kv_attention_partial.metal with warps for SIMD-groups.
// Body for mx.fast.cuda_kernel (header: cuda_helpers.h); the signature is generated from:
//   inputs  q[B, H, L, D] (T), k_codes, v_codes[B, KV, S_alloc, D] (int8), qk_scale (float),
//           kv_len, s_alloc, n_kv, block (int) -- scalars arrive as pointers
//   outputs part_o[B*H*L, n_splits, D], part_m, part_l[B*H*L, n_splits] (float)
//   template T, D, L, G, NSG, RPS, CAUSAL
// Grid (32 * n_splits, NSG, B * KV) threads, block (32, NSG, 1): one block = one KV head and one split.
constexpr int DPL = D / 32;
constexpr int TILE = 32;
constexpr int ROWS = G * L;
__shared__ int8_t k_tile[TILE * D];
__shared__ int8_t v_tile[TILE * D];

const int lane = threadIdx.x;
const int sg = threadIdx.y;
const int tid = threadIdx.y * 32 + threadIdx.x;
const int split = blockIdx.x;
const int n_splits = gridDim.x;
const int KV_LEN = kv_len[0];
const int N_KV = n_kv[0];
const int b = blockIdx.z / N_KV;
const int kvh = blockIdx.z % N_KV;
const int n_heads = N_KV * G;
const int s_begin = split * block[0];
const int s_end = min(s_begin + block[0], KV_LEN);
const float qk = qk_scale[0];

float qr[RPS][DPL];
float o[RPS][DPL];
float m_run[RPS];
float l_run[RPS];
#pragma unroll
for (int j = 0; j < RPS; ++j) {
  const int r = sg + NSG * j;
  const int64_t q_row = (int64_t(b) * n_heads + kvh * G + r / L) * L + r % L;
#pragma unroll
  for (int i = 0; i < DPL; ++i) {
    qr[j][i] = r < ROWS ? afm_to_float(q[q_row * D + i * 32 + lane]) * qk : 0.0f;
    o[j][i] = 0.0f;
  }
  m_run[j] = afm_neg_inf();
  l_run[j] = 0.0f;
}

const int64_t head_base = (int64_t(b) * N_KV + kvh) * s_alloc[0] * D;
for (int t0 = s_begin; t0 < s_end; t0 += TILE) {
  __syncthreads();  // every warp is done with the previous tile
  const int n_keys = min(TILE, s_end - t0);
  for (int idx = tid; idx < TILE * D; idx += 32 * NSG) {
    const bool inside = idx / D < n_keys;
    k_tile[idx] = inside ? k_codes[head_base + int64_t(t0) * D + idx] : int8_t(0);
    v_tile[idx] = inside ? v_codes[head_base + int64_t(t0) * D + idx] : int8_t(0);
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < RPS; ++j) {
    const int r = sg + NSG * j;
    const int visible = CAUSAL ? min(n_keys, KV_LEN - L + r % L - t0 + 1) : n_keys;
    if (r >= ROWS || visible <= 0) {
      continue;  // uniform across the warp
    }
    float my_score = afm_neg_inf();
    for (int t = 0; t < visible; ++t) {
      float partial = 0.0f;
#pragma unroll
      for (int i = 0; i < DPL; ++i) {
        partial += qr[j][i] * static_cast<float>(k_tile[t * D + i * 32 + lane]);
      }
      const float score = afm_warp_sum(partial);
      if (lane == t) {
        my_score = score;
      }
    }
    const float m_new = fmaxf(m_run[j], afm_warp_max(my_score));
    const float factor = expf(m_run[j] - m_new);
    const float p = expf(my_score - m_new);
    l_run[j] = l_run[j] * factor + afm_warp_sum(p);
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      o[j][i] *= factor;
    }
    for (int t = 0; t < visible; ++t) {
      const float pt = __shfl_sync(0xffffffffu, p, t);
#pragma unroll
      for (int i = 0; i < DPL; ++i) {
        o[j][i] += pt * static_cast<float>(v_tile[t * D + i * 32 + lane]);
      }
    }
    m_run[j] = m_new;
  }
}

#pragma unroll
for (int j = 0; j < RPS; ++j) {
  const int r = sg + NSG * j;
  if (r >= ROWS) {
    continue;
  }
  const int64_t out_row = ((int64_t(b) * n_heads + kvh * G + r / L) * L + r % L) * n_splits + split;
#pragma unroll
  for (int i = 0; i < DPL; ++i) {
    part_o[out_row * D + i * 32 + lane] = o[j][i];
  }
  if (lane == 0) {
    part_m[out_row] = m_run[j];
    part_l[out_row] = l_run[j];
  }
}
