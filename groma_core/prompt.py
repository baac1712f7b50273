"""Prompt building and tokenization with the reference's rules.

:class:`GromaTokenizer` wraps a base text tokenizer (a SentencePiece model, or any Hugging Face tokenizer) and adds
Groma's 114 new tokens after its vocabulary. It reproduces the transformers-4.32 slow LLaMA tokenizer that the
released weights were trained with: every new token is a no-split token with the whitespace on both sides of it
stripped, each text chunk between tokens is encoded separately (with its own SentencePiece dummy prefix), and the
base special tokens (``<s>``, ``</s>``, ``<unk>``) split the text without stripping.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from groma_core import tokens as T


class TextCodec(Protocol):
    """The base tokenizer under :class:`GromaTokenizer`."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    special_tokens: dict[str, int]  # text -> id of the base tokenizer's own special tokens

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, directory: Path) -> None: ...


class SentencePieceCodec:
    """A SentencePiece model file (LLaMA's ``tokenizer.model``)."""

    FILE = "tokenizer.model"

    def __init__(self, model_file: str | Path):
        import sentencepiece as spm

        self.path = Path(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.special_tokens = {}
        for idx in (self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()):
            if idx >= 0:
                self.special_tokens[self.sp.id_to_piece(idx)] = idx

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        if not ids:
            return ""
        text = self.sp.decode(ids)
        return " " + text if self.sp.id_to_piece(ids[0]).startswith("\u2581") else text

    def save(self, directory: Path) -> None:
        (directory / self.FILE).write_bytes(self.path.read_bytes())


class HFTokenizerCodec:
    """Any Hugging Face tokenizer (``AutoTokenizer.from_pretrained`` on a local directory, or an object)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.vocab_size = len(tokenizer)
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.special_tokens = {t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        if not ids:
            return ""
        text = self.tok.decode(ids)
        first = self.tok.convert_ids_to_tokens(ids[0])
        if isinstance(first, str) and first[:1] in ("\u2581", "\u0120") and not text.startswith(" "):
            text = " " + text
        return text

    def save(self, directory: Path) -> None:
        self.tok.save_pretrained(str(directory))


class GromaTokenizer:
    """Text <-> ids with Groma's new tokens appended after the base vocabulary (``[PAD]`` first, ``<r99>`` last)."""

    def __init__(self, codec: TextCodec, new_tokens: Sequence[str] = T.NEW_TOKENS):
        self.codec = codec
        self.offset = codec.vocab_size
        self.new_tokens = tuple(new_tokens)
        self._new_ids = {tok: self.offset + i for i, tok in enumerate(self.new_tokens)}
        self._id_to_new = {i: tok for tok, i in self._new_ids.items()}
        self._base_special = dict(codec.special_tokens)
        splitters = sorted(list(self._new_ids) + list(self._base_special), key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(s) for s in splitters) + ")")
        self.region_ids = [self._new_ids[T.region_token(k)] for k in range(T.MAX_REGIONS)]

    # -- vocabulary ------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.offset + len(self.new_tokens)

    @property
    def pad_id(self) -> int:
        return self._new_ids[T.PAD]

    @property
    def bos_id(self) -> int | None:
        return self.codec.bos_id

    @property
    def eos_id(self) -> int | None:
        return self.codec.eos_id

    def token_id(self, token: str) -> int:
        """Id of a new token (``<image>``, ``<r3>``...) or of a base special token (``</s>``)."""
        if token in self._new_ids:
            return self._new_ids[token]
        if token in self._base_special:
            return self._base_special[token]
        raise KeyError(f"{token!r} is not a Groma token or a special token of the base tokenizer")

    def region_index(self, token_id: int) -> int | None:
        """K for the id of ``<rK>``, else None."""
        k = token_id - self.region_ids[0]
        return k if 0 <= k < T.MAX_REGIONS else None

    def is_new_token(self, token_id: int) -> bool:
        return token_id in self._id_to_new

    # -- encoding --------------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Ids of ``text`` as the reference's tokenizer gives them (see the module docstring)."""
        parts = [p for p in self._split.split(text)]
        for i, part in enumerate(parts):
            if part in self._new_ids:  # strip whitespace around new tokens
                if i > 0 and parts[i - 1] not in self._new_ids and parts[i - 1] not in self._base_special:
                    parts[i - 1] = parts[i - 1].rstrip()
                if i + 1 < len(parts) and parts[i + 1] not in self._new_ids:
                    parts[i + 1] = parts[i + 1].lstrip()
        ids: list[int] = [self.codec.bos_id] if add_bos and self.codec.bos_id is not None else []
        for part in parts:
            if not part:
                continue
            if part in self._new_ids:
                ids.append(self._new_ids[part])
            elif part in self._base_special:
                ids.append(self._base_special[part])
            else:
                ids.extend(self.codec.encode(part))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; like the reference, tokens and text chunks are joined with single spaces."""
        chunks: list[str] = []
        text_ids: list[int] = []
        specials = set(self._base_special.values())

        def flush() -> None:
            if text_ids:
                chunks.append(self.codec.decode(text_ids).strip())
                text_ids.clear()

        for i in ids:
            i = int(i)
            if i in self._id_to_new or i in specials:
                flush()
                if not skip_special_tokens:
                    chunks.append(self._id_to_new.get(i) or next(k for k, v in self._base_special.items() if v == i))
            else:
                text_ids.append(i)
        flush()
        return " ".join(c for c in chunks if c)

    def decode_text(self, ids: Sequence[int]) -> str:
        """Plain text of ids that contain no special token, keeping a leading space where the first piece has one."""
        return self.codec.decode([int(i) for i in ids])

    # -- persistence -----------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write the base tokenizer's files and ``groma_tokens.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.codec.save(directory)
        (directory / "groma_tokens.json").write_text(
            json.dumps({"offset": self.offset, "new_tokens": list(self.new_tokens)}, indent=1)
        )

    @classmethod
    def from_directory(cls, directory: str | Path) -> GromaTokenizer:
        """Load from a directory holding ``tokenizer.model`` (SentencePiece) or Hugging Face tokenizer files."""
        directory = Path(directory)
        if (directory / SentencePieceCodec.FILE).is_file():
            codec: TextCodec = SentencePieceCodec(directory / SentencePieceCodec.FILE)
        else:
            from transformers import AutoTokenizer

            codec = HFTokenizerCodec(AutoTokenizer.from_pretrained(str(directory), local_files_only=True))
        return cls(codec)


# -- conversation templates ----------------------------------------------------------------------------------
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_TURN = f"Here is an image with region crops from it. Image: {T.IMAGE}. Regions: {T.REGION}."
IMAGE_TURN_REPLY = "Thank you for the image! How can I assist you with it?"


@dataclass(frozen=True)
class Template:
    """A two-role conversation template (the reference's ``SeparatorStyle.TWO``)."""

    name: str
    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str

    def render(self, turns: Sequence[tuple[str, str | None]], with_image_turn: bool = True) -> str:
        """The prompt for ``turns`` = [(user, assistant-or-None), ...]; a None answer ends the prompt there."""
        messages: list[str | None] = []
        if with_image_turn:
            messages += [IMAGE_TURN, IMAGE_TURN_REPLY]
        for user, assistant in turns:
            messages += [user, assistant]
        seps = (self.sep, self.sep2)
        out = self.system + seps[0]
        for i, msg in enumerate(messages):
            role = self.roles[i % 2]
            if msg is None:
                out += role + ":"
                break
            out += role + ": " + msg + seps[i % 2]
        return out


TEMPLATES: dict[str, Template] = {
    "llava": Template("llava", SYSTEM, ("USER", "ASSISTANT"), " ", "</s>"),
    "default": Template("default", SYSTEM, ("USER", "ASSISTANT"), " ", " "),
}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(f"unknown conversation template {name!r}; available: {sorted(TEMPLATES)}") from None
