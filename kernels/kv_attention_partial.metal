// kv_attention pass 1: causal GQA attention of L query rows over one block of int8 K/V codes (flash-decoding split).
// Body for mx.fast.metal_kernel; the signature is generated from:
//   inputs  q[B, H, L, D] (T), k_codes, v_codes[B, KV, S_alloc, D] (int8), qk_scale (float: scale * k_scale),
//           kv_len, s_alloc, n_kv, block (int scalars)
//   outputs part_o[B*H*L, n_splits, D], part_m, part_l[B*H*L, n_splits] (float): unnormalised output, running
//           max and softmax denominator of each split, merged by kv_attention_reduce.
//   template T, D, L, G (= H / KV), NSG (SIMD-groups), RPS (rows per SIMD-group), CAUSAL
// Grid (32 * n_splits, NSG, B * KV), threadgroup (32, NSG, 1). One threadgroup = one KV head and one split of
// `block` keys; its NSG SIMD-groups share each 32-key tile of K/V codes in threadgroup memory and own the G * L
// query rows of that KV head (row r -> query head kvh * G + r / L, position kv_len - L + r % L), so each K/V
// byte is read from memory once per split for all G * L rows. Scores: lanes split D, simd_sum per key.
// Online softmax: lane t holds key t's probability; the V update broadcasts it with simd_shuffle.
constexpr int DPL = D / 32;  // head elements per lane: d = i * 32 + lane
constexpr int TILE = 32;     // keys per tile, one per lane when the probabilities are formed
constexpr int ROWS = G * L;
threadgroup int8_t k_tile[TILE * D];
threadgroup int8_t v_tile[TILE * D];

const int lane = int(thread_index_in_simdgroup);
const int sg = int(simdgroup_index_in_threadgroup);
const int tid = int(thread_index_in_threadgroup);
const int split = int(threadgroup_position_in_grid.x);
const int n_splits = int(threadgroups_per_grid.x);
const int b = int(threadgroup_position_in_grid.z) / n_kv;
const int kvh = int(threadgroup_position_in_grid.z) % n_kv;
const int n_heads = n_kv * G;
const int s_begin = split * block;
const int s_end = metal::min(s_begin + block, kv_len);

float qr[RPS][DPL];
float o[RPS][DPL];
float m_run[RPS];
float l_run[RPS];
for (int j = 0; j < RPS; ++j) {
  const int r = sg + NSG * j;
  const int64_t q_row = (int64_t(b) * n_heads + kvh * G + r / L) * L + r % L;
  for (int i = 0; i < DPL; ++i) {
    qr[j][i] = r < ROWS ? static_cast<float>(q[q_row * D + i * 32 + lane]) * qk_scale : 0.0f;
    o[j][i] = 0.0f;
  }
  m_run[j] = -INFINITY;
  l_run[j] = 0.0f;
}

const int64_t head_base = (int64_t(b) * n_kv + kvh) * s_alloc * D;
for (int t0 = s_begin; t0 < s_end; t0 += TILE) {
  threadgroup_barrier(mem_flags::mem_threadgroup);  // every SIMD-group is done with the previous tile
  const int n_keys = metal::min(TILE, s_end - t0);
  for (int idx = tid; idx < TILE * D; idx += 32 * NSG) {
    const bool inside = idx / D < n_keys;
    k_tile[idx] = inside ? k_codes[head_base + int64_t(t0) * D + idx] : int8_t(0);
    v_tile[idx] = inside ? v_codes[head_base + int64_t(t0) * D + idx] : int8_t(0);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int j = 0; j < RPS; ++j) {
    const int r = sg + NSG * j;
    // keys [0, visible) of this tile are visible to row r; uniform across the SIMD-group
    const int visible = CAUSAL ? metal::min(n_keys, kv_len - L + r % L - t0 + 1) : n_keys;
    if (r >= ROWS || visible <= 0) {
      continue;
    }
    float my_score = -INFINITY;  // lane t: score of key t0 + t
    for (int t = 0; t < visible; ++t) {
      float partial = 0.0f;
      for (int i = 0; i < DPL; ++i) {
        partial += qr[j][i] * static_cast<float>(k_tile[t * D + i * 32 + lane]);
      }
      const float score = simd_sum(partial);
      if (lane == t) {
        my_score = score;
      }
    }
    const float m_new = metal::max(m_run[j], simd_max(my_score));  // finite: key t0 is visible
    const float factor = metal::exp(m_run[j] - m_new);
    const float p = metal::exp(my_score - m_new);  // 0 on lanes without a visible key
    l_run[j] = l_run[j] * factor + simd_sum(p);
    for (int i = 0; i < DPL; ++i) {
      o[j][i] *= factor;
    }
    for (int t = 0; t < visible; ++t) {
      const float pt = simd_shuffle(p, ushort(t));
      for (int i = 0; i < DPL; ++i) {
        o[j][i] += pt * static_cast<float>(v_tile[t * D + i * 32 + lane]);
      }
    }
    m_run[j] = m_new;
  }
}

for (int j = 0; j < RPS; ++j) {
  const int r = sg + NSG * j;
  if (r >= ROWS) {
    continue;
  }
  const int64_t out_row = ((int64_t(b) * n_heads + kvh * G + r / L) * L + r % L) * n_splits + split;
  for (int i = 0; i < DPL; ++i) {
    part_o[out_row * D + i * 32 + lane] = o[j][i];
  }
  if (lane == 0) {
    part_m[out_row] = m_run[j];
    part_l[out_row] = l_run[j];
  }
}
