"""Continuous batching (afm_mlx.batch) on the demo family: every row equals the same request run alone with
afm_mlx.generate (greedy, and sampled with a seed), with mixed prompt lengths, budgets, stop strings, adapters,
rows joining and leaving, and prompt prefixes reused across requests."""

import mlx.core as mx
import numpy as np
import pytest

import afm_mlx
from afm_mlx.adapters import load_adapter
import afm_mlx.batch
from afm_mlx.batch import (PREFILL_PADDING, BatchGenerator, BatchKVCache, BatchRequest, batch_generate, make_request,
                         padding_groups)
from afm_mlx.cache import KVCache
from afm_mlx.converters.torch_zip import save_checkpoint
from afm_mlx.errors import AFMError
from afm_mlx.prefix_cache import PrefixCache
from adapter_fixtures import toolkit_lora
from test_demo_model import DEMO

pytestmark = pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="demo model not built in this checkout")

PROMPTS = ["Tell me about Mr. Darcy.", "Who is Emma?", "Hi",
           "Write a long letter to your sister about the ball at Netherfield, the officers and Mr. Bingley."]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo base (no draft) with two strong adapters, `a` and `b`."""
    model, tokenizer = afm_mlx.load(draft=False)
    root = tmp_path_factory.mktemp("batch_adapters")
    for name, seed in [("a", 11), ("b", 12)]:
        save_checkpoint(root / f"{name}.pt", toolkit_lora(model.args, seed, rank=4, gain=40.0).items())
        load_adapter(model, root / f"{name}.pt", name=name)
    return model, tokenizer


def alone(model, tokenizer, prompt, num_draft_tokens=0, **options):
    """The request run alone with generate: with the model's draft at k = num_draft_tokens, else without one."""
    if num_draft_tokens:
        return afm_mlx.generate(model, tokenizer, prompt, num_draft_tokens=num_draft_tokens, **options)
    return afm_mlx.generate(model, tokenizer, prompt, draft_model=False, **options)


def assert_same_as_alone(model, tokenizer, prompts, options, **batch_options):
    results = batch_generate(model, tokenizer, prompts, options=options, **batch_options)
    for prompt, extra, got in zip(prompts, options, results):
        want = alone(model, tokenizer, prompt, **extra)
        assert got.tokens == want.tokens, (prompt, extra)
        assert (got.text, got.finish_reason) == (want.text, want.finish_reason)
    return results


def test_greedy_rows_equal_their_runs_alone(demo):
    options = [dict(max_tokens=n) for n in (20, 7, 16, 12)]
    results = assert_same_as_alone(*demo, PROMPTS, options)
    assert [r.stats.generated_tokens for r in results] == [20, 7, 16, 12]


def test_padding_groups_cover_every_row_and_bound_the_padding():
    assert padding_groups([40, 3, 38, 41, 0, 3]) == [[3, 0, 2], [1, 5], [4]]
    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = rng.integers(0, 300, size=rng.integers(1, 17)).tolist()
        groups = padding_groups(lengths)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            longest = max(lengths[i] for i in g)
            assert lengths[g[0]] == longest and len(g) * longest <= (1 + PREFILL_PADDING) * sum(lengths[i] for i in g)


def test_joining_rows_of_different_lengths_prefill_apart(demo, monkeypatch):
    # the 4-row admission splits by length (the long prompt alone): no forward pads more than PREFILL_PADDING
    calls = []
    prefill = afm_mlx.batch.prefill_rows

    def recorded(model, caches, news, chunk_size):
        calls.append([len(ids) for ids in news])
        prefill(model, caches, news, chunk_size)

    monkeypatch.setattr(afm_mlx.batch, "prefill_rows", recorded)
    assert_same_as_alone(*demo, PROMPTS, [dict(max_tokens=6)] * 4)
    assert sorted(n for call in calls for n in call) == sorted(len(demo[1].encode_prompt(p)) - 1 for p in PROMPTS)
    assert len(calls) >= 2
    assert all(len(call) * max(call) <= (1 + PREFILL_PADDING) * sum(call) for call in calls)


def test_seeded_sampling_rows_equal_their_runs_alone(demo):
    options = [dict(max_tokens=16, temperature=0.8, seed=3), dict(max_tokens=12, temperature=1.0, top_k=40, seed=7),
               dict(max_tokens=10), dict(max_tokens=14, temperature=0.7, top_p=0.9, min_p=0.05, seed=1,
                                         repetition_penalty=1.3)]
    assert_same_as_alone(*demo, PROMPTS, options)


def test_rows_join_and_leave_between_steps(demo):
    # 6 requests through 2 rows: every row that leaves is replaced while the other keeps decoding
    prompts = PROMPTS + ["Pride", "What did Elizabeth say to Lady Catherine?"]
    options = [dict(max_tokens=n) for n in (9, 3, 14, 5, 8, 4)]
    assert_same_as_alone(*demo, prompts, options, max_batch=2)


def test_mixed_adapters_share_a_batch(demo):
    model, tokenizer = demo
    prompts = PROMPTS * 2
    options = [dict(max_tokens=10, adapter=a) for a in ("a", "b", None, "a", "b", None, "b", "a")]
    results = assert_same_as_alone(model, tokenizer, prompts, options)
    by_adapter = {o["adapter"]: r.tokens for o, r in zip(options[:3], results)}
    plain = alone(model, tokenizer, PROMPTS[0], max_tokens=10, adapter=None).tokens
    assert results[0].tokens != plain and results[3].tokens != results[0].tokens  # the adapters change the text
    assert len(set(map(tuple, by_adapter.values()))) == 3


def test_stop_strings_and_tokens_end_rows_alone(demo):
    model, tokenizer = demo
    text = alone(model, tokenizer, PROMPTS[0], max_tokens=20).text
    stop = text[8:12]
    options = [dict(max_tokens=20, stop=[stop]), dict(max_tokens=40), dict(max_tokens=20, stop="zzz")]
    results = assert_same_as_alone(model, tokenizer, PROMPTS[:3], options)
    assert results[0].finish_reason == "stop" and stop not in results[0].text


def test_prefix_cache_reuses_a_shared_prompt_prefix(demo):
    model, tokenizer = demo
    system = " ".join(["You are Mr. Collins, a clergyman of great pomp and little sense."] * 3)
    cache = PrefixCache(model)
    batch = BatchGenerator(model, tokenizer, prefix_cache=cache)
    requests = [make_request(tokenizer, p, system=system, max_tokens=8) for p in PROMPTS[:3]]
    for request in requests:  # one at a time: each later prompt finds the earlier ones' prefix
        uid = batch.submit(request)
        pieces = []
        while batch.busy:
            pieces += [p for u, p in batch.step() if u == uid]
        want = alone(model, tokenizer, request.ids, max_tokens=8)
        assert [t for p in pieces for t in p.tokens] == want.tokens
    assert cache.hits == 2 and pieces[-1].stats.cached_prompt_tokens > len(tokenizer.encode(system)) - 2
    assert 0 < cache.nbytes <= cache.max_bytes


def test_prefix_cache_is_bounded_and_keyed_by_adapter(demo):
    model, tokenizer = demo
    ids = make_request(tokenizer, PROMPTS[3]).ids
    caches = model.make_cache()
    model.prefill(mx.array([ids]), caches)
    one = sum(c.nbytes for c in caches)
    cache = PrefixCache(model, max_bytes=one * 3 // 2)
    cache.store(ids, None, [c.state for c in caches])
    assert cache.lookup(ids, "a")[1] == 0 and cache.lookup(ids[:5] + [1], None)[1] == 5
    cache.store(ids[:3], None, [c.state for c in caches])  # covered by the stored prompt: nothing added
    assert len(cache.entries) == 1
    cache.store(ids, "a", [c.state for c in caches])  # over the bound: the least recently used goes
    assert list(e.adapter for e in cache.entries.values()) == ["a"] and cache.nbytes == one


def test_cancel_frees_the_row_and_waiting_rows_take_it(demo):
    model, tokenizer = demo
    batch = BatchGenerator(model, tokenizer, max_batch=1)
    first = batch.submit(make_request(tokenizer, PROMPTS[0], max_tokens=50))
    second = batch.submit(make_request(tokenizer, PROMPTS[1], max_tokens=5))
    batch.step(), batch.step()
    closing = batch.cancel(first)
    assert closing[-1].finish_reason == "cancelled" and batch.cancel(first) == []
    tokens = []
    while batch.busy:
        tokens += [t for uid, p in batch.step() if uid == second for t in p.tokens]
    assert tokens == alone(model, tokenizer, PROMPTS[1], max_tokens=5).tokens
    assert batch.rows == [] and batch.cache[0].keys is None


def test_logprobs_are_the_log_softmax_of_the_logits(demo):
    model, tokenizer = demo
    request = make_request(tokenizer, PROMPTS[1], max_tokens=3, top_logprobs=2)
    batch = BatchGenerator(model, tokenizer)
    batch.submit(request)
    pieces = []
    while batch.busy:
        pieces += [p for _, p in batch.step()]
    first = pieces[0].logprobs[0]
    logits = model(mx.array([request.ids]), num_logits=1)[0, -1]
    want = np.array(logits - mx.logsumexp(logits))
    assert first.token == int(want.argmax()) == first.top[0][0]
    np.testing.assert_allclose([first.logprob, first.top[1][1]], [want.max(), np.sort(want)[-2]], atol=1e-4)


def test_requests_are_checked_when_submitted(demo):
    model, tokenizer = demo
    batch = BatchGenerator(model, tokenizer)
    with pytest.raises(AFMError, match="no adapter named 'nope'"):
        batch.submit(BatchRequest([1, 2, 3], adapter="nope"))
    with pytest.raises(AFMError, match="context limit"):
        batch.submit(BatchRequest([1] * 10, max_context=10))
    with pytest.raises(AFMError, match="inside the vocabulary"):
        batch.submit(BatchRequest([tokenizer.vocab_size]))
    with pytest.raises(AFMError, match="unknown option"):
        make_request(tokenizer, "hi", temprature=1.0)
    assert not batch.busy


def test_batch_cache_rows_match_their_own_caches():
    """Rows of different lengths added, appended to at their own offsets, trimmed and dropped."""
    rng = np.random.default_rng(0)
    singles = []
    for length in (3, 0, 7):
        c = KVCache()
        if length:
            c.append(*(mx.array(rng.integers(-127, 128, (1, 2, length, 4)), dtype=mx.int8) for _ in range(2)))
        singles.append(c)
    batch = BatchKVCache()
    batch.add_rows(singles[:2], mx.zeros((1, 2, 1, 4), dtype=mx.int8))
    batch.add_rows(singles[2:], mx.zeros((1, 2, 1, 4), dtype=mx.int8))
    new = mx.array(rng.integers(-127, 128, (3, 2, 2, 4)), dtype=mx.int8)
    batch.append(new, new)
    for b, c in enumerate(singles):
        c.append(new[b:b + 1], new[b:b + 1])
    batch.trim_rows([1, 0, 2])
    batch.keep_rows([2, 0])
    assert batch.lengths == [7, 4] and batch.offset.tolist() == [7, 4]
    for b, (c, trim) in zip((0, 1), [(singles[2], 2), (singles[0], 1)]):
        c.trim(trim)
        assert mx.array_equal(batch.keys[b:b + 1, :, :c.offset], c.state[0])


def test_row_adapters_follow_loads_and_cost_nothing_without_adapters(demo, tmp_path):
    from afm_mlx.adapters import LoRALinear, unload_adapter, using_row_adapters

    model, tokenizer = demo
    with using_row_adapters(model, [None, None]):  # no adapter in the batch: the bare projections, no wrapper
        assert not any(isinstance(m, LoRALinear) for _, m in model.named_modules())
    batch_generate(model, tokenizer, PROMPTS[:2], options=[dict(max_tokens=2, adapter=a) for a in "ab"])
    save_checkpoint(tmp_path / "c.pt", toolkit_lora(model.args, 13, rank=8, gain=40.0).items())
    load_adapter(model, tmp_path / "c.pt", name="c")  # after the gathered stacks were built
    try:
        options = [dict(max_tokens=6, adapter=a) for a in ("c", "a", None)]
        results = assert_same_as_alone(model, tokenizer, PROMPTS[:3], options)
        assert results[0].tokens != alone(model, tokenizer, PROMPTS[0], max_tokens=6).tokens
    finally:
        unload_adapter(model, "c")
