"""`afm-mlx serve` under concurrent clients, against the bare batched forward it is built on, on the demo family.

    python benchmarks/serve_bench.py                      # 1, 4, 16, 32 clients; results/serve/serve.{json,md}
    python benchmarks/serve_bench.py --clients 1,4 --trials 1 --max-tokens 32

Per trial and client count C (interleaved, so slow phases of a shared machine hit every setting alike):
- bare decode: the batched forward alone at batch size C (afm_mlx.batch.BatchKVCache, greedy argmax, pipelined
  as the engine decodes), prompts prefilled untimed: the decode ceiling for a server at C rows;
- bare, same work: the server's token work on the bare forward, timed whole: per round the C clients' prompts
  prefilled together (afm_mlx.batch.padding_groups, as the engine admits rows), then --max-tokens steps at
  batch C. A server must prefill every prompt it is sent; this is the ceiling for that workload, so
  serve / bare-same-work is what scheduling, HTTP, detokenizing and streaming leave (their cost: 1 - ratio);
- server: C concurrent streaming clients (httpx, raw SSE) against a live `afm-mlx serve` on 127.0.0.1, each
  sending --requests completions of --max-tokens tokens in turn: aggregate tokens/s over the whole run, time to
  first token and inter-token latency (p50 / p99 over all requests). It and mlx_lm.server run without prompt
  caches (--prefix-cache-mb 0, --prompt-cache-size 0), so they prefill every prompt as the other columns do;
- engine: the server's workload (C clients, --requests each in turn, the same prompts) through the batch engine
  in this process, no HTTP: prompts prefilled as they join, so server / engine isolates what HTTP, SSE and the
  engine thread cost.
Adapters: the batch engine (BatchGenerator) with --adapter-rows rows, none vs 4 different random rank-32 adapters
spread over the rows (one per row, round robin), tokens/s per trial.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

import afm_mlx
from afm_mlx.adapters import add_adapter
from afm_mlx.batch import BatchGenerator, BatchKVCache, kv_template, make_request, padding_groups, prefill_into
from afm_mlx.generation import PREFILL_CHUNK_SIZE
from afm_mlx.bench.suite import random_adapter

ROOT = Path(__file__).resolve().parent
CLIENTS_WARM_UP = (1, 4, 16, 32)
PROMPTS = [p[:300] for novel in json.loads((ROOT / "prompts_held_out.json").read_text())["held_out"].values()
           for p in novel]


# ---- the bare batched forward


def bare_tps(model, tokenizer, rows: int, steps: int) -> float:
    """Greedy decode tokens/s of the batched forward alone: `rows` prompts prefilled (untimed), then `steps`
    pipelined steps."""
    caches, last = prefilled(model, [tokenizer.encode_prompt(PROMPTS[i % len(PROMPTS)], raw=True)
                                     for i in range(rows)])
    y = greedy_step(model, caches, mx.array(last))
    mx.eval(y)
    start = time.perf_counter()
    decode(model, caches, y, steps)
    return rows * steps / (time.perf_counter() - start)


def bare_workload_tps(model, tokenizer, clients: int, requests: int, max_tokens: int) -> float:
    """The load() workload's token work on the bare forward, timed whole: per round, the clients' prompts
    prefilled together (as the engine groups joining rows), then max_tokens greedy steps at batch `clients`."""
    start = time.perf_counter()
    for r in range(requests):
        prompts = [tokenizer.encode_prompt(PROMPTS[(c * requests + r) % len(PROMPTS)], raw=True)
                   for c in range(clients)]
        caches, last = prefilled(model, prompts)
        decode(model, caches, greedy_step(model, caches, mx.array(last)), max_tokens - 1)
    return clients * requests * max_tokens / (time.perf_counter() - start)


def prefilled(model, prompts: list[list[int]]) -> tuple[list[BatchKVCache], list[int]]:
    """A batch cache holding each prompt but its last id, prefilled in afm_mlx.batch.padding_groups as the engine
    admits rows, and the rows' last ids in the cache's row order."""
    caches, order = [BatchKVCache() for _ in model.model.layers], []
    for group in padding_groups([len(ids) - 1 for ids in prompts]):
        prefill_into(model, caches, [model.make_cache() for _ in group], [prompts[i][:-1] for i in group],
                     kv_template(model), PREFILL_CHUNK_SIZE)
        order += group
    return caches, [prompts[i][-1] for i in order]


def greedy_step(model, caches: list[BatchKVCache], x: mx.array) -> mx.array:
    return mx.argmax(model(x[:, None], caches, num_logits=1)[:, -1], axis=-1)


def decode(model, caches: list[BatchKVCache], y: mx.array, steps: int) -> None:
    """`steps` greedy steps from tokens y [B], pipelined as the engine decodes (the next step queued before the
    host reads this one's tokens)."""
    for _ in range(steps):
        following = greedy_step(model, caches, y)
        mx.async_eval(following)
        y.tolist()
        y = following
    y.tolist()


# ---- the server under load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(command: list[str], model_id: str = "afm") -> tuple[subprocess.Popen, str]:
    """Run a server command (given `--port`) and wait for it to answer a tiny completion."""
    import httpx2 as httpx

    port = free_port()
    proc = subprocess.Popen([*command, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            body = {"model": model_id, "prompt": "Hi", "max_tokens": 1}
            if httpx.post(url + "/v1/completions", json=body, timeout=30).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{command[0]} did not start")


# Both servers run without their prompt caches: the warm-up sends the timed prompts first, and a server that
# reused their K/V would be timed on less work than the bare and engine columns do.
def afm_server(max_batch: int) -> list[str]:
    return [str(Path(sys.executable).parent / "afm-mlx"), "serve", "--max-batch", str(max_batch),
            "--max-queue", "256", "--prefix-cache-mb", "0"]


def mlx_lm_server(max_batch: int) -> list[str]:
    return [sys.executable, str(ROOT / "mlx_lm_serve.py"), "--decode-concurrency", str(max_batch),
            "--prompt-cache-size", "0"]


async def one_request(client, url: str, prompt: str, max_tokens: int, model_id: str) -> dict:
    body = {"model": model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start, times, tokens = time.perf_counter(), [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["text"]:
                times.append(time.perf_counter())
    ttft = times[0] - start if times else None
    return {"tokens": tokens, "ttft": ttft, "itl": [b - a for a, b in zip(times, times[1:])]}


async def load(url: str, clients: int, requests: int, max_tokens: int, model_id: str = "afm") -> dict:
    import httpx2 as httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def one_client(c: int):
            return [await one_request(client, url, PROMPTS[(c * requests + r) % len(PROMPTS)], max_tokens, model_id)
                    for r in range(requests)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(one_client(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    itls = [x for r in results for x in r["itl"]]
    return {"tps": sum(r["tokens"] for r in results) / wall, "tokens": sum(r["tokens"] for r in results),
            "ttft_p50_ms": 1000 * pct(ttfts, 50), "ttft_p99_ms": 1000 * pct(ttfts, 99),
            "itl_p50_ms": 1000 * pct(itls, 50), "itl_p99_ms": 1000 * pct(itls, 99)}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def engine_workload_tps(model, tokenizer, clients: int, requests: int, max_tokens: int) -> float:
    """The load() workload run through a BatchGenerator directly: tokens/s from the first submit to the end."""
    batch = BatchGenerator(model, tokenizer, max_batch=max(clients, 1))
    owner, sent = {}, [0] * clients

    def send(c: int) -> None:
        prompt = PROMPTS[(c * requests + sent[c]) % len(PROMPTS)]
        owner[batch.submit(make_request(tokenizer, prompt, raw=True, max_tokens=max_tokens))] = c
        sent[c] += 1

    start, tokens = time.perf_counter(), 0
    for c in range(clients):
        send(c)
    while batch.busy:
        for uid, piece in batch.step():
            tokens += len(piece.tokens)
            if piece.finish_reason is not None and sent[owner[uid]] < requests:
                send(owner[uid])
    return tokens / (time.perf_counter() - start)


# ---- adapters in one batch


def engine_tps(model, tokenizer, rows: int, adapters: list[str | None], max_tokens: int,
               num_draft_tokens: int = 0, stats: list | None = None) -> float:
    """The batch engine's tokens/s with `rows` rows, row i using adapters[i % len(adapters)]; with
    num_draft_tokens > 0 every row decodes in speculative rounds with model.draft (its rows' final stats are
    appended to `stats`)."""
    draft = model.draft if num_draft_tokens else None
    batch = BatchGenerator(model, tokenizer, max_batch=rows, draft=draft)
    for i in range(rows):
        batch.submit(make_request(tokenizer, PROMPTS[i % len(PROMPTS)], raw=True, max_tokens=max_tokens,
                                  adapter=adapters[i % len(adapters)], num_draft_tokens=num_draft_tokens))
    start, tokens = None, 0
    while batch.busy:
        pieces = batch.step()
        if start is None:  # the first step admits (prefills) the rows: not decode throughput
            start = time.perf_counter()
            continue
        tokens += sum(len(piece.tokens) for _, piece in pieces)
        if stats is not None:
            stats += [piece.stats for _, piece in pieces if piece.stats is not None]
    return tokens / (time.perf_counter() - start)


def bench_adapters(model, tokenizer, rows: int, trials: int, max_tokens: int) -> dict:
    names = [add_adapter(model, random_adapter(model.args, 32, seed), f"bench-{seed}") for seed in range(4)]
    engine_tps(model, tokenizer, rows, names, 4)  # warm-up
    runs = {"none": [], "four": []}
    for _ in range(trials):
        runs["none"].append(engine_tps(model, tokenizer, rows, [None], max_tokens))
        runs["four"].append(engine_tps(model, tokenizer, rows, names, max_tokens))
    ratios = [f / n for n, f in zip(runs["none"], runs["four"])]
    return {"rows": rows, "rank": 32, "none_tps": statistics.median(runs["none"]),
            "four_adapters_tps": statistics.median(runs["four"]), "ratio": statistics.median(ratios),
            "ratios": ratios}


# ---- driver


def run(opts) -> dict:
    model, tokenizer = afm_mlx.load(draft=False)
    for c in opts.clients:
        bare_tps(model, tokenizer, c, 4)  # warm-up
    trials = {c: {"bare": [], "bare_workload": [], "engine": [], "server": [], "mlx_lm": []} for c in opts.clients}
    exit_codes = []
    for _ in range(opts.trials):  # one server up at a time
        with server(afm_server(max(opts.clients)), "afm", exit_codes) as url:
            for c in opts.clients:
                trials[c]["bare"].append(bare_tps(model, tokenizer, c, opts.max_tokens))
                trials[c]["bare_workload"].append(bare_workload_tps(model, tokenizer, c, opts.requests,
                                                                    opts.max_tokens))
                trials[c]["engine"].append(engine_workload_tps(model, tokenizer, c, opts.requests, opts.max_tokens))
                trials[c]["server"].append(asyncio.run(load(url, c, opts.requests, opts.max_tokens)))
        if opts.mlx_lm:
            with server(mlx_lm_server(max(opts.clients)), "afm-demo", []) as url:
                for c in opts.clients:
                    trials[c]["mlx_lm"].append(asyncio.run(load(url, c, opts.requests, opts.max_tokens, "afm-demo")))
    rows = [summarise(c, t) for c, t in trials.items()]
    adapters = bench_adapters(model, tokenizer, opts.adapter_rows, opts.trials, opts.max_tokens)
    return {"machine": machine(), "options": {k: str(v) for k, v in vars(opts).items()},
            "afm_server_exit_codes": exit_codes, "rows": rows, "adapters": adapters}


@contextmanager
def server(command: list[str], model_id: str, exit_codes: list[int]):
    proc, url = start_server(command, model_id)
    try:
        for c in CLIENTS_WARM_UP:  # batch sizes and prompt shapes traced (mx.compile) before timing
            asyncio.run(load(url, c, 2, 16, model_id))
        yield url
    finally:
        exit_codes.append(stop_server(proc))


def summarise(clients: int, t: dict) -> dict:
    ratios = [s["tps"] / b for b, s in zip(t["bare"], t["server"])]
    server = {k: statistics.median(s[k] for s in t["server"]) for k in t["server"][0]}
    with_prefill = [s["tps"] / b for b, s in zip(t["bare_workload"], t["server"])]
    row = {"clients": clients, "bare_tps": statistics.median(t["bare"]),
           "bare_workload_tps": statistics.median(t["bare_workload"]), "engine_tps": statistics.median(t["engine"]),
           "ratio_with_prefill": statistics.median(with_prefill), "ratios_with_prefill": with_prefill,
           "server_vs_engine": statistics.median(s["tps"] / e for e, s in zip(t["engine"], t["server"])),
           **{f"server_{k}": v for k, v in server.items()}, "ratio": statistics.median(ratios), "ratios": ratios}
    if t["mlx_lm"]:
        row.update({f"mlx_lm_{k}": statistics.median(s[k] for s in t["mlx_lm"]) for k in t["mlx_lm"][0]})
        row["vs_mlx_lm"] = statistics.median(s["tps"] / m["tps"] for s, m in zip(t["server"], t["mlx_lm"]))
    return row


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "device": str(mx.default_device()), "mlx": mx.__version__, "load_avg": os.getloadavg(),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=ROOT).stdout.strip()}


def markdown(result: dict) -> str:
    o, m = result["options"], result["machine"]
    lines = [f"# afm-mlx serve: the bare batched forward, the server, mlx_lm.server (demo family, {m['device']})", "",
             f"{o['requests']} completions of {o['max_tokens']} tokens per client, greedy, streamed; medians of "
             f"{o['trials']} trials (bare and server interleaved per client count; one server up at a time); "
             f"commit {m['commit']}, {m['cpus']} CPUs, load average {', '.join(f'{x:.1f}' for x in m['load_avg'])}.",
             "", "| clients | bare decode tok/s | bare, same work (prefill + decode) tok/s | "
                 "engine, same workload tok/s | afm-mlx serve tok/s | serve / bare decode | serve / bare same work | "
                 "serve / engine | "
                 "TTFT p50 / p99 ms | ITL p50 / p99 ms | mlx_lm.server tok/s | TTFT p50 / p99 ms | "
                 "ITL p50 / p99 ms | serve / mlx-lm |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        theirs = (f"{r['mlx_lm_tps']:.1f} | {r['mlx_lm_ttft_p50_ms']:.0f} / {r['mlx_lm_ttft_p99_ms']:.0f} | "
                  f"{r['mlx_lm_itl_p50_ms']:.0f} / {r['mlx_lm_itl_p99_ms']:.0f} | {r['vs_mlx_lm']:.2f}"
                  if "mlx_lm_tps" in r else "- | - | - | -")
        lines.append(f"| {r['clients']} | {r['bare_tps']:.1f} | {r['bare_workload_tps']:.1f} | {r['engine_tps']:.1f} | "
                     f"{r['server_tps']:.1f} | {r['ratio']:.2f} | {r['ratio_with_prefill']:.2f} | "
                     f"{r['server_vs_engine']:.2f} | "
                     f"{r['server_ttft_p50_ms']:.0f} / {r['server_ttft_p99_ms']:.0f} | "
                     f"{r['server_itl_p50_ms']:.0f} / {r['server_itl_p99_ms']:.0f} | {theirs} |")
    a = result["adapters"]
    lines += ["", f"Adapters (batch engine, {a['rows']} rows, rank {a['rank']}): no adapter {a['none_tps']:.1f} "
                  f"tok/s, 4 different adapters in the batch {a['four_adapters_tps']:.1f} tok/s, ratio "
                  f"{a['ratio']:.2f} (per trial: {', '.join(f'{x:.2f}' for x in a['ratios'])}).",
              "", f"afm-mlx serve exit codes after SIGTERM: {result['afm_server_exit_codes']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="1,4,16,32", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--requests", type=int, default=2, help="Requests per client, one after the other.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--adapter-rows", type=int, default=16)
    parser.add_argument("--mlx-lm", action=argparse.BooleanOptionalAction, default=True,
                        help="Also mlx_lm.server on the same weights (benchmarks/mlx_lm_serve.py).")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "serve")
    opts = parser.parse_args()
    result = run(opts)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "serve.json").write_text(json.dumps(result, indent=1, default=str))
    (opts.out / "serve.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
