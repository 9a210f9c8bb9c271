// kv_attention pass 2: merge the per-split partials of kv_attention_partial and apply the V scale.
// Body for mx.fast.metal_kernel; the signature is generated from:
//   inputs  part_o[rows, n_splits, D], part_m, part_l[rows, n_splits] (float), v_scale (float), n_splits (int)
//   outputs out[rows, D] (T), rows = B * H * L
//   template T, D
// Grid (D, rows, 1), threadgroup (D, 1, 1): one thread per output element.
const int d = int(thread_position_in_grid.x);
const int64_t row = int64_t(thread_position_in_grid.y);
float m = -INFINITY;
for (int s = 0; s < n_splits; ++s) {
  m = metal::max(m, part_m[row * n_splits + s]);
}
float num = 0.0f;
float den = 0.0f;
for (int s = 0; s < n_splits; ++s) {
  const float ms = part_m[row * n_splits + s];
  if (ms == -INFINITY) {
    continue;  // a split with no visible key
  }
  const float wgt = metal::exp(ms - m);
  num += wgt * part_o[(row * n_splits + s) * D + d];
  den += wgt * part_l[row * n_splits + s];
}
out[row * D + d] = static_cast<T>(den > 0.0f ? num / den * v_scale : 0.0f);
