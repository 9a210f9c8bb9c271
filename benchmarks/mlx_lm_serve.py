"""mlx-lm's own server (`mlx_lm.server`) on the demo family's weights, for serve_bench.py to compare against.

    python benchmarks/mlx_lm_serve.py --port 8090 [other mlx_lm.server flags]

Harness-only, as the bench does for mlx-lm's generate: mlx-lm 0.32's `afm7` holding the very same weight arrays
(afm_mlx.bench.engines.mlx_lm_mirror, with its patches kept on for the server's lifetime), and a small
SentencePiece shim in place of a Hugging Face tokenizer (the demo has none), and a listen backlog that takes 32
clients connecting at once. /v1/completions only.
"""

from __future__ import annotations

import sys

import afm_mlx
from afm_mlx.bench.engines import mlx_lm_mirror, mlx_lm_patches


class SentencePieceShim:
    """What mlx-lm's TokenizerWrapper and server call on a Hugging Face tokenizer, over afm_mlx's tokenizer."""

    chat_template = None

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.vocab_size = tokenizer.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True, **_) -> list[int]:
        return self.tok.encode_prompt(text, raw=True) if add_special_tokens else self.tok.encode(text)

    def decode(self, ids, **_) -> str:
        return self.tok.decode([int(i) for i in ids])

    def get_vocab(self) -> dict[str, int]:
        return {self.tok.id_to_piece(i): i for i in range(self.vocab_size)}

    def apply_chat_template(self, messages, **_):
        return self.tok.encode_prompt(list(messages))

    def convert_ids_to_tokens(self, ids):
        return [self.tok.id_to_piece(int(i)) for i in ids]


def main() -> None:
    from mlx_lm import server
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    model, tokenizer = afm_mlx.load(draft=False)
    theirs = mlx_lm_mirror(model)
    wrapper = TokenizerWrapper(SentencePieceShim(tokenizer), eos_token_ids=sorted(tokenizer.stop_ids))
    mlx_lm_patches().__enter__()  # kept on until the process exits
    server.load = lambda *args, **kwargs: (theirs, wrapper, {})
    server.load_processor = lambda *args, **kwargs: None
    # http.server listens with a backlog of 5: 32 clients connecting at once get connection resets
    server.ThreadingHTTPServer.request_queue_size = 128
    sys.argv = ["mlx_lm.server", "--model", "afm-demo", *sys.argv[1:]]
    server.main()


if __name__ == "__main__":
    main()
