"""The toolkit's `tokenizer-config.json`, applied to `tokenizer.model` as tamm's AFMTokenizer does at load time.

The toolkit never uses tokenizer.model alone: `load_tokenizer()` (examples/utils.py) builds the tokenizer from
assets/tokenizer-config.json, a tamm JSON object whose tokenizer arguments may
- append `user_defined_tokens`: each a USER_DEFINED piece with score 0, after the existing pieces, in order;
- pad to `pad_vocab_size_to` pieces with `<extra_id_N>` pieces, N counting down to 0, after those tokens;
- set `extra_properties` on the tokenizer (such as `eot_id`, the id generation stops on besides EOS).
If the special pieces `<turn_start>`, `<turn_end>`, `<n>` come that way, tokenizer.model alone lacks them. We have
not seen Apple's file, so the arguments are looked for at the top level and in any object one level down (the
tamm type tag and other keys are ignored); the converter writes the extended tokenizer.model and records
`eot_id` in tokenizer_config.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afm_mlx.errors import AFMError
from afm_mlx.jsonfile import read_json

CONFIG_NAME = "tokenizer-config.json"
_FIELDS = ("user_defined_tokens", "pad_vocab_size_to", "extra_properties")
MAX_VOCAB = 1 << 21  # as config.json's vocab_size limit
USER_DEFINED = 4  # SentencePiece's ModelProto.SentencePiece.Type.USER_DEFINED


@dataclass
class TokenizerExtension:
    user_defined_tokens: list[str] = field(default_factory=list)
    pad_vocab_size_to: int | None = None
    extra_properties: dict[str, Any] = field(default_factory=dict)

    @property
    def eot_id(self) -> int | None:
        return self.extra_properties.get("eot_id")


def _arguments(data: Any) -> dict[str, Any]:
    """The object holding the tokenizer arguments: the top level, or the one nested object that has them."""
    if not isinstance(data, dict):
        raise AFMError(f"{CONFIG_NAME} must hold a JSON object, got {type(data).__name__}")
    if any(k in data for k in _FIELDS):
        return data
    nested = [v for v in data.values() if isinstance(v, dict) and any(k in v for k in _FIELDS)]
    if len(nested) > 1:
        raise AFMError(f"{CONFIG_NAME}: tokenizer arguments in {len(nested)} places; cannot tell which apply")
    return nested[0] if nested else {}


def read_tokenizer_extension(path: str | Path) -> TokenizerExtension:
    args = _arguments(read_json(path))
    tokens = args.get("user_defined_tokens") or []
    if not isinstance(tokens, list) or not all(isinstance(t, str) and t for t in tokens):
        raise AFMError(f"{path}: user_defined_tokens must be a list of non-empty strings")
    pad = args.get("pad_vocab_size_to")
    if pad is not None and (type(pad) is not int or not 0 < pad <= MAX_VOCAB):
        raise AFMError(f"{path}: pad_vocab_size_to must be an integer in 1..{MAX_VOCAB}, got {repr(pad)[:40]}")
    extra = args.get("extra_properties") or {}
    if not isinstance(extra, dict):
        raise AFMError(f"{path}: extra_properties must be an object")
    eot = extra.get("eot_id")
    if eot is not None and (type(eot) is not int or not 0 <= eot < MAX_VOCAB):
        raise AFMError(f"{path}: extra_properties.eot_id must be a token id, got {repr(eot)[:40]}")
    return TokenizerExtension(tokens, pad, extra)


def extend(sp, extension: TokenizerExtension, source: str = CONFIG_NAME):
    """A SentencePieceProcessor with the extension's pieces appended (tamm's SentencePieceTokenizer.__init__)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    added = list(extension.user_defined_tokens)
    if extension.pad_vocab_size_to is not None:  # a target below the size adds nothing, as range() of it in tamm
        count = extension.pad_vocab_size_to - sp.get_piece_size() - len(added)
        added += [f"<extra_id_{i}>" for i in reversed(range(count))]
    if not added:
        return sp
    proto = model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    for token in added:
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token, 0.0, USER_DEFINED
    extended = spm.SentencePieceProcessor()
    try:
        extended.LoadFromSerializedProto(proto.SerializeToString())
    except RuntimeError as err:  # e.g. a token that is already a piece
        raise AFMError(f"{source}: cannot add its tokens to tokenizer.model ({str(err).splitlines()[0]})") from None
    return extended


def check_eot(sp, extension: TokenizerExtension, source: str = CONFIG_NAME) -> None:
    eot = extension.eot_id
    if eot is not None and eot >= sp.get_piece_size():
        raise AFMError(f"{source}: eot_id {eot} is outside the tokenizer's {sp.get_piece_size()} pieces")
