// kv_attention pass 2 for CUDA: merge the per-split partials and apply the V scale (see kv_attention_reduce.metal).
//   inputs  part_o[rows, n_splits, D], part_m, part_l[rows, n_splits] (float), v_scale (float), n_splits (int)
//   outputs out[rows, D] (T); template T, D. Grid (D, rows, 1) threads, block (D, 1, 1).
const int d = threadIdx.x;
const int64_t row = blockIdx.y;
const int NS = n_splits[0];
float m = afm_neg_inf();
for (int s = 0; s < NS; ++s) {
  m = fmaxf(m, part_m[row * NS + s]);
}
float num = 0.0f;
float den = 0.0f;
for (int s = 0; s < NS; ++s) {
  const float ms = part_m[row * NS + s];
  if (ms == afm_neg_inf()) {
    continue;
  }
  const float wgt = expf(ms - m);
  num += wgt * part_o[(row * NS + s) * D + d];
  den += wgt * part_l[row * NS + s];
}
out[row * D + d] = afm_from_float<T>(den > 0.0f ? num / den * v_scale[0] : 0.0f);
