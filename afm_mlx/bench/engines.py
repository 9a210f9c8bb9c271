"""The two engines, each generation timed from outside: afm-mlx (`stream_generate`) and mlx-lm's `afm7` on the
same weight arrays."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import AFMError
from ..model import Model


@dataclass
class Run:
    """One timed generation. decode_s runs from the first generated token to the last one, on the host."""

    prompt_tokens: int
    tokens: list[int]
    ttft_s: float
    decode_s: float
    peak_memory: int
    proposed_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)
    rounds: int = 0
    draft_s: float | None = None
    verify_s: float | None = None

    @property
    def decode_tps(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s if self.decode_s > 0 and len(self.tokens) > 1 else 0.0


def timed(token_batches: Iterator[list[int]]) -> tuple[list[int], float, float]:
    """(tokens, ttft_s, decode_s) of a generator of token lists (empty lists: no token, e.g. the final stats).

    The generator is exhausted; the clock of the last token stops when that token arrives.
    """
    tokens: list[int] = []
    start = time.perf_counter()
    first = last = start
    for batch in token_batches:
        if not batch:
            continue
        if not tokens:
            first = time.perf_counter()
        tokens += batch
        last = time.perf_counter()
    return tokens, first - start, last - first


class _NoStopTokenizer:
    """What afm_mlx.stream_generate needs from a tokenizer, without stop ids or text: runs of fixed length."""

    stop_ids = frozenset()

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def detokenizer(self):
        return self

    def add(self, token: int) -> str:
        return ""

    def finalize(self) -> str:
        return ""


class AfmEngine:
    """afm-mlx: `afm_mlx.stream_generate` on token ids (int8 KV, explicit reuse/head skipping, rejection sampling)."""

    name = "afm-mlx"

    def __init__(self, model: Model, draft: Model | None, vocab_size: int):
        self.model, self.draft, self.tokenizer = model, draft, _NoStopTokenizer(vocab_size)

    def run(self, prompt: list[int], max_tokens: int, temperature: float, k: int | None, seed: int,
            tokenizer=None, **options) -> Run:
        """One timed generation; tokenizer (default: no stop ids, the whole budget) and options (e.g. schema=)
        go to stream_generate."""
        from ..generation import stream_generate

        stats: list = []

        def batches():
            for response in stream_generate(self.model, tokenizer or self.tokenizer, prompt, max_tokens=max_tokens,
                                            temperature=temperature, seed=seed, num_draft_tokens=k or 1,
                                            draft_model=self.draft if k else False, max_context=1 << 30, **options):
                if response.stats is not None:
                    stats.append(response.stats)
                yield response.tokens

        mx.reset_peak_memory()
        tokens, ttft, decode = timed(batches())
        run = Run(len(prompt), tokens, ttft, decode, mx.get_peak_memory())
        spec = stats[-1].speculative if stats else None
        if spec is not None:
            run.proposed_by_position, run.accepted_by_position = spec.proposed_by_position, spec.accepted_by_position
            run.rounds, run.draft_s, run.verify_s = spec.rounds, spec.draft_s, spec.verify_s
        return run

    def kv_bytes_per_token(self, prompt: list[int], model: Model | None = None) -> float:
        model = model or self.model
        cache = model.make_cache()
        model.prefill(mx.array([prompt]), cache)
        return sum(c.nbytes for c in cache) / cache[0].offset


# ---- mlx-lm's afm7 on the same weights


@contextmanager
def mlx_lm_patches() -> Iterator[None]:
    """The harness-only patches mlx-lm 0.32's afm7 needs (undone on exit):

    - FusedLinear.to_quantized(group_size, bits) lacks `mode`, which nn.quantize passes: accept it (affine only);
    - fake_8bit_quant: a layer whose quant scale is None (a draft without kv-quant) is not quantised.
    """
    from mlx_lm.models import afm7

    original_to_quantized, original_fake_quant = afm7.FusedLinear.to_quantized, afm7.fake_8bit_quant

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **kwargs):
        if mode != "affine":
            raise AFMError(f"mlx-lm's afm7 FusedLinear supports affine quantization only, not {mode}")
        return original_to_quantized(self, group_size, bits)

    def fake_quant(x, scale):
        return x if scale is None else original_fake_quant(x, scale)

    afm7.FusedLinear.to_quantized, afm7.fake_8bit_quant = to_quantized, fake_quant
    try:
        yield
    finally:
        afm7.FusedLinear.to_quantized, afm7.fake_8bit_quant = original_to_quantized, original_fake_quant


def mlx_lm_mirror(model: Model) -> nn.Module:
    """mlx_lm.models.afm7.Model holding the very same parameter arrays as `model` (nothing copied)."""
    from mlx_lm.models import afm7

    theirs = afm7.Model(afm7.ModelArgs.from_dict(model.args.to_dict()))
    ours = dict(model.named_modules())

    def same_quantization(path: str, module: nn.Module):
        mine = ours.get(path)
        if isinstance(mine, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            return {"group_size": mine.group_size, "bits": mine.bits, "mode": "affine"}
        return False

    with mlx_lm_patches():
        nn.quantize(theirs, class_predicate=same_quantization)
    if not model.args.kv_quant:
        for layer in theirs.model.layers:
            for name in ("quant_key_scale", "quant_value_scale"):
                layer.self_attn.pop(name)
                setattr(layer.self_attn, name, None)
    theirs.load_weights(tree_flatten(model.parameters()), strict=True)
    theirs.eval()
    return theirs


class MlxLmEngine:
    """mlx-lm 0.32's generate_step / speculative_generate_step on mlx_lm.models.afm7 (exact-match acceptance)."""

    name = "mlx-lm"

    def __init__(self, model: Model, draft: Model | None):
        self.model = mlx_lm_mirror(model)
        self.draft = mlx_lm_mirror(draft) if draft is not None else None

    def run(self, prompt: list[int], max_tokens: int, temperature: float, k: int | None, seed: int) -> Run:
        from mlx_lm.generate import generate_step, speculative_generate_step
        from mlx_lm.sample_utils import make_sampler

        mx.random.seed(seed)
        ids, sampler, flags = mx.array(prompt, dtype=mx.uint32), make_sampler(temp=temperature), []
        with mlx_lm_patches():
            if k:
                # prompt_cache=None: given a cache, mlx-lm splits it at len(model.layers) (56), not 35 (bug 2).
                steps = speculative_generate_step(ids, self.model, self.draft, num_draft_tokens=k,
                                                  max_tokens=max_tokens, sampler=sampler, prompt_cache=None)
            else:
                steps = generate_step(ids, self.model, max_tokens=max_tokens, sampler=sampler)

            def batches():
                for step in steps:
                    flags.append(bool(step[2]) if k else False)
                    yield [int(step[0])]

            mx.reset_peak_memory()
            tokens, ttft, decode = timed(batches())
            peak = mx.get_peak_memory()
        run = Run(len(prompt), tokens, ttft, decode, peak)
        if k:
            run.proposed_by_position, run.accepted_by_position, run.rounds = rounds_from_flags(flags, k, max_tokens)
        return run

    def kv_bytes_per_token(self, prompt: list[int], model: nn.Module | None = None) -> float:
        from mlx_lm.models.cache import make_prompt_cache

        model = model or self.model
        cache = make_prompt_cache(model)
        with mlx_lm_patches():
            mx.eval(model(mx.array([prompt]), cache=cache))
        return sum(a.nbytes for c in cache for a in c.keys_and_values()) / cache[0].offset


def rounds_from_flags(from_draft: list[bool], k: int, max_tokens: int) -> tuple[list[int], list[int], int]:
    """(proposed, accepted) per draft position and the round count, from mlx-lm's per-token `from_draft` flags.

    Every token mlx-lm's speculative loop yields belongs to a round: its accepted drafts (True), then the target's
    token (False). A round proposes min(k, tokens still allowed); the last round may end at max_tokens before its
    target token.
    """
    proposed, accepted = [0] * k, [0] * k
    rounds = emitted = run = 0

    def close_round():
        nonlocal rounds
        for i in range(min(k, max_tokens - emitted)):
            proposed[i] += 1
            accepted[i] += i < run
        rounds += 1

    for flag in from_draft:
        if flag:
            run += 1
            continue
        close_round()
        emitted, run = emitted + run + 1, 0
    if run:
        close_round()
    return proposed, accepted, rounds


