"""Parsing generated ids into a :class:`~groma_core.types.GroundedAnswer`.

The grammar the model writes: ``<p>phrase</p><roi><rK>[<rK>...]</roi>``; a ``<roi>...</roi>`` may also stand
alone (a referring-expression answer). The parser is lenient: unclosed tags, ``<rK>`` beyond the number of
regions, stray tags and ids outside the tokenizer's vocabulary (a language model whose output layer is wider than
its tokenizer) give warnings in the answer, never an exception.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from groma_core import tokens as T
from groma_core.prompt import GromaTokenizer
from groma_core.types import GroundedAnswer, GroundedPhrase


def parse_grounded(
    ids: Sequence[int],
    tokenizer: GromaTokenizer,
    regions: Tensor,
    image_size: tuple[int, int] | None = None,
    region_scores: Tensor | None = None,
) -> GroundedAnswer:
    """Turn generated ids (new tokens only) into clean text and grounded phrases.

    ``regions``: (N, 4) normalized xyxy, the regions ``<rK>`` indexes. ``image_size``: (width, height) of the
    original image, for boxes in pixels.
    """
    ids = [int(i) for i in ids]
    tid = tokenizer.token_id
    p_open, p_close, roi_open, roi_close = tid(T.P_OPEN), tid(T.P_CLOSE), tid(T.ROI_OPEN), tid(T.ROI_CLOSE)
    eos = tokenizer.eos_id
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    warnings: list[str] = []
    unknown = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
    if unknown:
        warnings.append(
            f"{len(unknown)} id(s) outside the tokenizer's vocabulary of {tokenizer.vocab_size} were dropped "
            f"(e.g. {unknown[0]})"
        )
        ids = [i for i in ids if 0 <= i < tokenizer.vocab_size]
    regions = regions.detach().float().cpu()
    width, height = image_size if image_size else (1, 1)
    phrases: list[GroundedPhrase] = []
    text = ""
    chunk: list[int] = []
    phrase_start: int | None = None  # character offset of an open <p>
    pending: tuple[str, tuple[int, int]] | None = None  # a closed phrase waiting for its <roi>
    in_roi = False
    roi_ids: list[int] = []

    def flush_text() -> None:
        nonlocal text
        if chunk:
            piece = tokenizer.decode_text(chunk)
            text += piece.lstrip() if not text else piece
            chunk.clear()

    def close_roi(reason: str | None) -> None:
        nonlocal in_roi, pending
        if reason:
            warnings.append(reason)
        phrase, span = pending if pending else ("", (len(text), len(text)))
        valid = []
        for k in roi_ids:
            if k < regions.shape[0]:
                valid.append(k)
            else:
                warnings.append(f"<r{k}> refers to region {k} but there are only {regions.shape[0]} regions")
        if valid:
            boxes = [tuple(float(v) for v in regions[k].tolist()) for k in valid]
            px = [(b[0] * width, b[1] * height, b[2] * width, b[3] * height) for b in boxes]
            phrases.append(GroundedPhrase(phrase, span, valid, boxes, px if image_size else boxes))
        elif pending is None and not roi_ids:
            warnings.append("empty <roi></roi>")
        in_roi = False
        roi_ids.clear()
        pending = None

    for t in ids:
        k = tokenizer.region_index(t)
        if in_roi and k is None and t != roi_close:
            close_roi("<roi> was not closed by </roi>")
        if t == p_open:
            flush_text()
            if phrase_start is not None:
                warnings.append("<p> opened twice; the first phrase was dropped")
            if pending is not None:
                warnings.append(f"phrase {pending[0]!r} has no <roi>")
                pending = None
            phrase_start = len(text)
        elif t == p_close:
            flush_text()
            if phrase_start is None:
                warnings.append("</p> without <p>")
            else:
                suffix = text[phrase_start:]
                start = phrase_start + len(suffix) - len(suffix.lstrip())
                end = max(start, phrase_start + len(suffix.rstrip()))
                pending = (text[start:end], (start, end))
                phrase_start = None
        elif t == roi_open:
            flush_text()
            in_roi = True
        elif t == roi_close:
            if in_roi:
                close_roi(None)
            else:
                warnings.append("</roi> without <roi>")
        elif k is not None:
            if in_roi:
                roi_ids.append(k)
            else:
                warnings.append(f"<r{k}> outside <roi>...</roi> was ignored")
        elif tokenizer.is_new_token(t):
            flush_text()  # other special tokens are not text
        else:
            if pending is not None and not in_roi:
                warnings.append(f"phrase {pending[0]!r} has no <roi>")
                pending = None
            chunk.append(t)
    flush_text()
    if in_roi:
        close_roi("<roi> was not closed by </roi>")
    if phrase_start is not None:
        warnings.append("<p> was not closed by </p>")
    elif pending is not None:
        warnings.append(f"phrase {pending[0]!r} has no <roi>")
    scores = region_scores.detach().float().cpu() if region_scores is not None else torch.ones(regions.shape[0])
    text = text.strip()  # the text never starts with a space: only trailing spaces go, and spans stay inside it
    for phrase in phrases:
        phrase.span = (min(phrase.span[0], len(text)), min(phrase.span[1], len(text)))
    return GroundedAnswer(
        raw_text=tokenizer.decode(ids),
        text=text,
        phrases=phrases,
        regions=regions,
        region_scores=scores,
        image_size=image_size,
        warnings=warnings,
    )
