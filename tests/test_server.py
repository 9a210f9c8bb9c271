"""`afm-mlx serve` against the real `openai` client: a live server on 127.0.0.1 (a free port) with the demo family
and one adapter; chat and completions, streaming and not, errors as the client raises them, a client that goes
away mid-stream, a full queue, SIGTERM, and a bounded load on loopback."""

import asyncio
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package itself uses
import openai
import pytest

import afm_mlx
from afm_mlx.adapters import load_adapter
from afm_mlx.converters.torch_zip import save_checkpoint
from adapter_fixtures import toolkit_lora
from test_demo_model import DEMO

pytestmark = pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="demo model not built in this checkout")

KEY = "test-key"
MESSAGES = [{"role": "user", "content": "Who is Emma?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`afm-mlx serve ...` in a subprocess, up once /health answers."""

    def __init__(self, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).parent / "afm-mlx"
        self.proc = subprocess.Popen([str(exe), "serve", "--port", str(self.port), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.communicate()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise TimeoutError("the server did not start")

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def adapter_path(tmp_path_factory):
    model, _ = afm_mlx.load(draft=False)
    path = tmp_path_factory.mktemp("serve") / "mail.pt"
    save_checkpoint(path, toolkit_lora(model.args, 11, rank=4, gain=40.0).items())
    return path


@pytest.fixture(scope="module")
def server(adapter_path):
    s = Server("--adapter", f"mail={adapter_path}", "--api-key", KEY, "--max-tokens", "256", "--max-context", "512")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def reference(adapter_path):
    """Requests run alone in this process (greedy, no draft): what every server response must equal."""
    model, tokenizer = afm_mlx.load(draft=False)
    load_adapter(model, adapter_path, name="mail")

    def run(prompt, max_tokens, adapter=None, raw=False):
        return afm_mlx.generate(model, tokenizer, prompt, max_tokens=max_tokens, draft_model=False, adapter=adapter,
                                raw=raw).text
    return run


def test_models_lists_the_base_and_each_adapter(server):
    assert [m.id for m in server.client().models.list().data] == ["afm", "afm:mail"]


def test_chat_equals_generate_alone_streamed_or_not(server, reference):
    client = server.client()
    reply = client.chat.completions.create(model="afm", messages=MESSAGES, temperature=0, max_tokens=12)
    assert reply.choices[0].message.content == reference(MESSAGES, 12)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12 and reply.usage.prompt_tokens > 5
    chunks = list(client.chat.completions.create(model="afm", messages=MESSAGES, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference(MESSAGES, 12)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens


def test_adapter_model_uses_its_adapter(server, reference):
    reply = server.client().chat.completions.create(model="afm:mail", messages=MESSAGES, temperature=0, max_tokens=10)
    assert reply.choices[0].message.content == reference(MESSAGES, 10, adapter="mail") != reference(MESSAGES, 10)


def test_completions_streamed_or_not_with_seeds_and_n(server, reference):
    client = server.client()
    text = client.completions.create(model="afm", prompt="It is a truth", temperature=0, max_tokens=8)
    assert text.choices[0].text == reference("It is a truth", 8, raw=True)
    stream = client.completions.create(model="afm", prompt="It is a truth", temperature=0, max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == text.choices[0].text
    sampled = [client.completions.create(model="afm", prompt="She said", temperature=1.0, seed=5, n=2,
                                         max_tokens=8) for _ in range(2)]
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]  # seeded: replays
    assert sampled[0].choices[0].text != sampled[0].choices[1].text  # choice i samples with seed + i


def test_stop_strings_and_logprobs(server, reference):
    client = server.client()
    full = reference(MESSAGES, 12)
    reply = client.chat.completions.create(model="afm", messages=MESSAGES, temperature=0, max_tokens=12,
                                           stop=[full[6:9]], logprobs=True, top_logprobs=2)
    choice = reply.choices[0]
    assert choice.message.content == full[:6] and choice.finish_reason == "stop"
    first = choice.logprobs.content[0]
    assert first.logprob == first.top_logprobs[0].logprob <= 0 and len(first.top_logprobs) == 2


@pytest.mark.parametrize("call, error, match", [
    (dict(model="gpt-4"), openai.BadRequestError, "does not exist"),
    (dict(temperature=-1), openai.BadRequestError, "temperature"),
    (dict(max_tokens=100_000), openai.BadRequestError, "cap"),
    (dict(messages=[{"role": "user", "content": "word " * 2000}]), openai.BadRequestError, "context limit"),
    (dict(tools=[{"type": "function", "function": {"parameters": {}}}]), openai.BadRequestError, "has no name"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}),
     openai.BadRequestError, "Invalid type: strin"),
    (dict(tool_choice="required"), openai.BadRequestError, "tool_choice needs tools"),
    (dict(presence_penalty=0.5), openai.BadRequestError, "not supported"),
])
def test_bad_requests_are_400s_in_openai_shape(server, call, error, match):
    with pytest.raises(error, match=match) as info:
        server.client().chat.completions.create(**{"model": "afm", "messages": MESSAGES, "max_tokens": 4, **call})
    assert info.value.status_code == 400 and "Traceback" not in info.value.response.text


def test_speculative_requests_equal_generate_alone_and_report_acceptance(server, reference):
    client = server.client()
    before = server.metric("afm_draft_tokens_proposed_total")
    reply = client.chat.completions.create(model="afm", messages=MESSAGES, temperature=0, max_tokens=12,
                                           extra_body={"num_draft_tokens": 3})
    assert reply.choices[0].message.content == reference(MESSAGES, 12)
    assert server.metric("afm_draft_tokens_proposed_total") > before
    assert 0 < server.metric("afm_speculative_acceptance") <= 1
    guided = client.chat.completions.create(model="afm", messages=MESSAGES, max_tokens=48, temperature=0,
                                            extra_body={"num_draft_tokens": 2}, response_format={"type": "json_object"})
    plain = client.chat.completions.create(model="afm", messages=MESSAGES, max_tokens=48, temperature=0,
                                           response_format={"type": "json_object"})
    assert guided.choices[0].message.content == plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="num_draft_tokens"):
        client.chat.completions.create(model="afm", messages=MESSAGES, max_tokens=4,
                                       extra_body={"num_draft_tokens": 40})


def test_a_bad_or_missing_key_is_a_401(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    assert httpx.post(server.url + "/v1/completions", json={"model": "afm", "prompt": "x"}).status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # health and metrics need no key
    oversized = httpx.post(server.url + "/v1/completions", content=b"x" * (2 << 20),
                           headers={"authorization": f"Bearer {KEY}"})
    assert oversized.status_code == 413 and oversized.json()["error"]["message"]
    chunked = httpx.post(server.url + "/v1/completions", content=iter([b'{"model": "afm", "prompt": "x"}']),
                         headers={"authorization": f"bearer {KEY}"})  # no Content-Length: the cap cannot be checked
    assert chunked.status_code == 411 and "Content-Length" in chunked.json()["error"]["message"]


@pytest.fixture(scope="module")
def small_server():
    s = Server("--max-batch", "1", "--max-queue", "1", "--shutdown-timeout", "2")
    yield s
    s.stop()


def stream_request(url: str, max_tokens: int) -> httpx.Response:
    return httpx.stream("POST", url + "/v1/completions", timeout=30,
                        json={"model": "afm", "prompt": "It is a truth", "max_tokens": max_tokens, "stream": True,
                              "temperature": 0})


def wait_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_disconnect_frees_the_row_and_a_full_queue_is_a_429(small_server):
    s = small_server
    with stream_request(s.url, 250) as response:  # takes the only row
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        with stream_request(s.url, 4) as queued:  # the one queue place (its headers come once it is queued)
            wait_for(lambda: s.metric("afm_queue_depth") == 1)
            with pytest.raises(openai.RateLimitError):
                s.client().completions.create(model="afm", prompt="x", max_tokens=2)
            # the first client goes away: its row is freed, the queued request runs to the end
            response.close()
            assert sum(1 for line in queued.iter_lines() if line.startswith("data: ")) >= 2
    wait_for(lambda: s.metric('afm_requests_total{outcome="cancelled"}') == 1)
    assert s.metric("afm_batch_size") <= 1 and s.metric("afm_queue_depth") == 0


def test_sigterm_stops_within_the_bound_and_exits_0():
    s = Server("--shutdown-timeout", "1")
    with stream_request(s.url, 250) as response:  # longer than the bound at this CPU's speed
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        started = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        events = []
        with pytest.raises(httpx.RemoteProtocolError):  # cut at the bound, mid-stream; nothing hangs
            events += [line for line in lines if line]
    assert s.stop() == 0 and time.monotonic() - started < 10
    with pytest.raises(httpx.TransportError):  # no longer accepting
        httpx.get(s.url + "/health", timeout=2)


def test_bounded_load_on_loopback(server, reference):
    """32 concurrent streaming clients, 2 requests each, random lengths, random k (0: plain, else speculative
    rounds with the draft in the same batch), a quarter cancelled mid-stream: every completed response equals
    its request run alone, nothing hangs, and memory returns to its idle level."""
    prompts = ["Who is Emma?", "Tell me about Mr. Darcy.", "Hi"]
    lengths = [3, 6, 9]
    want = {(p, n): reference([{"role": "user", "content": p}], n) for p in prompts for n in lengths}
    idle = server.metric("afm_active_memory_bytes") - server.metric("afm_prefix_cache_bytes")
    rng = random.Random(0)
    jobs = [[(rng.choice(prompts), rng.choice(lengths), rng.random() < 0.25, rng.choice([0, 0, 2, 4]))
             for _ in range(2)] for _ in range(32)]
    results = asyncio.run(asyncio.wait_for(_load(server, jobs), timeout=120))
    done = [(job, text) for job, text in results if not job[2]]
    assert len(done) == sum(1 for client in jobs for job in client if not job[2])
    assert all(text == want[job[:2]] for job, text in done)
    wait_for(lambda: server.metric("afm_batch_size") == 0 and server.metric("afm_queue_depth") == 0)
    assert server.metric("afm_active_memory_bytes") - server.metric("afm_prefix_cache_bytes") <= idle * 1.1 + (4 << 20)


async def _load(server, jobs):
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)

    async def one_client(requests):
        out = []
        for prompt, n, cancel, k in requests:
            stream = await client.chat.completions.create(model="afm", temperature=0, max_tokens=n, stream=True,
                                                          messages=[{"role": "user", "content": prompt}],
                                                          extra_body={"num_draft_tokens": k})
            text = ""
            async for chunk in stream:
                text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
                if cancel:
                    await stream.close()
                    break
            out.append(((prompt, n, cancel, k), text))
        return out

    try:
        return [r for rs in await asyncio.gather(*(one_client(j) for j in jobs)) for r in rs]
    finally:
        await client.close()


@pytest.mark.parametrize("args, match", [
    (["--port", "70000"], "--port must be in"),
    (["--max-queue", "0"], "--max-queue must be >= 1"),
    (["--num-draft-tokens", "40"], "--num-draft-tokens must be in [0, 32]"),
    (["--model", "/nonexistent/model"], "model directory not found"),
    (["--adapter", "mail=/nonexistent.pt"], "nonexistent"),
])
def test_bad_serve_options_are_one_error_line(args, match):
    from typer.testing import CliRunner

    from afm_mlx.cli import app

    result = CliRunner().invoke(app, ["serve", *args])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0]
