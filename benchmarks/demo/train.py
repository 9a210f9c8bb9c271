"""Training loops for the demo family: base pre-training, 2-bit QAT, draft distillation, and evaluation.

Precision follows the toolkit's default `bf16-mixed` where the CPU computes bfloat16 natively: float32 parameters
and optimizer state, bf16 autocast for the matmuls (RMSNorm and the KV fake-quant compute in float32). On a CPU
without native bf16 (AVX512-BF16 / AMX) torch emulates it ~14x slower than float32 (measured on an AVX2 EPYC), so
build_demo's `--precision auto` trains in float32 there and says so; `MIXED_BF16` holds the choice. Evaluation runs in float32, eval mode (so the
KV observers are frozen and the stored ranges are used, as at inference).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from afm_torch import AFMText


MIXED_BF16 = True  # bf16 autocast for the matmuls (the toolkit's bf16-mixed); False: float32 throughout


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 matmuls natively (otherwise torch emulates them, far slower)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16) if MIXED_BF16 else contextlib.nullcontext()


@dataclass
class Schedule:
    steps: int
    lr: float
    warmup: int
    final_lr_fraction: float = 0.1
    batch_size: int = 16
    seq_len: int = 256
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return self.lr * (self.final_lr_fraction + (1 - self.final_lr_fraction) * cosine)


class WindowSampler:
    """Random training windows: `[EOS] + text[i : i+L-1]` -> targets `text[i : i+L]` (every sample starts with
    EOS, as the toolkit's prompts do). Documents are chosen in proportion to their length."""

    def __init__(self, docs: list[np.ndarray], eos_id: int, seed: int):
        self.docs = [d for d in docs if len(d) > 1]
        self.weights = np.array([len(d) for d in self.docs], dtype=np.float64)
        self.weights /= self.weights.sum()
        self.eos_id = eos_id
        self.rng = np.random.default_rng(seed)

    def batch(self, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = np.empty((batch_size, seq_len), dtype=np.int64)
        targets = np.empty((batch_size, seq_len), dtype=np.int64)
        for b in range(batch_size):
            doc = self.docs[self.rng.choice(len(self.docs), p=self.weights)]
            start = int(self.rng.integers(0, max(1, len(doc) - seq_len)))
            text = doc[start:start + seq_len]
            if len(text) < seq_len:  # short document: pad by repeating EOS (not expected for novels)
                text = np.concatenate([text, np.full(seq_len - len(text), self.eos_id)])
            inputs[b, 0], inputs[b, 1:] = self.eos_id, text[:-1]
            targets[b] = text
        return torch.from_numpy(inputs), torch.from_numpy(targets)


class MixedSampler:
    """Batches whose rows are corpus windows, except a `chat_fraction` of rows that are whole chat samples
    (toolkit V6 template, `[EOS] + ids[1:]`), padded with PAD and ignored (-100) in the targets."""

    def __init__(self, windows: WindowSampler, chat_samples: list[np.ndarray], chat_fraction: float, pad_id: int,
                 seed: int):
        self.windows, self.chat, self.fraction, self.pad_id = windows, chat_samples, chat_fraction, pad_id
        self.rng = np.random.default_rng(seed)

    def batch(self, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.windows.batch(batch_size, seq_len)
        n_chat = int(round(batch_size * self.fraction)) if self.chat else 0
        for row in range(batch_size - n_chat, batch_size):
            ids = self.chat[self.rng.integers(len(self.chat))][:seq_len + 1]
            n = len(ids) - 1
            inputs[row], targets[row] = self.pad_id, -100
            inputs[row, :n] = torch.from_numpy(ids[:-1].astype(np.int64))
            targets[row, :n] = torch.from_numpy(ids[1:].astype(np.int64))
        return inputs, targets


def eval_windows(docs: list[np.ndarray], eos_id: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping held-out windows, each `[EOS] + text` (the same form as training)."""
    inputs, targets = [], []
    for doc in docs:
        for start in range(0, len(doc) - seq_len + 1, seq_len):
            text = doc[start:start + seq_len]
            inputs.append(np.concatenate([[eos_id], text[:-1]]))
            targets.append(text)
    return torch.from_numpy(np.stack(inputs)).long(), torch.from_numpy(np.stack(targets)).long()


def make_optimizer(model: AFMText, sched: Schedule) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": sched.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=sched.lr, betas=(0.9, 0.95), eps=1e-8)


def run_steps(model: AFMText, sched: Schedule, loss_fn: Callable[[int], torch.Tensor],
              progress: Callable[[int, float], None]) -> list[float]:
    """Generic loop: `loss_fn(step)` builds the loss (under bf16 autocast); returns the per-step losses."""
    opt = make_optimizer(model, sched)
    model.train()
    losses = []
    for step in range(sched.steps):
        for group in opt.param_groups:
            group["lr"] = sched.lr_at(step)
        with autocast():
            loss = loss_fn(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], sched.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress(step, losses[-1])
    model.eval()
    return losses


def lm_loss(model: AFMText, sampler: WindowSampler, sched: Schedule) -> Callable[[int], torch.Tensor]:
    def loss_fn(step: int) -> torch.Tensor:
        inputs, targets = sampler.batch(sched.batch_size, sched.seq_len)
        logits = model(inputs)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    return loss_fn


def inverse_kl(target_logits: torch.Tensor, draft_logits: torch.Tensor) -> torch.Tensor:
    """The toolkit's draft loss: CE(target_logits, draft_probs) - CE(draft_logits, draft_probs) = KL(draft||target),
    averaged over the positions given (the caller drops padding)."""
    draft_logp = F.log_softmax(draft_logits.float(), dim=-1)
    target_logp = F.log_softmax(target_logits.float(), dim=-1)
    draft_p = draft_logp.exp()
    ce_target = -(draft_p * target_logp).sum(-1)
    ce_draft = -(draft_p * draft_logp).sum(-1)
    return (ce_target - ce_draft).mean()


def distill_loss(draft: AFMText, target: AFMText,
                 batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> Callable[[int], torch.Tensor]:
    """`batches(step)` -> (inputs, mask of positions that count: not padding)."""
    def loss_fn(step: int) -> torch.Tensor:
        inputs, mask = batches(step)
        with torch.no_grad():
            target_logits = target(inputs)
        return inverse_kl(target_logits[mask], draft(inputs)[mask])
    return loss_fn


@torch.no_grad()
def perplexity(model: AFMText, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 16) -> float:
    """exp(mean token cross-entropy) over the held-out windows, in float32."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(inputs), batch_size):
        logits = model(inputs[i:i + batch_size])
        total += float(F.cross_entropy(logits.flatten(0, 1), targets[i:i + batch_size].flatten(), reduction="sum"))
        count += targets[i:i + batch_size].numel()
    return math.exp(total / count)


@torch.no_grad()
def top1_agreement(draft: AFMText, target: AFMText, inputs: torch.Tensor, batch_size: int = 16) -> float:
    """Teacher-forced fraction of positions where the draft's argmax equals the target's (float32)."""
    agree, count = 0, 0
    for i in range(0, len(inputs), batch_size):
        x = inputs[i:i + batch_size]
        agree += int((draft(x).argmax(-1) == target(x).argmax(-1)).sum())
        count += x.numel()
    return agree / count


@torch.no_grad()
def sample_continuations(model: AFMText, prompts: torch.Tensor, new_tokens: int, temperature: float,
                         generator: torch.Generator) -> torch.Tensor:
    """Autoregressive continuation without a cache (the model is small): prompts [B, P] -> [B, P + new]."""
    seq = prompts
    for _ in range(new_tokens):
        with autocast():
            logits = model(seq)[:, -1].float()
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            nxt = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=generator)
        seq = torch.cat([seq, nxt], dim=1)
    return seq
