"""Tokenizer (the `tokenizers` library) and the chat layout Ming-UniVision expects.

A prompt turn is "<role>HUMAN</role>" + content + "<role>ASSISTANT</role>"; an image in the content is
"<image>" + n x "<imagePatch>" + "</image>\\n". The tiny model ships a byte-level tokenizer whose
special tokens sit at the tiny config's ids.
"""
from __future__ import annotations

from pathlib import Path

from models.config import ModelConfig

USER_PREFIX, ASSISTANT_PREFIX = "<role>HUMAN</role>", "<role>ASSISTANT</role>"
IMAGE_START, IMAGE_PATCH, IMAGE_END, EOS = "<image>", "<imagePatch>", "</image>", "<|endoftext|>"
TINY_ASSET = Path(__file__).parent / "assets" / "tiny_tokenizer.json"
TINY_SPECIAL = {USER_PREFIX: 490, ASSISTANT_PREFIX: 492, IMAGE_START: 500, IMAGE_PATCH: 501, IMAGE_END: 502, EOS: 503}


def make_tiny_tokenizer():
    """Byte-level BPE without merges (ids 0-255 are bytes) plus the special tokens at their tiny ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for tok, i in TINY_SPECIAL.items():
        vocab[tok] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(TINY_SPECIAL))
    return tok


class ChatTokenizer:
    def __init__(self, tokenizer, cfg: ModelConfig):
        self.tok, self.cfg = tokenizer, cfg
        self.user_prefix = tuple(cfg.tokens.user_prefix) or tuple(self.encode(USER_PREFIX))
        self.assistant_prefix = tuple(cfg.tokens.assistant_prefix) or tuple(self.encode(ASSISTANT_PREFIX))

    @classmethod
    def from_file(cls, path: str | Path, cfg: ModelConfig) -> "ChatTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)), cfg)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def image_tokens(self, n: int) -> list[int]:
        t = self.cfg.tokens
        return [t.image_start, *([t.image_patch] * n), t.image_end, *self.encode("\n")]

    def turn(self, text: str, image_tokens: int | None = None) -> list[int]:
        """One user turn: prefix, optional image slots, text, assistant prefix."""
        body = self.image_tokens(image_tokens) if image_tokens else []
        return [*self.user_prefix, *body, *self.encode(text), *self.assistant_prefix]

    def image_ids(self) -> list[int]:
        t = self.cfg.tokens
        return [t.image_start, t.image_patch, t.image_end]
