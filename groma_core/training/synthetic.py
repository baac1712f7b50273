"""Synthetic text for language models trained from scratch: the in-context lookups Groma needs, without images.

Groma answers "where is X" with the index token ``<rK>`` that precedes the matching region in
``<r0>[region 0]<r1>[region 1]...``. Vicuna brings the heads that do such lookups (copy the previous token into a
position, find the position that matches a phrase, read what was copied there) from its pretraining on text; a
small language model initialised at random does not have them and, measured with ``benchmarks/binding_probe.py``,
does not grow them from Groma's data alone in thousands of steps. A ``text`` stage on the ``recall`` format gives it
that pretraining first (the analogue of starting from Vicuna). Each sample is one of:

* copying: 20 random words, then each of them again (shuffled) followed by the word that came before it; every
  answer is supervised. This is what makes the lookup heads appear (about 1,400 steps at batch 32 for the embedded
  model's size).
* region binding: the reference's conversation with its fixed first turn, where ``<region>`` expands to
  ``<r0> w0 <r1> w1 ...`` (one random word standing for each region), then REC turns with the reference's
  instructions, ``Locate <p>wK</p> in the image.`` -> ``<roi><rK></roi>``, masked as the REC dataset is.

Words are ordinary pieces of the tokenizer (no special, byte or Groma token). Samples are drawn from the global
generators, which the engine seeds per sample, so a run repeats exactly.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from groma_core import tokens as T
from groma_core.data.instructions import REC_INSTRUCTIONS
from groma_core.training.datasets import render_conversation

COPY_WORDS = 20  #: words of a copying sample


def ordinary_ids(tokenizer) -> list[int]:
    """Ids of the base vocabulary that are ordinary text pieces: no special token, no SentencePiece byte, control or
    unknown piece, none of Groma's new tokens."""
    codec = tokenizer.codec
    special = set(codec.special_tokens.values())
    sp = getattr(codec, "sp", None)
    out = []
    for i in range(codec.vocab_size):
        if i in special:
            continue
        if sp is not None and (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i)):
            continue
        out.append(i)
    if len(out) < 2 * COPY_WORDS:
        raise ValueError(f"the tokenizer has {len(out)} ordinary pieces; synthetic text needs {2 * COPY_WORDS}")
    return out


class RecallDataset(torch.utils.data.Dataset):
    """``size`` synthetic samples (``input_ids``, ``labels``; no image) for a ``text`` stage; see the module."""

    def __init__(
        self,
        tokenizer,
        size: int,
        regions: int = 16,
        queries: int = 8,
        copy_fraction: float = 0.5,
        template: str = "llava",
        name: str | None = None,
    ):
        if not 1 <= regions <= T.MAX_REGIONS:
            raise ValueError(f"regions: {regions} is not between 1 and {T.MAX_REGIONS}")
        self.tokenizer, self.size, self.regions, self.queries = tokenizer, int(size), int(regions), int(queries)
        self.copy_fraction, self.template, self.name = float(copy_fraction), template, name or "recall"
        self.words = ordinary_ids(tokenizer)
        self.region_id = tokenizer.token_id(T.REGION)
        self.placeholder = tokenizer.token_id(T.REFER_FEAT)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.size:
            raise IndexError(i)
        if random.random() < self.copy_fraction:
            return self.copying()
        return self.binding()

    def copying(self) -> dict[str, Any]:
        seq = random.sample(self.words, COPY_WORDS)
        ids = [self.tokenizer.bos_id] + seq
        labels = [-100] * len(ids)
        order = list(range(1, COPY_WORDS))
        random.shuffle(order)
        for j in order:
            ids += [seq[j], seq[j - 1]]
            labels += [-100, seq[j - 1]]
        return {"input_ids": ids, "labels": labels}

    def binding(self) -> dict[str, Any]:
        tok = self.tokenizer
        n = random.randint(1, self.regions)
        content = random.sample(self.words, n)
        asked = [random.randrange(n) for _ in range(self.queries)]
        # the phrase is the region's word itself: rendered as a placeholder, then the word's id put in its place
        phrase = T.P_OPEN + T.REFER_FEAT + T.P_CLOSE
        turns = [
            (random.choice(REC_INSTRUCTIONS).format(phrase), T.ROI_OPEN + T.region_token(k) + T.ROI_CLOSE)
            for k in asked
        ]
        ids, labels = render_conversation(tok, self.template, turns)
        words = iter(content[k] for k in asked)
        ids = [next(words) if x == self.placeholder else x for x in ids]
        at = ids.index(self.region_id)
        listing = [x for k in range(n) for x in (tok.region_ids[k], content[k])]
        ids = ids[:at] + listing + ids[at + 1 :]
        labels = labels[:at] + [-100] * len(listing) + labels[at + 1 :]
        return {"input_ids": ids, "labels": labels}
