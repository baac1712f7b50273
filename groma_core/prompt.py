"""Prompt building and tokenization with the reference's rules.

:class:`GromaTokenizer` wraps a base text tokenizer (a SentencePiece model, or any Hugging Face tokenizer) and adds
Groma's 114 new tokens after its vocabulary. It reproduces the transformers-4.32 slow LLaMA tokenizer that the
released weights were trained with: every new token is a no-split token with the whitespace on both sides of it
stripped, each text chunk between tokens is encoded separately (with its own SentencePiece dummy prefix), and the
base special tokens (``<s>``, ``</s>``, ``<unk>``) split the text without stripping.

That is the ``legacy=True`` tokenizer. A ``tokenizer_config.json`` with ``"legacy": false`` (Vicuna v1.5's, from
which Groma's tokenizer was made, most probably has it; :meth:`GromaTokenizer.from_directory` reads it) changes
three things in transformers 4.32, which ``GromaTokenizer(legacy=False)`` reproduces:

* every ``"▁"`` in the text becomes a space and one ``"▁"`` is put in front of the text (before splitting, so
  it is never stripped); when the first chunk is then that ``"▁"`` alone (the text starts with a token, or with
  spaces a new token strips) and the next token is ``<s>``, ``</s>``, ``<unk>`` or ``[PAD]`` (transformers'
  special tokens), the ``"▁"`` is dropped; before Groma's other tokens it stays, a piece of its own;
* the SentencePiece model runs without its dummy prefix, so a chunk gets a leading ``"▁"`` only from a space that
  survived (the text's first chunk, or the text after a base special token, which strips nothing);
* a chunk is encoded as ``"<unk>" + chunk`` with the pieces of ``"<unk>"`` cut off again: when the chunk's first
  characters merge with the ``">"`` of ``"<unk>"`` (``">>"``), they are lost.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from groma_core import tokens as T
from groma_core.errors import CheckpointError, one_line


class TextCodec(Protocol):
    """The base tokenizer under :class:`GromaTokenizer`.

    A codec for ``legacy=False`` also has ``encode_unprefixed(text) -> list[int]``: the ids of ``text`` encoded
    without SentencePiece's dummy prefix the way transformers 4.32 does it (see :class:`SentencePieceCodec`).
    """

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    special_tokens: dict[str, int]  # text -> id of the base tokenizer's own special tokens

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, directory: Path) -> None: ...


#: a protobuf field ``normalizer_spec { add_dummy_prefix: false }``; appended to a serialized ``ModelProto`` it is
#: merged into the model's normalizer spec (what transformers 4.32 does with ``MergeFrom`` for ``legacy=False``)
NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"


class SentencePieceCodec:
    """A SentencePiece model file (LLaMA's ``tokenizer.model``)."""

    FILE = "tokenizer.model"

    def __init__(self, model_file: str | Path):
        import sentencepiece as spm

        self.path = Path(model_file)
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot read the tokenizer model ({exc.strerror or exc})") from None
        if not data:
            raise CheckpointError(f"{self.path}: the tokenizer model is empty (0 bytes)")
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=data)
        except Exception as exc:  # noqa: BLE001 - sentencepiece raises RuntimeError or others on a damaged model
            raise CheckpointError(
                f"{self.path}: not a SentencePiece model ({one_line(exc, 200)}); give the tokenizer.model that "
                "belongs to the model"
            ) from None
        if self.sp.get_piece_size() <= 0 or self.sp.unk_id() < 0:
            raise CheckpointError(f"{self.path}: the SentencePiece model has no vocabulary")
        self._sp_unprefixed: spm.SentencePieceProcessor | None = None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.special_tokens = {}
        for idx in (self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()):
            if idx >= 0:
                self.special_tokens[self.sp.id_to_piece(idx)] = idx

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def encode_unprefixed(self, text: str) -> list[int]:
        """Ids of ``text`` as transformers 4.32's ``LlamaTokenizer(legacy=False)`` encodes a chunk: the model with
        ``add_dummy_prefix`` off encodes ``"<unk>" + text`` and the pieces that ``"<unk>"`` alone gives are dropped."""
        if self._sp_unprefixed is None:
            import sentencepiece as spm

            self._sp_unprefixed = spm.SentencePieceProcessor(
                model_proto=self.sp.serialized_model_proto() + NO_DUMMY_PREFIX
            )
        unk = self.sp.id_to_piece(self.sp.unk_id())
        return list(self._sp_unprefixed.encode(unk + text))[len(self._sp_unprefixed.encode(unk)) :]

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


#: the file :meth:`GromaTokenizer.save` writes beside the base tokenizer's files
GROMA_TOKENS_FILE = "groma_tokens.json"


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``; empty when there is no such file."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON file ({one_line(exc, 200)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


class GromaTokenizer:
    """Text <-> ids with Groma's new tokens appended after the base vocabulary (``[PAD]`` first, ``<r99>`` last).

    ``legacy``: True tokenizes like transformers 4.32's slow ``LlamaTokenizer(legacy=True)``, False like
    ``legacy=False`` (see the module docstring; needs a codec with ``encode_unprefixed``). ``offset``: the id of
    ``[PAD]``, the first new token; by default the base vocabulary size. Give it when the language model's embedding
    table has more rows than the base tokenizer has tokens (Qwen2: 151936 rows for 151665 tokens); the ids between
    the two are then never produced and decode to nothing.
    """

    def __init__(
        self,
        codec: TextCodec,
        new_tokens: Sequence[str] = T.NEW_TOKENS,
        *,
        legacy: bool = True,
        offset: int | None = None,
    ):
        self.codec = codec
        self.offset = codec.vocab_size if offset is None else int(offset)
        if self.offset < codec.vocab_size:
            raise ValueError(
                f"offset: {self.offset} would give new tokens ids inside the base vocabulary; it must be at least the "
                f"base vocabulary size {codec.vocab_size}"
            )
        self.legacy = bool(legacy)
        self._encode_unprefixed = getattr(codec, "encode_unprefixed", None)
        if not self.legacy and self._encode_unprefixed is None:
            raise ValueError(
                f"legacy=False needs a SentencePiece model (a codec with encode_unprefixed); "
                f"{type(codec).__name__} has none"
            )
        # legacy=False: the ids of a first chunk that is only the "\u2581" put in front of the text
        self._lone_prefix = None if self.legacy else self._encode_unprefixed("\u2581")
        self.new_tokens = tuple(new_tokens)
        self._new_ids = {tok: self.offset + i for i, tok in enumerate(self.new_tokens)}
        self._id_to_new = {i: tok for tok, i in self._new_ids.items()}
        self._base_special = dict(codec.special_tokens)
        # transformers' all_special_tokens (bos, eos, unk, pad): a leading lone "\u2581" before them is dropped
        self._special_after_prefix = set(self._base_special) | ({T.PAD} & set(self.new_tokens))
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
        if not self.legacy and text:
            text = "\u2581" + text.replace("\u2581", " ")
        parts = self._split.split(text)
        for i, part in enumerate(parts):
            if part in self._new_ids:  # strip whitespace around new tokens
                if i > 0 and parts[i - 1] not in self._new_ids and parts[i - 1] not in self._base_special:
                    parts[i - 1] = parts[i - 1].rstrip()
                if i + 1 < len(parts) and parts[i + 1] not in self._new_ids:
                    parts[i + 1] = parts[i + 1].lstrip()
        pieces: list[tuple[str | None, list[int]]] = []  # (token text, or None for a text chunk; its ids)
        for part in parts:
            if not part:
                continue
            if part in self._new_ids:
                pieces.append((part, [self._new_ids[part]]))
            elif part in self._base_special:
                pieces.append((part, [self._base_special[part]]))
            elif self.legacy:
                pieces.append((None, self.codec.encode(part)))
            else:
                pieces.append((None, self._encode_unprefixed(part)))
        if (
            self._lone_prefix is not None
            and len(self._lone_prefix) == 1
            and len(pieces) > 1
            and pieces[0] == (None, self._lone_prefix)
            and pieces[1][0] in self._special_after_prefix
        ):
            del pieces[0]
        ids: list[int] = [self.codec.bos_id] if add_bos and self.codec.bos_id is not None else []
        for _, piece_ids in pieces:
            ids.extend(piece_ids)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; like the reference, tokens and text chunks are joined with single spaces. Ids that name
        no token (between the base vocabulary and ``offset``, or outside the vocabulary) decode to nothing."""
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
            elif 0 <= i < self.codec.vocab_size:
                text_ids.append(i)
        flush()
        return " ".join(c for c in chunks if c)

    def decode_text(self, ids: Sequence[int]) -> str:
        """Plain text of ids that contain no special token, keeping a leading space where the first piece has one.

        With ``legacy=False`` the text after a new token was encoded without its leading space; the text of such
        ids gets one back (as the reference's decoding puts a space after every new token)."""
        text = self.codec.decode([int(i) for i in ids if 0 <= int(i) < self.codec.vocab_size])
        if not self.legacy and text and not text[0].isspace():
            text = " " + text
        return text

    # -- persistence -----------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write the base tokenizer's files and ``groma_tokens.json`` (offset, new tokens, legacy) into
        ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.codec.save(directory)
        (directory / GROMA_TOKENS_FILE).write_text(
            json.dumps({"offset": self.offset, "new_tokens": list(self.new_tokens), "legacy": self.legacy}, indent=1)
        )

    @classmethod
    def from_directory(
        cls, directory: str | Path, *, legacy: bool | None = None, offset: int | None = None
    ) -> GromaTokenizer:
        """Load from a directory holding ``tokenizer.model`` (SentencePiece) or Hugging Face tokenizer files.

        ``legacy`` and ``offset`` not given are read from ``groma_tokens.json`` (written by :meth:`save`) when
        present; ``legacy`` else from the ``"legacy"`` of ``tokenizer_config.json`` for a SentencePiece model (absent
        or null: True, as transformers 4.32). A Hugging Face tokenizer applies its own settings to each text chunk.
        """
        directory = Path(directory)
        saved = _read_json(directory / GROMA_TOKENS_FILE)
        new_tokens = saved.get("new_tokens", T.NEW_TOKENS)
        if not isinstance(new_tokens, (list, tuple)) or not all(isinstance(t, str) for t in new_tokens):
            raise CheckpointError(f"{directory / GROMA_TOKENS_FILE}: new_tokens must be a list of strings")
        missing = [t for t in T.NEW_TOKENS if t not in new_tokens]
        if missing:
            raise CheckpointError(
                f"{directory / GROMA_TOKENS_FILE}: new_tokens lacks {len(missing)} of Groma's tokens "
                f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''})"
            )
        if "offset" in saved and (isinstance(saved["offset"], bool) or not isinstance(saved["offset"], int)):
            raise CheckpointError(f"{directory / GROMA_TOKENS_FILE}: offset must be a whole number")
        offset = saved.get("offset") if offset is None else offset
        if (directory / SentencePieceCodec.FILE).is_file():
            codec: TextCodec = SentencePieceCodec(directory / SentencePieceCodec.FILE)
            if legacy is None:
                legacy = saved.get("legacy", _read_json(directory / "tokenizer_config.json").get("legacy"))
        else:
            from transformers import AutoTokenizer

            codec = HFTokenizerCodec(AutoTokenizer.from_pretrained(str(directory), local_files_only=True))
            if legacy is None:
                legacy = saved.get("legacy")
        return cls(codec, new_tokens, legacy=True if legacy is None else bool(legacy), offset=offset)


def max_positions(backbone: object) -> int | None:
    """The longest sequence (in tokens, prompt expanded) a language backbone takes: its ``max_positions``
    attribute when it has one, else the ``max_position_embeddings`` (or ``n_positions``) of the configuration of its
    Hugging Face model ``llm``; None when it states none."""
    value = getattr(backbone, "max_positions", None)
    if value is None:
        config = getattr(getattr(backbone, "llm", None), "config", None)
        value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


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


def make_sentencepiece(
    directory: str | Path,
    vocab_size: int = 400,
    text: str = "",
    *,
    lines: list[str] | None = None,
    repeat: int = 4,
    model_type: str = "bpe",
    **options: Any,
) -> Path:
    """Train a small LLaMA-style SentencePiece model (unk 0, bos 1, eos 2, byte fallback, no normalisation) into
    ``directory/tokenizer.model``. ``lines`` (default: the lines of ``text``) are fed ``repeat`` times; ``options``
    are passed to the trainer as they are (e.g. ``split_digits=True, num_threads=1``)."""
    import io

    import sentencepiece as spm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter((lines if lines is not None else text.splitlines()) * repeat),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        remove_extra_whitespaces=False,  # as LLaMA's tokenizer.model
        normalization_rule_name="identity",
        character_coverage=1.0,
        minloglevel=2,
        **options,
    )
    path = directory / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path
