"""Adapter fixtures written from the spec, independently of afm_mlx's readers and exporter.

- `write_test_fmadapter`: a .fmadapter as the toolkit's `AdapterConverter` makes it (docs/format.md 3.4): keys with
  "adapter" in checkpoint order, cast to fp16, transposed, Q/K LoRA-B rows permuted with the toolkit's
  `view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2)`, then the MIL blob v2 layout byte by byte.
- `write_mlx_lm_adapter`: an adapter directory saved by mlx-lm's own afm7 LoRA layers (names from the converter's
  mapping, which is not the adapter reader's code).
"""

import json
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from afm_mlx.converters.mapping import map_toolkit_state_dict
from afm_mlx.converters.synthetic import synthetic_dict

SIGNATURE = "9799725ff8e851184037110b422d891ad3b92ec1"
TOKENS = np.array([3, 17, 200, 5, 5, 99, 42, 7, 128, 1, 250, 64])


def toolkit_lora(args, seed, rank, gain=1.0):
    """The LoRA tensors of a toolkit state dict, in state-dict order (B scaled by `gain` for a stronger effect)."""
    sd = synthetic_dict(args, seed=seed, kv_quant=args.kv_quant, lora_rank=rank, lora_nonzero=True)
    return {k: (v * np.float32(gain) if k.endswith("b_transpose") else v) for k, v in sd.items() if ".adapters." in k}


def _permute_qk(w, n_heads):
    dim1, dim2 = w.shape
    return w.reshape(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(0, 2, 1, 3).reshape(dim1, dim2)


def fmadapter_tensors(adapter_sd, args):
    """fp16 tensors in blob order, as the toolkit's AdapterConverter transforms them."""
    out = []
    for key, value in adapter_sd.items():
        if "adapter" not in key:
            continue
        w = np.asarray(value).astype(np.float16).T
        if key.endswith("lora_0.b_transpose") or ("segment_1" in key and "q_transform" in key
                                                   and key.endswith("b_transpose")):
            w = _permute_qk(w, args.num_heads)
        elif key.endswith("lora_1.b_transpose"):
            w = _permute_qk(w, args.num_kv_heads)
        out.append(np.ascontiguousarray(w))
    return out


def write_test_fmadapter(adapter_sd, args, directory, rank, *, signature=SIGNATURE, lora_rank=None, draft=False):
    path = Path(directory)
    path.mkdir(parents=True)
    blobs = fmadapter_tensors(adapter_sd, args)
    data = bytearray(struct.pack("<II", len(blobs), 2) + bytes(56))
    for blob in blobs:
        data_offset = len(data) + 64
        data += struct.pack("<IIQQ", 0xDEADBEEF, 1, blob.nbytes, data_offset) + bytes(40)
        data += blob.tobytes() + bytes(-blob.nbytes % 64)
    (path / "adapter_weights.bin").write_bytes(bytes(data))
    meta = {"adapterIdentifier": f"fmadapter-{path.stem}-{signature[:7]}", "author": "3P developer",
            "baseModelSignature": signature, "creatorDefined": {}, "description": "", "license": "",
            "loraRank": rank if lora_rank is None else lora_rank, "speculativeDecodingDraftTokenCount": 5}
    (path / "metadata.json").write_text(json.dumps(meta, sort_keys=True, indent=4))
    if draft:
        (path / "draft.mil").write_text("program(1.0) {}\n")
        (path / "draft_weights.bin").write_bytes(struct.pack("<II", 0, 2) + bytes(56))
    return path


def fp16_rounded(adapter_sd):
    return {k: np.asarray(v).astype(np.float16).astype(np.float32) for k, v in adapter_sd.items()}


def write_mlx_lm_adapter(base_model, args, base_sd, adapter_sd, directory, rank, scale=0.5):
    """Save an adapter with mlx-lm's afm7 LoRA layers; returns the mlx-lm model (LoRA applied) for cross-checks."""
    from mlx_lm.models import afm7
    from mlx_lm.tuner.utils import linear_to_lora_layers

    theirs = afm7.Model(afm7.ModelArgs.from_dict(args.to_dict()))
    theirs.load_weights(tree_flatten(base_model.parameters()), strict=True)
    theirs.freeze()
    linear_to_lora_layers(theirs, len(theirs.layers), {"rank": rank, "scale": scale, "dropout": 0.0})
    full = {**base_sd, **adapter_sd}
    mapped = map_toolkit_state_dict(full)
    theirs.update(tree_unflatten([(n, mx.array(mapped.load(n, full))) for n in mapped.lora]))
    path = Path(directory)
    path.mkdir(parents=True)
    mx.save_safetensors(str(path / "adapters.safetensors"), dict(tree_flatten(theirs.trainable_parameters())))
    config = {"fine_tune_type": "lora", "num_layers": len(theirs.layers),
              "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0}}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=4))
    return theirs
