"""The torch-free PyTorch checkpoint reader/writer (afm_mlx.converters.torch_zip).

torch is a dev-only dependency: only the cross-check tests need it (they skip, with the reason, without it).
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

from afm_mlx.converters import torch_zip as tz
from afm_mlx.converters.torch_zip import BF16, open_checkpoint, save_checkpoint
from afm_mlx.errors import AFMError


def _torch():
    torch = pytest.importorskip("torch", reason="torch (dev dependency) is needed to cross-check the format")
    torch.set_num_threads(1)
    return torch


def _bits(array: np.ndarray) -> bytes:
    """Bytes of a C-contiguous copy: equality of these is bit-exact equality (NaN-safe, -0.0-aware)."""
    return np.ascontiguousarray(array).tobytes()


def _torch_bits(torch, tensor) -> tuple[str, tuple, bytes]:
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    array = tensor.detach().contiguous().numpy()
    return str(tensor.dtype), tuple(tensor.shape), _bits(array)


# ---------------------------------------------------------------------------------------------------------------
# torch.save output -> our reader

def _torch_state_dict(torch):
    gen = torch.Generator().manual_seed(0)
    embedding = torch.randn(11, 6, generator=gen)
    base = torch.arange(40, dtype=torch.float32) * 0.5
    sd = torch.nn.Linear(6, 3).state_dict()  # an OrderedDict with `_metadata` (set through pickle's BUILD)
    sd["embedding.weight"] = embedding
    sd["fp16"] = torch.randn(4, 5, generator=gen).half()
    sd["bf16"] = torch.randn(3, 7, generator=gen).to(torch.bfloat16)
    sd["num_samples"] = torch.tensor(12345, dtype=torch.int64)  # 0-d
    sd["transposed"] = torch.randn(5, 8, generator=gen).t()  # stride (1, 8)
    sd["offset_view"] = base[7:19].view(3, 4)  # storage_offset 7 into a 40-element storage
    sd["strided"] = base.view(5, 8)[1:, ::2]  # offset and non-unit strides
    sd["int32"] = torch.arange(-3, 3, dtype=torch.int32)
    sd["int8"] = torch.tensor([-128, 0, 127], dtype=torch.int8)
    sd["uint8"] = torch.tensor([0, 255], dtype=torch.uint8)
    sd["bool"] = torch.tensor([True, False, True])
    sd["empty"] = torch.zeros(0, 4)
    sd["parameter"] = torch.nn.Parameter(torch.ones(2, 2))  # pickled through _rebuild_parameter
    sd["output_transform.weight"] = embedding.view(11, 6)  # another tensor object on the same storage
    return sd


def test_reads_torch_save_bit_exactly(tmp_path):
    torch = _torch()
    sd = _torch_state_dict(torch)
    path = tmp_path / "base-model.pt"
    torch.save(sd, path)
    with open_checkpoint(path) as ckpt:
        assert list(ckpt) == list(sd)  # state-dict order kept
        for name, ref in sd.items():
            ours = ckpt[name]
            raw = ours.numpy(raw=True)
            assert raw.shape == tuple(ref.shape) and _bits(raw) == _torch_bits(torch, ref)[2], name
            assert ours.dtype == str(ref.dtype).removeprefix("torch."), name
            assert ours.shape == tuple(ref.shape) and ours.stride == ref.stride(), name
            assert ours.storage_offset == ref.storage_offset(), name
            assert _bits(ours.numpy(copy=True)) == _bits(ref.float().numpy() if ref.dtype == torch.bfloat16
                                                         else ref.detach().numpy()), name
        assert ckpt.shares_storage("embedding.weight", "output_transform.weight")
        assert not ckpt.shares_storage("embedding.weight", "fp16")
        assert ckpt.shares_storage("offset_view", "strided")
        assert ckpt["num_samples"].numpy().item() == 12345
        assert ckpt.version == 3 and ckpt.extras == {}


def test_bf16_reads_as_exact_float32(tmp_path):
    torch = _torch()
    values = torch.tensor([1.0, -2.5, 3.140625, 1e-30, float("inf"), -0.0]).to(torch.bfloat16)
    torch.save({"w": values}, tmp_path / "b.pt")
    with open_checkpoint(tmp_path / "b.pt") as ckpt:
        got = ckpt["w"].numpy()
        assert got.dtype == np.float32
        assert _bits(got) == _bits(values.float().numpy())
        assert ckpt["w"].numpy(raw=True).dtype == np.uint16


def test_wrapped_state_dict_is_unwrapped_and_nested_dicts_flattened(tmp_path):
    torch = _torch()
    inner = {"embedding.weight": torch.ones(2, 3), "layers": {"0": {"w": torch.zeros(4)}}, "note": "x"}
    torch.save({"state_dict": inner, "epoch": 3}, tmp_path / "wrapped.pt")
    with open_checkpoint(tmp_path / "wrapped.pt") as ckpt:
        assert list(ckpt) == ["embedding.weight", "layers.0.w"]
        assert ckpt.extras == {"epoch": 3, "note": "x"}
        assert ckpt["layers.0.w"].shape == (4,)


# ---------------------------------------------------------------------------------------------------------------
# our writer -> torch.load and our reader

def _writer_inputs(rng):
    embedding = rng.standard_normal((9, 4)).astype(np.float32)
    return embedding, [
        ("embedding.weight", embedding),
        ("output_transform.weight", None),  # tied: position only
        ("fp16", rng.standard_normal((3, 5)).astype(np.float16)),
        ("bf16", BF16(rng.standard_normal((6, 3)).astype(np.float32))),
        ("num_samples", np.array(777, dtype=np.int64)),
        ("from_callable", lambda: np.arange(12, dtype=np.int32).reshape(3, 4)),
        ("transposed_input", rng.standard_normal((4, 6)).astype(np.float32).T),  # written contiguous
        ("int8", np.array([-128, 5, 127], dtype=np.int8)),
        ("bool", np.array([[True], [False]])),
        ("empty", np.zeros((0, 3), np.float32)),
    ]


def test_save_checkpoint_loads_in_torch_bit_exactly(tmp_path):
    torch = _torch()
    embedding, inputs = _writer_inputs(np.random.default_rng(1))
    path = tmp_path / "ours.pt"
    save_checkpoint(path, inputs, tie={"output_transform.weight": "embedding.weight"})
    for mmap in (False, True):  # mmap=True requires the 64-byte aligned records torch writes
        sd = torch.load(path, weights_only=True, mmap=mmap)
        assert list(sd) == [name for name, _ in inputs]
        assert sd["output_transform.weight"].data_ptr() == sd["embedding.weight"].data_ptr()
        assert sd["output_transform.weight"].untyped_storage().data_ptr() == \
            sd["embedding.weight"].untyped_storage().data_ptr()
        for name, value in inputs:
            value = embedding if value is None else value() if callable(value) else value
            if isinstance(value, BF16):  # compare against torch's own float32 -> bfloat16 rounding
                ref = torch.from_numpy(value.values).to(torch.bfloat16)
                assert _torch_bits(torch, sd[name]) == _torch_bits(torch, ref), name
            else:
                assert sd[name].dtype == torch.from_numpy(np.ascontiguousarray(value)).dtype, name
                assert tuple(sd[name].shape) == value.shape and _bits(sd[name].numpy()) == _bits(value), name


def test_save_checkpoint_bf16_matches_torch_rounding_on_hard_cases(tmp_path):
    torch = _torch()
    hard = _rounding_cases()
    save_checkpoint(tmp_path / "r.pt", [("w", BF16(hard))])
    got = torch.load(tmp_path / "r.pt", weights_only=True)["w"].view(torch.int16).numpy().view(np.uint16)
    ref = torch.from_numpy(hard).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    # NaN stays NaN; its bits are not pinned (torch's own scalar and vectorised paths disagree: 0x7FC0 / 0xFFFF)
    nan = np.isnan(hard)
    assert np.array_equal(got[~nan], ref[~nan]) and np.all((got[nan] & 0x7F80 == 0x7F80) & (got[nan] & 0x7F != 0))


def test_zip64_layout_loads_in_torch_and_ours(tmp_path, monkeypatch):
    # A 12.7 GB checkpoint needs zip64 records (offsets past 4 GiB). Lowering zipfile's limit makes a tiny file
    # use the same zip64 local/central/end records, so both readers are checked on that layout in milliseconds.
    torch = _torch()
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 100)
    big = np.arange(300, dtype=np.float32).reshape(30, 10)
    save_checkpoint(tmp_path / "z.pt", [("a", big), ("b", BF16(big[:3])), ("c", np.ones(5, np.float16))])
    monkeypatch.undo()
    with zipfile.ZipFile(tmp_path / "z.pt") as archive:
        assert any(len(i.extra) >= 20 for i in archive.infolist())  # zip64 extra fields really written
    sd = torch.load(tmp_path / "z.pt", weights_only=True)
    assert _bits(sd["a"].numpy()) == _bits(big)
    with open_checkpoint(tmp_path / "z.pt") as ckpt:
        assert _bits(ckpt["a"].numpy()) == _bits(big) and _bits(ckpt["c"].numpy()) == _bits(np.ones(5, np.float16))


# ---------------------------------------------------------------------------------------------------------------
# without torch: our writer <-> our reader, bf16 rounding against a float64 reference

def _rounding_cases() -> np.ndarray:
    # exact halfway points (ties to even, both parities), just above/below, max float, tiny, inf, nan, signs
    def f(bits: int) -> float:
        return np.array([bits], np.uint32).view(np.float32)[0]
    cases = [f(0x3F808000), f(0x3F818000), f(0x3F808001), f(0x3F807FFF), f(0x7F7FFFFF), f(0x00000001),
             f(0x80008000), np.inf, -np.inf, np.nan, 0.0, -0.0, 1.0, -3.0e38, 6.1e-5]
    rng = np.random.default_rng(5)
    return np.concatenate([np.array(cases, np.float32), rng.standard_normal(200).astype(np.float32) * 1e3])


def _bf16_reference(values: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even to bfloat16 written from the definition: pick the nearer of the two neighbours."""
    out = []
    for x in values.astype(np.float32):
        if np.isnan(x):
            out.append(0x7FC0)
            continue
        bits = int(np.array([x], np.float32).view(np.uint32)[0])
        down, up = bits >> 16, (bits >> 16) + 1
        as_f64 = lambda b: float(np.array([b << 16], np.uint32).view(np.float32)[0])  # noqa: E731
        if np.isinf(x) or (bits & 0xFFFF) == 0:
            out.append(down)
            continue
        low, high = as_f64(down), (as_f64(up) if (up & 0x7F80) != 0x7F80 or (up & 0x7F) else
                                   np.copysign(np.inf, x))
        d_low, d_high = abs(float(x) - low), abs(float(x) - high) if np.isfinite(high) else None
        if d_high is None:  # rounding up would overflow: overflow threshold is the halfway point to 2^128
            limit = 2.0**128 - 2.0**(127 - 8)
            out.append(up if abs(float(x)) >= limit else down)
        elif d_low != d_high:
            out.append(down if d_low < d_high else up)
        else:
            out.append(down if down % 2 == 0 else up)
    return np.array(out, np.uint16)


def test_bf16_rounding_matches_float64_reference():
    cases = _rounding_cases()
    assert np.array_equal(tz.float32_to_bf16_bits(cases), _bf16_reference(cases))


def test_round_trip_without_torch(tmp_path):
    embedding, inputs = _writer_inputs(np.random.default_rng(2))
    path = tmp_path / "rt.pt"
    save_checkpoint(path, inputs, tie={"output_transform.weight": "embedding.weight"})
    with open_checkpoint(path) as ckpt:
        assert list(ckpt) == [name for name, _ in inputs]
        assert ckpt.shares_storage("embedding.weight", "output_transform.weight")
        assert _bits(ckpt["output_transform.weight"].numpy()) == _bits(embedding)
        assert ckpt["bf16"].dtype == "bfloat16" and ckpt["num_samples"].numpy().item() == 777
        assert ckpt["bool"].dtype == "bool" and ckpt["empty"].shape == (0, 3)
        transposed = dict(inputs)["transposed_input"]
        assert ckpt["transposed_input"].is_contiguous() and _bits(ckpt["transposed_input"].numpy()) == \
            _bits(transposed)
        bf16 = dict(inputs)["bf16"].values
        assert _bits(ckpt["bf16"].numpy(raw=True)) == _bits(_bf16_reference(bf16.reshape(-1)).reshape(bf16.shape))
        # a LazyTensor can be written back unchanged (bf16 bits included)
        save_checkpoint(tmp_path / "copy.pt", [(k, ckpt[k]) for k in ckpt if k != "output_transform.weight"])
    with open_checkpoint(tmp_path / "copy.pt") as copy, open_checkpoint(path) as ckpt:
        for name in copy:
            assert copy[name].dtype == ckpt[name].dtype and _bits(copy[name].numpy(raw=True)) == \
                _bits(ckpt[name].numpy(raw=True))


def test_tied_key_missing_from_input_is_appended(tmp_path):
    save_checkpoint(tmp_path / "t.pt", [("a", np.ones(3, np.float32)), ("b", np.zeros(2, np.float32))],
                    tie={"head": "a"})
    with open_checkpoint(tmp_path / "t.pt") as ckpt:
        assert list(ckpt) == ["a", "b", "head"] and ckpt.shares_storage("a", "head")


def test_records_are_stored_and_64_byte_aligned(tmp_path):
    save_checkpoint(tmp_path / "a.pt", [(f"t{i}", np.ones(i + 1, np.float16)) for i in range(7)])
    with zipfile.ZipFile(tmp_path / "a.pt") as archive, open(tmp_path / "a.pt", "rb") as raw:
        names = archive.namelist()
        assert {"a/data.pkl", "a/byteorder", "a/version", "a/data/6"} <= set(names)
        for info in archive.infolist():
            raw.seek(info.header_offset + 26)
            name_len, extra_len = np.frombuffer(raw.read(4), "<u2")
            assert info.compress_type == zipfile.ZIP_STORED
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename


def test_failed_write_leaves_nothing(tmp_path):
    def boom():
        raise RuntimeError("generator failed")
    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path / "x.pt", [("a", np.ones(3)), ("b", boom)])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="not a written tensor"):
        save_checkpoint(tmp_path / "x.pt", [("a", np.ones(3))], tie={"b": "missing"})
    assert list(tmp_path.iterdir()) == []


def test_views_are_lazy_and_copies_are_owned(tmp_path):
    save_checkpoint(tmp_path / "v.pt", [("w", np.arange(20, dtype=np.float32).reshape(4, 5))])
    with open_checkpoint(tmp_path / "v.pt") as ckpt:
        view = ckpt["w"].numpy()
        assert not view.flags.owndata and not view.flags.writeable  # a window on the mapped file
        copy = ckpt["w"].numpy(copy=True)
        assert copy.flags.owndata and copy.flags.writeable
    assert view[3, 4] == 19.0  # an existing view outlives close()
    with pytest.raises(AFMError, match="closed"):
        ckpt["w"].numpy()


# ---------------------------------------------------------------------------------------------------------------
# hostile and broken inputs

def _checkpoint_zip(path, records: dict[str, bytes], archive: str = "archive", deflate: tuple = ()) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in records.items():
            zf.writestr(f"{archive}/{name}", data,
                        compress_type=zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED)


def _valid_records(tmp_path) -> dict[str, bytes]:
    save_checkpoint(tmp_path / "valid.pt", [("a", np.ones((2, 3), np.float32)), ("b", np.arange(4))])
    with zipfile.ZipFile(tmp_path / "valid.pt") as zf:
        records = {n.split("/", 1)[1]: zf.read(n) for n in zf.namelist()}
    os.unlink(tmp_path / "valid.pt")
    return records


def _one_line_error(path) -> str:
    with pytest.raises(AFMError) as caught:
        open_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message and message
    return message


class _Payload:
    """Pickles to `func(*args)`: what a malicious checkpoint's __reduce__ would run on a plain pickle.load."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _hostile_payloads(marker):
    import builtins
    code = f"open({str(marker)!r}, 'w').close()"
    return {
        "posix.system": _Payload(os.system, f"touch {marker}"),
        "builtins.eval": _Payload(builtins.eval, code),
        "builtins.exec": _Payload(builtins.exec, code),
        "subprocess.call": _Payload(subprocess.call, ["touch", str(marker)]),
        "os.popen": _Payload(os.popen, f"touch {marker}"),
    }


@pytest.mark.parametrize("expected_global", ["posix.system", "builtins.eval", "builtins.exec", "subprocess.call",
                                             "os.popen"])
def test_hostile_pickle_is_refused_and_not_run(tmp_path, expected_global):
    marker = tmp_path / "pwned"
    payload = _hostile_payloads(marker)[expected_global]
    if expected_global == "posix.system" and os.system.__module__ != "posix":
        pytest.skip("os.system lives in module nt on this platform")  # the name in the pickle differs
    records = _valid_records(tmp_path)
    records["data.pkl"] = pickle.dumps(collections.OrderedDict(w=payload), protocol=2)
    _checkpoint_zip(tmp_path / "evil.pt", records)
    message = _one_line_error(tmp_path / "evil.pt")
    assert message == f"refusing to unpickle global {expected_global} in evil.pt: not a tensor checkpoint"
    assert not marker.exists()


def test_unknown_global_is_never_imported(tmp_path, monkeypatch):
    # a module whose import alone would leave a marker: the reader must refuse it by name without importing it
    marker = tmp_path / "imported"
    (tmp_path / "afm_evil_mod.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Thing: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    records = _valid_records(tmp_path)
    records["data.pkl"] = b"\x80\x02cafm_evil_mod\nThing\n)R."
    _checkpoint_zip(tmp_path / "g.pt", records)
    assert "global afm_evil_mod.Thing in g.pt" in _one_line_error(tmp_path / "g.pt")
    assert not marker.exists() and "afm_evil_mod" not in sys.modules
    records["data.pkl"] = b"\x80\x02ctorch.nn.modules.linear\nLinear\n)R."
    _checkpoint_zip(tmp_path / "m.pt", records)
    assert "global torch.nn.modules.linear.Linear" in _one_line_error(tmp_path / "m.pt")


def _tensor_pickle(numel: int, shape: tuple, stride: tuple, offset: int) -> bytes:
    entry = tz._Entry("w", "float32", shape, "0", numel)
    body = tz._p_tensor(entry).replace(tz._p_int(0) + tz._p_tuple(map(tz._p_int, shape)),
                                       tz._p_int(offset) + tz._p_tuple(map(tz._p_int, shape)), 1)
    body = body.replace(tz._p_tuple(map(tz._p_int, tz._contiguous_strides(shape))),
                        tz._p_tuple(map(tz._p_int, stride)), 1)
    return b"\x80\x02" + tz._p_global("collections", "OrderedDict") + b")R(" + tz._p_str("w") + body + b"u."


def test_out_of_bounds_views_are_refused(tmp_path):
    # a stride or offset reaching past the storage would read other memory through as_strided: refuse it
    records = _valid_records(tmp_path)
    records["data/0"] = np.zeros(6, np.float32).tobytes()
    for shape, stride, offset in [((2, 3), (3, 1), 1), ((2, 3), (4, 1), 0), ((7,), (1,), 0)]:
        records["data.pkl"] = _tensor_pickle(6, shape, stride, offset)
        records.pop("data/1", None)
        _checkpoint_zip(tmp_path / "oob.pt", records)
        assert "reaches element" in _one_line_error(tmp_path / "oob.pt")
    records["data.pkl"] = _tensor_pickle(6, (2, 3), (1, 2), 0)  # in bounds: accepted
    _checkpoint_zip(tmp_path / "ok.pt", records)
    with open_checkpoint(tmp_path / "ok.pt") as ckpt:
        assert ckpt["w"].numpy().shape == (2, 3)


@pytest.mark.parametrize("case, expected", [
    ("truncated_half", "not a PyTorch zip checkpoint"),
    ("truncated_tail", "not a PyTorch zip checkpoint"),
    ("no_data_pkl", "no <archive>/data.pkl"),
    ("random_bytes", "not a PyTorch zip checkpoint"),
    ("legacy_pickle", "legacy"),
    ("missing_data_entry", "missing tensor data archive/data/1"),
    ("short_data_entry", "data/0 holds 8 bytes"),
    ("compressed_entry", "is compressed"),
    ("big_endian", "byteorder 'big' is not supported"),
    ("no_version", "missing archive/version"),
    ("list_root", "holds a list, not a state dict"),
    ("garbage_pickle", "malformed data.pkl"),
    ("not_callable", "malformed data.pkl"),
    ("missing_file", "no such checkpoint"),
    ("directory", "is a directory"),
])
def test_broken_inputs_give_one_line_errors(tmp_path, case, expected):
    records = _valid_records(tmp_path)
    path = tmp_path / "broken.pt"
    save_checkpoint(tmp_path / "good.pt", [("a", np.ones((64, 64), np.float32))])
    good = (tmp_path / "good.pt").read_bytes()
    if case == "truncated_half":
        path.write_bytes(good[: len(good) // 2])
    elif case == "truncated_tail":
        path.write_bytes(good[:-10])
    elif case == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "legacy_pickle":
        path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    elif case == "missing_file":
        pass
    elif case == "directory":
        path.mkdir()
    else:
        edits = {"no_data_pkl": {"data.pkl": None}, "missing_data_entry": {"data/1": None},
                 "short_data_entry": {"data/0": b"\0" * 8}, "big_endian": {"byteorder": b"big"},
                 "no_version": {"version": None}, "list_root": {"data.pkl": pickle.dumps([1, 2], protocol=2)},
                 "garbage_pickle": {"data.pkl": b"\x80\x02(garbage"},
                 "not_callable": {"data.pkl": b"\x80\x02ctorch\nFloatStorage\n)R."},
                 "compressed_entry": {}}[case]
        for name, data in edits.items():
            if data is None:
                del records[name]
            else:
                records[name] = data
        deflate = ("data/0",) if case == "compressed_entry" else ()
        _checkpoint_zip(path, records, deflate=deflate)
    assert expected in _one_line_error(path)


def test_random_damage_gives_afm_error_or_a_valid_checkpoint(tmp_path):
    # byte flips and truncations anywhere (zip headers, pickle, data): never a traceback of another type
    save_checkpoint(tmp_path / "f.pt", [("a", np.ones((3, 4), np.float32)), ("b", BF16(np.arange(5.0)))],
                    tie={"c": "a"})
    good = (tmp_path / "f.pt").read_bytes()
    rng = np.random.default_rng(7)
    outcomes = collections.Counter()
    for _ in range(150):
        damaged = bytearray(good)
        for pos in rng.integers(0, len(good), rng.integers(1, 4)):
            damaged[pos] = rng.integers(0, 256)
        if rng.random() < 0.3:
            damaged = damaged[: rng.integers(0, len(damaged))]
        (tmp_path / "d.pt").write_bytes(bytes(damaged))
        try:
            with open_checkpoint(tmp_path / "d.pt") as ckpt:
                for name in ckpt:
                    ckpt[name].numpy(copy=True)
            outcomes["read"] += 1
        except AFMError as err:
            assert "\n" not in str(err)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0  # the damage does get noticed (CRC, headers, bounds)


# ---------------------------------------------------------------------------------------------------------------
# memory: one tensor is read without touching the others

_RSS_PROBE = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from afm_mlx.converters.torch_zip import open_checkpoint
    def peak():
        # Linux: VmHWM is this process's own peak (ru_maxrss would include the parent's peak, kept across exec)
        try:
            with open("/proc/self/status") as status:
                return next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmHWM:"))
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS: bytes
    with open_checkpoint(sys.argv[1]) as ckpt:
        before = peak()
        small = ckpt["small"].numpy(copy=True)
        big_view = ckpt["big"].numpy()  # mapped, not read
        touched = float(big_view[-1, -1])  # one page of it
        after_small = peak()
        total = float(ckpt["big"].numpy(copy=True).sum(dtype=np.float64))  # control: really reading it does show up
        after_big = peak()
    print(json.dumps({"small_read": after_small - before, "big_read": after_big - after_small,
                      "torch_imported": "torch" in sys.modules,
                      "ok": bool(small.sum() == 6.0 and touched == 1.0 and total == big_view.size)}))
""")


def test_reading_one_tensor_does_not_read_the_others(tmp_path):
    rows, cols = 100_000, 1024  # 400 MB float32
    path = tmp_path / "big.pt"
    save_checkpoint(path, [("big", lambda: np.broadcast_to(np.ones(cols, np.float32), (rows, cols))),
                           ("small", np.ones(6, np.float32))])
    try:
        out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(path)], capture_output=True, text=True,
                             timeout=120, check=True)
    finally:
        path.unlink()  # 400 MB: do not leave it in pytest's kept tmp dirs
    result = json.loads(out.stdout)
    big_bytes = rows * cols * 4
    assert result["ok"] and not result["torch_imported"]  # the reader never needs torch
    assert result["small_read"] < 16 << 20, result  # reading "small" (plus one page of "big") stays tiny
    assert result["big_read"] > 0.9 * big_bytes, result  # the probe does see a real read


# ---------------------------------------------------------------------------------------------------------------
# issue #16: a file cannot change the reader, and genuine broadcast views still read (the fuzz suite,
# test_fuzz_hostile.py, covers the memory and time bounds)

_ENCODE_ONE_ARG = b"c_codecs\nencode\nX\x03\x00\x00\x00abc\x85R"  # _codecs.encode("abc"): the default encoding


def test_build_cannot_change_an_allow_listed_stand_in(tmp_path):
    # BUILD (None, {"__defaults__": ("utf-8",)}) on _codecs.encode would set the function's defaults process-wide
    build = (b"c_codecs\nencode\nN}X\x0c\x00\x00\x00__defaults__X\x05\x00\x00\x00utf-8\x85s\x86b0")
    records = _valid_records(tmp_path)
    records["data.pkl"] = b"\x80\x02" + build + b"ccollections\nOrderedDict\n)R."
    _checkpoint_zip(tmp_path / "build.pt", records)
    try:
        assert "BUILD on a _Inert" in _one_line_error(tmp_path / "build.pt")
    finally:
        defaults = tz._encode_latin1.__defaults__
        tz._encode_latin1.__defaults__ = ("latin1",)  # undo it for the other tests if the reader let it through
    assert defaults == ("latin1",)
    records["data.pkl"] = b"\x80\x02ccollections\nOrderedDict\n)R(X\x01\x00\x00\x00x" + _ENCODE_ONE_ARG + b"u."
    _checkpoint_zip(tmp_path / "after.pt", records)
    with open_checkpoint(tmp_path / "after.pt") as ckpt:
        assert ckpt.extras == {"x": b"abc"}


def test_torch_broadcast_view_is_read(tmp_path):
    # torch.zeros(1).expand(n) declares more bytes than its storage: accepted within the view allowance
    torch = _torch()
    torch.save({"mask": torch.ones(1).expand(1000), "w": torch.arange(6.0)}, tmp_path / "b.pt")
    with open_checkpoint(tmp_path / "b.pt") as ckpt:
        assert ckpt["mask"].stride == (0,) and np.array_equal(ckpt["mask"].numpy(copy=True), np.ones(1000))
