"""Runtime LoRA adapters against the float64 reference (tests/reference.py applies W x + 0.5 (x A) B in float64).

Tiny fp32 configs. The same adapter arrives as a toolkit .pt, as a .fmadapter written by the spec-following test
writer (tests/adapter_fixtures.py, not our exporter) and as an mlx-lm adapter dir saved by mlx-lm itself.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from adapter_fixtures import (
    TOKENS,
    fp16_rounded,
    toolkit_lora,
    write_mlx_lm_adapter,
    write_test_fmadapter,
)
from afm_mlx.adapters import (
    LoRALinear,
    active_adapter,
    adapter_info,
    fuse_adapter,
    list_adapters,
    load_adapter,
    runtime_lora_shapes,
    set_active_adapter,
    unload_adapter,
    using_adapter,
)
from afm_mlx.converters.mapping import map_toolkit_state_dict
from afm_mlx.converters.torch_zip import BF16, save_checkpoint
from afm_mlx.errors import AFMError
from afm_mlx.presets import tiny_base
from reference import reference_forward
from toolkit_fixtures import mlx_model_from_toolkit, toolkit_weights

ARGS = tiny_base()  # 2 regular + 2 KV-reuse layers, 4 heads / 2 KV heads, head dim 16
CFG = ARGS.to_dict()
RANK = 8
TOL = 1e-4


@pytest.fixture(scope="module")
def base_sd():
    return toolkit_weights(ARGS, seed=1, lora=False)


@pytest.fixture(scope="module")
def lora_a():
    return toolkit_lora(ARGS, seed=5, rank=RANK)


@pytest.fixture(scope="module")
def lora_b():
    return toolkit_lora(ARGS, seed=6, rank=RANK, gain=2.0)


@pytest.fixture(scope="module")
def pt_a(tmp_path_factory, lora_a):
    path = tmp_path_factory.mktemp("pt") / "adapter-final.pt"
    save_checkpoint(path, lora_a.items())
    return path


@pytest.fixture(scope="module")
def pt_b(tmp_path_factory, lora_b):
    path = tmp_path_factory.mktemp("pt") / "adapter-epoch2.pt"
    save_checkpoint(path, lora_b.items())
    return path


@pytest.fixture
def model(base_sd):
    return mlx_model_from_toolkit(base_sd)


def logits(model, tokens=TOKENS):
    return np.array(model(mx.array(tokens)[None])[0])


def ref(base_sd, lora=None):
    return reference_forward({**base_sd, **(lora or {})}, TOKENS, CFG, lora_scale=0.5 if lora else None)


def test_adapter_matches_float64_reference(model, base_sd, lora_a, pt_a):
    name = load_adapter(model, pt_a, activate=True)
    assert name == "adapter-final" and active_adapter(model) == name
    expected = ref(base_sd, lora_a)
    assert np.abs(logits(model) - expected).max() <= TOL
    assert np.abs(expected - ref(base_sd)).max() > 0.1  # the adapter changes the logits far beyond TOL


def test_bf16_checkpoint_is_widened_exactly(model, base_sd, lora_a, tmp_path):
    path = tmp_path / "adapter-bf16.pt"
    save_checkpoint(path, ((k, BF16(v)) for k, v in lora_a.items()))
    load_adapter(model, path, activate=True)
    as_bf16 = {k: np.asarray(mx.array(v).astype(mx.bfloat16).astype(mx.float32)) for k, v in lora_a.items()}
    assert np.abs(logits(model) - ref(base_sd, as_bf16)).max() <= TOL


def test_three_formats_give_the_same_logits(model, base_sd, lora_a, pt_a, tmp_path):
    fm = write_test_fmadapter(lora_a, ARGS, tmp_path / "chat.fmadapter", RANK)
    theirs = write_mlx_lm_adapter(model, ARGS, base_sd, lora_a, tmp_path / "mlx", RANK)
    names = [load_adapter(model, p) for p in (pt_a, fm, tmp_path / "mlx")]
    assert names == list_adapters(model) == ["adapter-final", "chat", "mlx"]
    out = {}
    for name in names:
        set_active_adapter(model, name)
        out[name] = logits(model)
    exact, half = ref(base_sd, lora_a), ref(base_sd, fp16_rounded(lora_a))
    assert np.abs(out["adapter-final"] - exact).max() <= TOL
    assert np.abs(out["mlx"] - exact).max() <= TOL
    assert np.abs(out["chat"] - half).max() <= TOL  # the .fmadapter stores fp16: same as the fp16-rounded adapter
    assert np.abs(np.array(theirs(mx.array(TOKENS)[None])[0]) - exact).max() <= TOL  # mlx-lm reads its file alike


def test_switching_and_no_adapter(model, base_sd, lora_a, lora_b, pt_a, pt_b):
    qkv = model.model.layers[0].self_attn.qkv_proj
    a, b = load_adapter(model, pt_a, name="a"), load_adapter(model, pt_b, name="b", activate=True)
    assert np.abs(logits(model) - ref(base_sd, lora_b)).max() <= TOL
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, LoRALinear)
    with using_adapter(model, a):
        assert np.abs(logits(model) - ref(base_sd, lora_a)).max() <= TOL
    assert active_adapter(model) == b
    set_active_adapter(model, None)
    assert model.model.layers[0].self_attn.qkv_proj is qkv  # the plain projection is back: no LoRA compute
    assert not any(isinstance(m, LoRALinear) for _, m in model.named_modules())
    assert np.abs(logits(model) - ref(base_sd)).max() <= TOL
    info = adapter_info(model, "b")
    assert (info["rank"], info["scale"], info["format"], info["active"]) == (RANK, 0.5, "toolkit", False)
    unload_adapter(model, "a")
    assert list_adapters(model) == ["b"]


def test_parameter_names_unchanged_without_active_adapter(model, pt_a):
    from mlx.utils import tree_flatten

    before = [k for k, _ in tree_flatten(model.parameters())]
    load_adapter(model, pt_a, activate=True)
    set_active_adapter(model, None)
    assert [k for k, _ in tree_flatten(model.parameters())] == before


def test_allocated_shapes_match_runtime_lora_shapes(model, pt_a):
    name = load_adapter(model, pt_a)
    from afm_mlx.adapters import _registry

    loras = _registry(model).adapters[name].loras
    built = {path: [tuple(lora.a.shape), tuple(lora.b.shape)] for path, lora in loras.items()}
    assert built == runtime_lora_shapes(ARGS, RANK)


def test_cached_decode_uses_the_adapter(model, base_sd, lora_a, pt_a):
    load_adapter(model, pt_a, activate=True)
    cache = model.make_cache()
    model.prefill(mx.array(TOKENS[:-1])[None], cache)
    last = np.array(model(mx.array(TOKENS[-1:])[None], cache)[0, -1])
    assert np.abs(last - ref(base_sd, lora_a)[-1]).max() <= TOL


def test_name_errors(model, pt_a):
    load_adapter(model, pt_a, name="x")
    with pytest.raises(AFMError, match="already loaded"):
        load_adapter(model, pt_a, name="x")
    with pytest.raises(AFMError, match="no adapter named 'y'"):
        set_active_adapter(model, "y")


def test_fuse_on_float_base_equals_runtime(model, base_sd, lora_a, pt_a):
    load_adapter(model, pt_a, name="a", activate=True)
    runtime = logits(model)
    fuse_adapter(model, "a")
    assert list_adapters(model) == [] and active_adapter(model) is None
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, nn.Linear)
    assert np.abs(logits(model) - runtime).max() <= TOL
    assert np.abs(logits(model) - ref(base_sd, lora_a)).max() <= TOL


# ---- 2-bit base ----


def _dequantized_toolkit_sd(model, base_sd):
    """The toolkit state dict with every quantized weight replaced by its dequantized value."""
    modules = dict(model.named_modules())
    out = dict(base_sd)
    for target, src in map_toolkit_state_dict(base_sd).weights.items():
        path, _, leaf = target.rpartition(".")
        m = modules.get(path)
        if leaf == "weight" and m is not None and "scales" in m:
            out[src.key] = np.array(mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits))
    return out


def _requantize_fused(model, base_sd, lora, bits=2, group=32):
    """What fusing into a quantized base does: dequantize W, add 0.5 (A B)^T, quantize again (mlx-lm's fuse)."""
    full = {**base_sd, **lora}
    mapped = map_toolkit_state_dict(full)
    modules = dict(model.named_modules())
    for path in sorted({n[: n.index(".lora_")] for n in mapped.lora}):
        a_names = sorted(n for n in mapped.lora if n.startswith(path + ".lora_a"))
        deltas = [0.5 * (mapped.load(a, full) @ mapped.load(a.replace("lora_a", "lora_b"), full)).T for a in a_names]
        m = modules[path]
        w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
        m.weight, m.scales, m.biases = mx.quantize(w + mx.array(np.concatenate(deltas)), group_size=group, bits=bits)


def test_runtime_lora_on_2bit_base_keeps_the_adapter(base_sd, pt_a):
    lora = toolkit_lora(ARGS, seed=5, rank=RANK)
    model = mlx_model_from_toolkit(base_sd)
    nn.quantize(model, group_size=32, bits=2)
    deq = _dequantized_toolkit_sd(model, base_sd)
    expected, base_only = ref(deq, lora), ref(deq)
    load_adapter(model, pt_a, activate=True)
    runtime_error = np.abs(logits(model) - expected).max()
    assert runtime_error <= TOL
    with pytest.raises(AFMError, match="quantized base"):
        fuse_adapter(model)
    set_active_adapter(model, None)
    _requantize_fused(model, base_sd, lora)
    fused_error = np.abs(logits(model) - expected).max()
    effect = np.abs(expected - base_only).max()
    assert fused_error > 1000 * runtime_error and fused_error > 0.3 * effect, (fused_error, effect)


# ---- through the converter ----


def test_converted_base_adapter_and_draft_final_checkpoint(tmp_path):
    """`afm-mlx convert` of a base with a trained base_adapter and a toolkit draft-model-final.pt (every key,
    `model.` prefix, kv-quantizer buffers): the draft converts, and the base_adapter/ it writes loads as an adapter."""
    import afm_mlx
    from afm_mlx.converters import convert
    from afm_mlx.converters.synthetic import synthetic_dict
    from afm_mlx.presets import tiny_draft
    from tokenizer_fixture import build_tiny_tokenizer

    base, draft = tiny_base(vocab_size=512), tiny_draft(vocab_size=512, kv_quant=True)
    base_sd = synthetic_dict(base, seed=1, lora_rank=RANK, lora_nonzero=True)
    draft_sd = {"model." + k: v for k, v in synthetic_dict(draft, seed=2, draft=True, kv_quant=True).items()}
    save_checkpoint(tmp_path / "base-model.pt", base_sd.items(), tie={"output_transform.weight": "embedding.weight"})
    save_checkpoint(tmp_path / "draft-model-final.pt", draft_sd.items(),
                    tie={"model.output_transform.weight": "model.embedding.weight"})
    convert(base=tmp_path / "base-model.pt", draft=tmp_path / "draft-model-final.pt",
            tokenizer=build_tiny_tokenizer(tmp_path / "tok"), out=tmp_path / "out", bits=32, embedding_bits=32)
    model, _ = afm_mlx.load(tmp_path / "out", draft=True, adapter=tmp_path / "out" / "base_adapter")
    assert active_adapter(model) == "base_adapter"
    draft_ref = reference_forward({k[len("model."):]: v for k, v in draft_sd.items()}, TOKENS, draft.to_dict())
    assert np.abs(np.array(model.draft(mx.array(TOKENS)[None])[0]) - draft_ref).max() <= TOL
    base_ref = reference_forward(base_sd, TOKENS, base.to_dict(), lora_scale=0.5)
    assert np.abs(logits(model) - base_ref).max() <= TOL
