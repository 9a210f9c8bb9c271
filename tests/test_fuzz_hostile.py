"""Fuzz suite (issue #16): hostile and random files must be refused, or read, in bounded memory and time.

Every file is read in a forked child (tests/bounded_reader.py) under an address-space and CPU limit, which only
protect the machine: a test fails when the reader needed more than MAX_GROWTH of resident memory, took longer
than MAX_SECONDS, ran into the limits (a MemoryError, even one reported as an AFMError, or a kill), or raised
anything but a one-line AFMError.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hostile_files import HOSTILE, checkpoint_zip, tensor_pickle

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the bounded reader needs fork and "
                                                                            "/proc/self (Linux)")

HERE = Path(__file__).parent
MAX_GROWTH = 64 << 20  # the largest real tensor in these files is 1 MB
MAX_SECONDS = 5.0


def read_bounded(cases: list[tuple[str, Path]]) -> list[dict]:
    """Results of tests/bounded_reader.py, one per (reader kind, path)."""
    payload = json.dumps([[kind, str(path)] for kind, path in cases])
    done = subprocess.run([sys.executable, str(HERE / "bounded_reader.py")], input=payload, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def assert_bounded(result: dict, outcomes: tuple[str, ...] = ("refused",)) -> None:
    assert result["outcome"] in outcomes, result
    assert "MemoryError" not in result["message"], result  # it asked for more than the limit allows
    assert "\n" not in result["message"], result
    assert result["grew"] < MAX_GROWTH, result
    assert result["seconds"] < MAX_SECONDS, result


@pytest.fixture(scope="module")
def hostile_results(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("hostile")
    cases = [(kind, write(root / file_name)) for kind, write, file_name in HOSTILE.values()]
    return dict(zip(HOSTILE, read_bounded(cases)))


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_file_is_refused_in_bounded_memory_and_time(hostile_results, name):
    assert_bounded(hostile_results[name])


# ---- random pickles: opcode streams from a grammar, inside otherwise valid checkpoints

_NAMES = [("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("torch", "FloatStorage"),
          ("torch._utils", "_rebuild_parameter"), ("_codecs", "encode"), ("builtins", "set"), ("builtins", "dict"),
          ("builtins", "frozenset"), ("torch", "float32"), ("os", "system"), ("torch.storage", "TypedStorage")]


def _random_op(rng: np.random.Generator) -> bytes:
    u32 = lambda: struct.pack("<I", int(rng.choice([0, 1, 7, 255, 1 << 16, 1 << 28, (1 << 32) - 1])))  # noqa: E731
    choices = [
        b"(", b"0", b"1", b"2", b"N", b"\x88", b"\x89", b"]", b"a", b"e", b"l", b")", b"t", b"\x85", b"\x86",
        b"\x87", b"}", b"d", b"s", b"u", b"R", b"b", b"\x81", b"Q", b"\x8f", b"\x90", b"\x91",
        b"K" + bytes([int(rng.integers(256))]), b"J" + struct.pack("<i", int(rng.integers(-2**31, 2**31))),
        b"X" + struct.pack("<I", 3) + b"abc", b"X" + u32(), b"\x8a\x02\xff\x7f", b"\x8b" + u32(),
        b"q" + bytes([int(rng.integers(256))]), b"r" + u32(), b"h" + bytes([int(rng.integers(4))]), b"j" + u32(),
        b"U\x07storage", b"U\x010", b"U\x03cpu",
    ]
    module, name = _NAMES[int(rng.integers(len(_NAMES)))]
    choices.append(b"c" + f"{module}\n{name}\n".encode())
    return choices[int(rng.integers(len(choices)))]


def random_pickle(rng: np.random.Generator) -> bytes:
    """A protocol-2 opcode stream: a valid state dict's start, then 1..60 random opcodes."""
    start = b"\x80\x02" + b"ccollections\nOrderedDict\n)R("
    body = b"".join(_random_op(rng) for _ in range(int(rng.integers(1, 60))))
    return start + body + b"u."


def test_random_pickles_are_refused_or_read_in_bounded_memory(tmp_path):
    rng = np.random.default_rng(16)
    data = {"data/0": np.ones(8, np.float32).tobytes(), "byteorder": b"little", "version": b"3\n"}
    cases = []
    for i in range(200):
        pickled = tensor_pickle({"w": ("0", 8, (2, 4), (4, 1))})[:-2] + random_pickle(rng)[2:]
        if i % 2:
            pickled = random_pickle(rng)
        cases.append(("pt", checkpoint_zip(tmp_path / f"r{i}.pt", {"data.pkl": pickled, **data})))
    results = read_bounded(cases)
    for result in results:
        assert_bounded(result, ("refused", "read"))
    assert sum(r["outcome"] == "refused" for r in results) > 100
