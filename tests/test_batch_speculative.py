"""Speculative decoding inside the batch (afm_mlx.batch_speculative) on the demo family with its draft: every row
equals its request run alone with afm_mlx.generate and the same k (greedy and seeded sampling), with mixed k
(0 = plain) in one batch, rows joining and leaving, adapters, guided rows, logprobs, and both caches rolled back
exactly."""

import queue

import jsonschema
import mlx.core as mx
import numpy as np
import pytest

import afm_mlx
from afm_mlx.adapters import load_adapter
from afm_mlx.batch import BatchGenerator, BatchRequest, batch_generate, make_request
from afm_mlx.converters.torch_zip import save_checkpoint
from afm_mlx.engine import Engine
from afm_mlx.errors import AFMError
from adapter_fixtures import toolkit_lora
from test_batch import alone, assert_same_as_alone as same_tokens_as_alone
from test_demo_model import DEMO
from test_guided import PERSON, WEATHER

pytestmark = pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="demo model not built in this checkout")

PROMPTS = ["Tell me about Mr. Darcy.", "Who is Emma?", "Hi",
           "Write a long letter to your sister about the ball at Netherfield, the officers and Mr. Bingley."]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo base with its draft and one strong adapter, `a`."""
    model, tokenizer = afm_mlx.load()
    assert model.draft is not None
    path = tmp_path_factory.mktemp("spec_adapters") / "a.pt"
    save_checkpoint(path, toolkit_lora(model.args, 11, rank=4, gain=40.0).items())
    load_adapter(model, path, name="a")
    return model, tokenizer


def assert_same_as_alone(model, tokenizer, prompts, options, **batch_options):
    """test_batch's check, and each speculating row's rounds as its run alone counted them."""
    results = same_tokens_as_alone(model, tokenizer, prompts, options, **batch_options)
    for prompt, extra, got in zip(prompts, options, results):
        if extra.get("num_draft_tokens"):
            want = alone(model, tokenizer, prompt, **extra).stats.speculative
            spec = got.stats.speculative
            assert (spec.rounds, spec.proposed, spec.accepted) == (want.rounds, want.proposed, want.accepted)
        else:
            assert got.stats.speculative is None
    return results


def test_greedy_rows_with_mixed_k_equal_their_runs_alone(demo):
    prompts = PROMPTS + ["Pride"]
    options = [dict(max_tokens=n, num_draft_tokens=k) for n, k in [(20, 4), (9, 1), (16, 0), (12, 6), (15, 2)]]
    results = assert_same_as_alone(*demo, prompts, options)
    assert sum(r.stats.speculative.accepted for r in results if r.stats.speculative) > 0  # drafts were taken


def test_seeded_sampling_rows_with_mixed_k_equal_their_runs_alone(demo):
    options = [dict(max_tokens=16, temperature=0.8, seed=3, num_draft_tokens=4),
               dict(max_tokens=12, temperature=1.0, top_k=40, seed=7, num_draft_tokens=2),
               dict(max_tokens=10, temperature=0.9, seed=5),
               dict(max_tokens=14, temperature=0.7, top_p=0.9, min_p=0.05, seed=1, repetition_penalty=1.3,
                    num_draft_tokens=3)]
    results = assert_same_as_alone(*demo, PROMPTS, options)
    spec = [r.stats.speculative for r in results if r.stats.speculative]
    assert sum(s.proposed - s.accepted for s in spec) > 0  # some drafts were rejected: the rollback ran


def test_rows_join_and_leave_and_plain_rows_catch_the_draft_up(demo):
    # Two rows at a time: the plain rows decode pipelined without feeding the draft until a speculating row
    # joins; from then on every step is a round and the plain rows' draft rows first catch up on their history.
    prompts = [PROMPTS[3], PROMPTS[1], PROMPTS[0], "Pride", PROMPTS[2]]
    options = [dict(max_tokens=24), dict(max_tokens=6), dict(max_tokens=10, num_draft_tokens=4),
               dict(max_tokens=7, num_draft_tokens=2), dict(max_tokens=9)]
    assert_same_as_alone(*demo, prompts, options, max_batch=2)


def test_plain_rows_never_run_the_draft_until_a_speculating_row_joins(demo):
    # the server holds a draft for the requests that ask for one; the rest must not pay for its prefill
    model, tokenizer = demo
    batch = BatchGenerator(model, tokenizer, max_batch=4, draft=model.draft)
    for prompt in PROMPTS[:3]:
        batch.submit(make_request(tokenizer, prompt, max_tokens=6))
    while batch.busy:
        batch.step()
        assert batch.drafter.lengths == [0] * len(batch.rows)
    batch.submit(make_request(tokenizer, PROMPTS[0], max_tokens=12))
    batch.submit(make_request(tokenizer, PROMPTS[1], max_tokens=8, num_draft_tokens=2))
    batch.step()  # the plain row's draft row caught up in the round
    assert [length > 0 for length in batch.drafter.lengths] == [True, True]


def test_adapters_and_speculation_share_a_batch(demo):
    options = [dict(max_tokens=10, adapter=a, num_draft_tokens=k) for a, k in [("a", 3), (None, 3), ("a", 0)]]
    results = assert_same_as_alone(*demo, PROMPTS[:3], options)
    assert results[0].tokens != alone(*demo, PROMPTS[0], max_tokens=10, adapter=None).tokens


def test_guided_rows_speculate_inside_their_grammar_as_alone(demo):
    # JSON, regex and tool-call rows with drafts next to free and plain rows; the matcher of each guided row is
    # rolled back to its emitted tokens after every round (a matcher out of step would refuse the next token)
    prompts = ["Who is Emma?", "Name and age?", "Weather in Bath?", "Tell me about Bath.", "Who is Mr. Knightley?"]
    options = [dict(schema=PERSON, num_draft_tokens=4), dict(regex=r"[A-Z][a-z]+ [0-9]{2}", num_draft_tokens=2),
               dict(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=5,
                    num_draft_tokens=3),
               dict(temperature=0.7, seed=2, num_draft_tokens=2), dict(schema=PERSON, temperature=1.0, seed=1)]
    options = [dict(o, max_tokens=96) for o in options]
    results = assert_same_as_alone(*demo, prompts, options)
    for prompt, extra, got in zip(prompts, options, results):
        want = alone(*demo, prompt, **extra)
        assert (got.parsed, got.tool_calls) == (want.parsed, want.tool_calls)
    assert results[0].finish_reason == "stop"
    jsonschema.validate(results[0].parsed, PERSON)
    assert results[2].tool_calls[0]["name"] == "get_weather"


def test_both_caches_hold_each_rows_history_after_every_round(demo):
    model, tokenizer = demo
    batch = BatchGenerator(model, tokenizer, draft=model.draft)
    for prompt, k in zip(PROMPTS, (4, 2, 0, 5)):
        batch.submit(make_request(tokenizer, prompt, max_tokens=30, num_draft_tokens=k, temperature=0.9, seed=k))
    rounds = 0
    while batch.busy:
        batch.step()
        if batch.in_flight is not None:  # only the plain row is left: pipelined steps, one token ahead
            continue
        live = [(b, row) for b, row in enumerate(batch.rows) if not row.finished]
        for b, row in live:
            n = len(row.history)
            assert batch.cache[0].lengths[b] == n - 1  # all but the newest token, which the next round feeds
            assert batch.drafter.lengths[b] in (n - 1, n - 2)  # n - 2 after a full acceptance: d_K is pending
            caches = model.make_cache()  # the kept K/V are those of a fresh prefill of the history
            model.prefill(mx.array([row.history[:-1]]), caches)
            assert mx.array_equal(batch.cache[0].keys[b, :, : n - 1], caches[0].state[0][0])
        rounds += bool(live)
    assert rounds > 3


def test_logprobs_of_speculative_rows_are_those_of_plain_rows(demo):
    model, tokenizer = demo
    plain, spec = batch_generate(model, tokenizer, [PROMPTS[0]] * 2, max_tokens=8, top_logprobs=2,
                                 options=[{}, dict(num_draft_tokens=4)])
    assert plain.tokens == spec.tokens
    plain_rows = _logprobs(model, tokenizer, PROMPTS[0], 0)
    spec_rows = _logprobs(model, tokenizer, PROMPTS[0], 4)
    assert [r.token for r in spec_rows] == [r.token for r in plain_rows] == plain.tokens
    np.testing.assert_allclose([r.logprob for r in spec_rows], [r.logprob for r in plain_rows], atol=1e-4)
    assert [[t for t, _ in r.top] for r in spec_rows] == [[t for t, _ in r.top] for r in plain_rows]


def _logprobs(model, tokenizer, prompt, k):
    batch = BatchGenerator(model, tokenizer, draft=model.draft)
    batch.submit(make_request(tokenizer, prompt, max_tokens=8, top_logprobs=2, num_draft_tokens=k))
    rows = []
    while batch.busy:
        rows += [lp for _, piece in batch.step() for lp in piece.logprobs]
    return rows


def test_speculative_requests_are_checked(demo):
    model, tokenizer = demo
    without_draft = BatchGenerator(model, tokenizer)
    with pytest.raises(AFMError, match="needs a draft model"):
        without_draft.submit(BatchRequest([1, 2, 3], num_draft_tokens=2))
    batch = BatchGenerator(model, tokenizer, draft=model.draft)
    with pytest.raises(AFMError, match="at most 32"):
        batch.submit(BatchRequest([1, 2, 3], num_draft_tokens=33))
    with pytest.raises(AFMError, match="integer >= 1"):
        batch.submit(BatchRequest([1, 2, 3], num_draft_tokens=-1))
    assert not batch.busy


def test_a_failed_step_fails_its_requests_and_the_engine_keeps_its_draft(demo):
    model, tokenizer = demo
    engine = Engine(model, tokenizer, max_batch=2, draft=model.draft).start()
    got: queue.Queue = queue.Queue()

    def run(**options):
        engine.submit(make_request(tokenizer, PROMPTS[1], max_tokens=6, **options), got.put)
        while not isinstance(item := got.get(timeout=60), Exception) and item.finish_reason is None:
            pass
        return item

    def broken_step():
        raise RuntimeError("boom")

    try:
        engine.batch.step = broken_step
        assert str(run()) == "generation failed: RuntimeError"
        spec = run(num_draft_tokens=2).stats.speculative  # the batch made after the failure has the draft
        assert spec is not None and spec.rounds > 0
    finally:
        engine.stop()

