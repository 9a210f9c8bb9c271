"""What a generation call measured: token counts, timings, memory and, with a draft, speculative acceptance.

Timing definitions (wall clock, seconds, from `time.perf_counter`):
- `prefill_s`: filling the caches with the prompt (all tokens but the last, minus any reused prefix), synced.
- `ttft_s`: from the start of the call (prompt already tokenized) to the first generated token on the host.
- `decode_s`: from the end of prefill to the last generated token on the host; every forward pass that produced
  a generated token is in it (the last prompt token's forward too), so `decode_tps = generated / decode_s`
  compares plain and speculative decoding fairly.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpeculativeStats:
    """Acceptance of the draft's proposals and where the time went (one round = one verify forward of the base)."""

    num_draft_tokens: int  # k requested (the upper bound when adaptive)
    rounds: int = 0
    proposed: int = 0  # draft tokens proposed, all rounds
    accepted: int = 0  # of those, accepted by the base
    emitted: int = 0  # tokens the rounds produced (accepted + one correction or bonus per round)
    proposed_by_position: list[int] = field(default_factory=list)  # [i]: rounds that proposed a token at slot i
    accepted_by_position: list[int] = field(default_factory=list)  # [i]: rounds whose slot-i token was accepted
    draft_s: float | None = None  # decode time split by the shares measured on timed rounds
    verify_s: float | None = None  # (see `speculative.RoundTimer`); None when no round was timed

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens produced per verify forward (1.0 = no gain over plain decoding)."""
        return self.emitted / self.rounds if self.rounds else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.accepted_by_position, self.proposed_by_position)]

    def record_round(self, num_proposed: int, num_accepted: int, num_emitted: int) -> None:
        grow = num_proposed - len(self.proposed_by_position)
        if grow > 0:
            self.proposed_by_position += [0] * grow
            self.accepted_by_position += [0] * grow
        for i in range(num_proposed):
            self.proposed_by_position[i] += 1
            self.accepted_by_position[i] += i < num_accepted
        self.rounds += 1
        self.proposed += num_proposed
        self.accepted += num_accepted
        self.emitted += num_emitted


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # the whole prompt, reused prefix included
    cached_prompt_tokens: int = 0  # prompt tokens whose K/V were reused from an earlier call (not prefilled)
    generated_tokens: int = 0  # generated tokens kept (a stop token counts, text cut at a stop string too)
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    peak_memory_bytes: int = 0  # mx.get_peak_memory() over the call
    finish_reason: str | None = None  # "stop" (stop token or string), "length" (max_tokens), "context"
    seed: int | None = None  # the sampling seed used (pass it again to replay a sampled generation)
    speculative: SpeculativeStats | None = None

    @property
    def prefill_tps(self) -> float:
        prefilled = self.prompt_tokens - self.cached_prompt_tokens - 1  # the last token runs in decode
        return prefilled / self.prefill_s if self.prefill_s > 0 and prefilled > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def summary(self) -> str:
        """A few human-readable lines (the CLI prints them to stderr with --stats)."""
        lines = [
            f"prompt: {self.prompt_tokens} tokens ({self.cached_prompt_tokens} reused), "
            f"prefill {self.prefill_tps:.1f} tok/s, time to first token {self.ttft_s * 1000:.1f} ms",
            f"generated: {self.generated_tokens} tokens, {self.decode_tps:.1f} tok/s "
            f"({self.finish_reason or 'unfinished'})",
            f"peak memory: {self.peak_memory_bytes / 2**30:.3f} GiB",
        ]
        spec = self.speculative
        if spec is not None:
            by_position = " ".join(f"{rate:.2f}" for rate in spec.acceptance_by_position)
            lines += [
                f"draft: k={spec.num_draft_tokens}, accepted {spec.accepted}/{spec.proposed} "
                f"({spec.acceptance_rate:.1%}), {spec.tokens_per_step:.2f} tokens per verify step "
                f"over {spec.rounds} steps",
                f"acceptance by draft position: {by_position}",
            ]
            if spec.draft_s is not None:
                lines.append(f"time: draft {spec.draft_s:.3f} s, verify {spec.verify_s:.3f} s (estimated)")
        return "\n".join(lines)
