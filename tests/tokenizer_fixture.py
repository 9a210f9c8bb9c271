"""A tiny AFM-style SentencePiece tokenizer, trained in milliseconds, for tests that need a real tokenizer.

Same conventions as Apple's tokenizer.model: pad 0, an EOS, no BOS, the user-defined pieces `<turn_start>`,
`<turn_end>`, `<n>`, `<executable_start>`, `<executable_end>`, byte fallback for characters it never saw.
Identity normalization and kept whitespace (unless asked otherwise) so text round-trips exactly.

Use it from a test module:

    from tokenizer_fixture import tiny_tokenizer_dir  # noqa: F401  (registers the session fixture)

    def test_x(tiny_tokenizer_dir):  # a directory holding tokenizer.model
        tok = afm_mlx.tokenizer.load_tokenizer(tiny_tokenizer_dir)

or call `build_tiny_tokenizer(directory)` directly.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import sentencepiece as spm

SPECIAL_PIECES = ["<turn_start>", "<turn_end>", "<n>", "<executable_start>", "<executable_end>"]
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2

_CORPUS = """\
A conversation between a user and a helpful assistant.
Hello, how are you today? I am fine, thank you for asking.
The quick brown fox jumps over the lazy dog near the river bank.
The weather is nice today and the sun is shining over the hills.
Tools can be called with a function name and arguments written in json.
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
Numbers: 0 1 2 3 4 5 6 7 8 9, punctuation ; : , . ! ? ( ) [ ] { } < > = + - * / _ ' "
Tokyo is called 東京 and Japan is 日本. Café, naïve, über.
Please write a short poem about the sea, the wind and the stars.
system user assistant tool response format schema description
"""


def build_tiny_tokenizer(
    directory: str | Path, *, vocab_size: int = 400, remove_extra_whitespaces: bool = False,
    special_pieces: list[str] = SPECIAL_PIECES,
) -> Path:
    """Train the tiny tokenizer and write `directory/tokenizer.model`; returns that path. `special_pieces`: the
    user-defined pieces trained in (others may come from a toolkit tokenizer-config.json instead)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.splitlines() * 8),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        user_defined_symbols=special_pieces,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity" if not remove_extra_whitespaces else "nmt_nfkc",
        remove_extra_whitespaces=remove_extra_whitespaces,
        num_threads=1,
        minloglevel=2,
    )
    path = Path(directory) / "tokenizer.model"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A directory holding only the tiny tokenizer.model."""
    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(directory)
    return directory
