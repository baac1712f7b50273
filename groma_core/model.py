"""The composed pipeline: four stages, region selection, prompt expansion, embedding assembly, loss, generation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from groma_core import tokens as T
from groma_core.boxes import (
    BOX_GEOMETRY,
    BOX_RELATIONS,
    IDENTITY_FRAME,
    Frame,
    box_geometry,
    box_iou,
    box_relations,
    check_boxes,
    to_input_frame,
)
from groma_core.errors import InputError, ProposalError
from groma_core.processor import GromaProcessor
from groma_core.prompt import max_positions
from groma_core.selection import SelectionConfig, select_regions
from groma_core.stages import ImageTokenizer, LanguageBackbone, RegionEncoder, RegionProposer, module_device
from groma_core.types import ImageFeatures, Proposals, Regions

IGNORE_INDEX = T.IGNORE_INDEX


class ImageProjector(nn.Module):
    """Image tokens -> language-model width: Linear, exact GELU, Linear (the reference's ``img_txt_bridge``)."""

    def __init__(self, token_dim: int, hidden_size: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(token_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.layers(tokens)


class RegionPointer(nn.Module):
    """A content match between the language model's last hidden state and each region token, added to the logit of
    that region's index token: ``score_K = q(h) . k(region_K / rms(region_K)) / sqrt(H)`` (not in the reference,
    whose ``<rK>`` logits come from the language model head alone; see the recipe option ``region_pointer``)."""

    def __init__(self, hidden_size: int, box: bool = False, words: bool = False, phrase: bool = False,
                 relation: bool = False):
        super().__init__()
        self.q = nn.Linear(hidden_size, hidden_size)
        self.k = nn.Linear(hidden_size, hidden_size)
        # with ``box`` (recipe option ``region_pointer_box``) the key also maps the region's box geometry
        self.box = nn.Linear(BOX_GEOMETRY, hidden_size) if box else None
        # with ``words`` (recipe option ``region_pointer_words``) the query also maps the last phrase's words
        self.words = nn.Linear(hidden_size, hidden_size) if words else None
        # with ``phrase`` (recipe option ``region_pointer_phrase``) a region is also chosen before each phrase
        self.phrase = PhrasePointer(hidden_size) if phrase else None
        # with ``relation`` (recipe option ``region_pointer_relation``) a region's score also reads how its box lies
        # against an anchor region's ("the circle left of the star")
        self.relation = RelationPointer(hidden_size, words) if relation else None

    def forward(
        self,
        hidden: Tensor,
        regions: Tensor,
        valid: Tensor,
        boxes: Tensor | None = None,
        words: Tensor | None = None,
    ) -> Tensor:
        """``hidden`` (B, L, H), ``regions`` (B, K, H), ``valid`` (B, K), ``boxes`` (B, K, 4) normalised xyxy (used
        only with ``box``), ``words`` (B, L, H) the mean input embedding of the last phrase at each position (see
        :func:`phrase_bags`; used only with ``words``) -> scores (B, L, K), 0 where not valid."""
        dtype = self.q.weight.dtype
        keys = self.k(_unit_rms(regions).to(dtype))
        if self.box is not None:
            if boxes is None:
                raise ValueError("a region pointer with box=True needs the regions' boxes")
            keys = keys + self.box(box_geometry(boxes.float()).to(dtype))
        query = self.q(hidden.to(dtype))
        if self.words is not None:
            if words is None:
                raise ValueError("a region pointer with words=True needs the last phrase's words")
            query = query + self.words(_unit_rms(words).to(dtype))
        scores = query @ keys.transpose(1, 2) / hidden.shape[-1] ** 0.5
        if self.relation is not None:
            if boxes is None:
                raise ValueError("a region pointer with relation=True needs the regions' boxes")
            scores = scores + self.relation(hidden, regions, valid, boxes, words)
        return scores.masked_fill(~valid[:, None, :], 0.0)


class RelationPointer(nn.Module):
    """What a region's score gains from where its box lies against an anchor's (recipe option
    ``region_pointer_relation``; not in the reference, whose language model alone relates regions; after the
    relationship module of MAttNet, Yu et al. 2018): an anchor is chosen softly over the regions by a match of the
    hidden state (and the last phrase's words) with each region's token and box, and region K's score adds
    ``u(h) . sum_j p_j relations(K, j)`` (:func:`groma_core.boxes.box_relations`). ``u`` starts at zero, so the
    pointer scores as before until training finds a use for it; the layers are drawn from their own seed, so that
    adding them leaves every other initialisation of a build as it was."""

    SEED = 20180603

    def __init__(self, hidden_size: int, words: bool):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.SEED)
            self.q = nn.Linear(hidden_size, hidden_size)
            self.k = nn.Linear(hidden_size, hidden_size)
            self.box = nn.Linear(BOX_GEOMETRY, hidden_size)
            self.words = nn.Linear(hidden_size, hidden_size) if words else None
            self.relate = nn.Linear(hidden_size, BOX_RELATIONS)
            self.relate_words = nn.Linear(hidden_size, BOX_RELATIONS) if words else None
        for layer in (self.relate, self.relate_words):
            if layer is not None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, hidden: Tensor, regions: Tensor, valid: Tensor, boxes: Tensor, words: Tensor | None) -> Tensor:
        """``hidden`` (B, L, H), ``regions`` (B, K, H), ``valid`` (B, K), ``boxes`` (B, K, 4) normalised xyxy,
        ``words`` (B, L, H) or None -> the scores' relation term (B, L, K)."""
        dtype = self.q.weight.dtype
        keys = self.k(_unit_rms(regions).to(dtype)) + self.box(box_geometry(boxes.float()).to(dtype))
        query = self.q(hidden.to(dtype))
        weights = self.relate(hidden.to(dtype))
        if self.words is not None:
            if words is None:
                raise ValueError("a relation pointer with words needs the last phrase's words")
            bag = _unit_rms(words).to(dtype)
            query = query + self.words(bag)
            weights = weights + self.relate_words(bag)
        anchor = (query @ keys.transpose(1, 2) / hidden.shape[-1] ** 0.5).masked_fill(~valid[:, None, :], float("-inf"))
        anchor = torch.nan_to_num(anchor.softmax(-1))  # a row with no valid region: all zero
        relations = box_relations(boxes.float()).to(dtype)  # (B, K target, K anchor, R)
        return torch.einsum("blj,blr,bkjr->blk", anchor, weights, relations)


class PhrasePointer(nn.Module):
    """The region each grounded phrase of an answer will name, chosen before the phrase is written, and whether the
    answer names another after it (recipe option ``region_pointer_phrase``; not in the reference, whose captions
    write a phrase first and look for its region after it). The first phrase of an answer is chosen at the position
    that predicts its ``<p>``; each later one at the position that predicts the ``</roi>`` closing the phrase before
    it, where "no more" is a choice too. The choice is scored from the hidden state, the last phrase's words, each
    region's token and box, and whether a region (or one overlapping it) was already named in the answer; the tokens
    that follow, up to the chosen phrase's ``<roi>`` (or the answer's end for "no more"), carry the chosen region's
    token (or a learned "no more" vector), so that the phrase's words are read from one region as a region caption's
    are and the answer knows when it is done. Trained by teacher forcing (:func:`phrase_choices`), the cross-entropy
    of each choice added to the loss."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.match = RegionPointer(hidden_size, box=True, words=True)
        # what the tokens read of the chosen region: started as the identity, the region's token itself (the path the
        # reading stage taught the language model), not a fresh map (benchmarks/README.md, session 23)
        self.carry = nn.Linear(hidden_size, hidden_size)
        nn.init.eye_(self.carry.weight)
        nn.init.zeros_(self.carry.bias)
        self.stop = nn.Linear(hidden_size, 1)  # the score of "no more" after a phrase
        self.none = nn.Parameter(torch.randn(hidden_size) * 0.02)  # what "no more" carries
        # what an earlier naming adds to a region's score: named itself, and its largest IoU with a named region;
        # started at a prior (a caption names a region once), as a plain bias learns too slowly at these rates
        self.named = nn.Parameter(torch.tensor([-4.0, -4.0]))

    def scores(
        self,
        hidden: Tensor,
        regions: Tensor,
        valid: Tensor,
        boxes: Tensor,
        words: Tensor,
        named: Tensor,
        may_stop: Tensor,
    ) -> Tensor:
        """``hidden`` (B, L, H), ``regions`` (B, K, H), ``valid`` (B, K), ``boxes`` (B, K, 4), ``words`` (B, L, H),
        ``named`` (B, L, K) bool: regions named before each position, ``may_stop`` (B, L) bool -> scores
        (B, L, K + 1), the last column "no more"; -inf where a region is not valid or stopping is not a choice."""
        base = self.match(hidden, regions, valid, boxes, words)
        iou = torch.nan_to_num(torch.stack([box_iou(b, b) for b in boxes.float()]), nan=0.0)  # padding: 0 / 0
        iou = iou * valid[:, None, :] * valid[:, :, None]  # (B, K, K)
        flag = named.to(base.dtype)
        overlap = (flag[..., None, :] * iou[:, None].to(base.dtype)).amax(-1)  # (B, L, K)
        out = base + self.named[0].to(base.dtype) * flag + self.named[1].to(base.dtype) * overlap
        out = out.masked_fill(~valid[:, None, :], float("-inf"))
        stop = self.stop(hidden.to(self.stop.weight.dtype)).to(out.dtype)
        stop = stop.masked_fill(~may_stop[..., None], float("-inf"))
        return torch.cat([out, stop], dim=-1)

    def carried(self, region: Tensor, like: Tensor) -> Tensor:
        """What a token's embedding ``like`` (..., H) gains from ``region`` (..., H): the map of the region's token
        at unit RMS, brought to the RMS of ``like`` (neither drowns the other)."""
        dtype = self.carry.weight.dtype
        out = self.carry(_unit_rms(region).to(dtype))
        return (_unit_rms(out) * _rms(like).to(dtype)).to(like.dtype)


#: :attr:`PhraseChoice.region` of "the answer names no more regions"
NO_MORE = -1


@dataclass
class PhraseChoice:
    """One choice of a phrase pointer over a prepared sequence: the row, the position whose hidden state chooses,
    the first and last positions that carry the choice, the region chosen (:data:`NO_MORE`: none), the regions the
    answer named before it, whether "no more" was a choice, and whether the choice is supervised."""

    row: int
    at: int
    first: int
    last: int
    region: int
    named: tuple[int, ...]
    may_stop: bool
    supervised: bool


def phrase_choices(
    ids: Tensor,
    labels: Tensor | None,
    tokens: tuple[int, int, int, int],
    region_ids: Sequence[int],
) -> list[PhraseChoice]:
    """The choices a phrase pointer makes over ``ids`` (B, L), as teacher forcing gives them; ``tokens`` are the
    ids of ``<p>``, ``</p>``, ``<roi>`` and ``</roi>``. A grounded phrase is ``<p>...</p><roi><rK>``. The first of
    an answer is chosen before its ``<p>`` and carried from it to its ``<roi>``; after each grounded phrase's
    ``</roi>`` comes the choice of the answer's next phrase (carried from that ``</roi>`` to the next phrase's
    ``<roi>``), or of "no more" (carried to the answer's end). An answer is a run of supervised labels (with no
    labels, the whole row); a region counts as named once its ``<rK>`` follows ``<roi>`` (or another ``<rK>``)."""
    p_open, p_close, roi_open, roi_close = tokens
    index = {t: k for k, t in enumerate(region_ids)}
    out: list[PhraseChoice] = []
    rows = ids.tolist()
    supervised_rows = (labels != IGNORE_INDEX).tolist() if labels is not None else [[True] * len(r) for r in rows]
    for row, (seq, sup) in enumerate(zip(rows, supervised_rows)):
        named: list[int] = []
        opened = pending = None
        in_roi = False  # inside the <roi> of a grounded phrase

        def finish(last: int) -> None:
            nonlocal pending
            if pending is not None:
                pending.last = last
                out.append(pending)
                pending = None

        for t, token in enumerate(seq):
            if t and sup[t] != sup[t - 1]:  # an answer starts or ends: a choice left open is "no more"
                finish(t - 1)
                named, opened, in_roi = [], None, False
            if token in index and t and (seq[t - 1] == roi_open or seq[t - 1] in index):
                named.append(index[token])
            if token == p_open:
                opened = t
            elif token == p_close and opened is not None:
                if t + 2 < len(seq) and seq[t + 1] == roi_open and seq[t + 2] in index:
                    region = index[seq[t + 2]]
                    if pending is not None:  # the phrase the last </roi> chose
                        pending.region = region
                        finish(t + 1)
                    elif opened > 0:
                        out.append(PhraseChoice(row, opened - 1, opened, t + 1, region, tuple(named), False,
                                                sup[opened]))
                    in_roi = True
                opened = None
            elif token == roi_close and in_roi:
                in_roi = False
                finish(t - 1)
                pending = PhraseChoice(row, t - 1, t, t, NO_MORE, tuple(named), True, sup[t])
        finish(len(seq) - 1)
    return out


def phrase_bags(ids: Tensor, embeds: Tensor, p_open: int, p_close: int) -> Tensor:
    """For every position of ``ids`` (B, L), the mean of ``embeds`` (B, L, H) over the words of the last phrase
    closed at or before it (strictly between a ``<p>`` and its ``</p>``); zeros before the first ``</p>``."""
    opened, closed = (ids == p_open).long().cumsum(1), (ids == p_close).long().cumsum(1)
    inside = (opened > closed) & (ids != p_open)
    phrases = int(opened.max()) + 1 if ids.numel() else 1
    sums = embeds.new_zeros(ids.shape[0], phrases, embeds.shape[-1])
    counts = embeds.new_zeros(ids.shape[0], phrases, 1)
    weight = inside.unsqueeze(-1).to(embeds.dtype)
    sums.scatter_add_(1, opened.unsqueeze(-1).expand_as(embeds), embeds * weight)
    counts.scatter_add_(1, opened.unsqueeze(-1), weight)
    means = sums / counts.clamp(min=1)
    means[:, 0] = 0  # phrase 0: no phrase closed yet
    return means.gather(1, closed.clamp(max=phrases - 1).unsqueeze(-1).expand_as(embeds))


class PhraseTracker:
    """The mean input embedding of the last closed phrase while decoding: started from the prompt, fed each picked
    token (:func:`decode`'s ``on_token``); what a ``words`` pointer reads at the step being decoded."""

    def __init__(self, ids: Tensor, embeds: Tensor, p_open: int, p_close: int):
        self.p_open, self.p_close = p_open, p_close
        self.bag = phrase_bags(ids, embeds, p_open, p_close)[:, -1:]  # (B, 1, H)
        opened, closed = (ids == p_open).long().cumsum(1), (ids == p_close).long().cumsum(1)
        self.inside = (opened > closed)[:, -1]  # a phrase open at the prompt's end (B,)
        since = opened == opened[:, -1:]  # positions of the last opened phrase
        words = (since & (opened > closed) & (ids != p_open)).unsqueeze(-1).to(embeds.dtype)
        self.sum = (embeds * words).sum(1, keepdim=True)
        self.count = words.sum(1, keepdim=True)

    def feed(self, ids: Tensor, embeds: Tensor) -> None:
        """One decoded token per row: ``ids`` (B,), ``embeds`` (B, 1, H)."""
        opens, closes = (ids == self.p_open)[:, None, None], (ids == self.p_close)[:, None, None]
        inside = self.inside[:, None, None]
        done = closes & inside
        self.bag = torch.where(done, self.sum / self.count.clamp(min=1), self.bag)
        word = (inside & ~closes & ~opens).to(embeds.dtype)
        self.sum = torch.where(opens, 0.0, self.sum + embeds * word)
        self.count = torch.where(opens, 0.0, self.count + word)
        self.inside = (self.inside | opens[:, 0, 0]) & ~closes[:, 0, 0]


#: how far outside [0, 1] a proposal's centre may lie (float rounding of a box on the border)
CENTRE_TOLERANCE = 1e-3


def check_proposals(proposals: Proposals, images: int, plugin: str) -> None:
    """Raise :class:`ProposalError` naming ``plugin`` unless ``proposals`` keeps the contract of
    :class:`~groma_core.types.Proposals`: one entry per image, finite boxes with x1 >= x0 and y1 >= y0 and centres
    inside the image, finite scores in [0, 1]."""
    where = f"region proposer {plugin!r}"
    if len(proposals.boxes) != images:
        raise ProposalError(f"{where}: {len(proposals.boxes)} box lists for a batch of {images} images")
    for i, (boxes, scores) in enumerate(zip(proposals.boxes, proposals.scores)):
        b, s = boxes.detach().float(), scores.detach().float()
        centres = (b[:, :2] + b[:, 2:]) / 2
        problems = {
            "a box that is not finite (NaN or inf)": ~torch.isfinite(b).all(dim=1),
            "a box with x1 < x0 or y1 < y0": (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1]),
            "a box whose centre is outside the image (normalized xyxy expected)": (
                (centres < -CENTRE_TOLERANCE) | (centres > 1 + CENTRE_TOLERANCE)
            ).any(dim=1),
            "a score that is not finite": ~torch.isfinite(s),
            "a score outside [0, 1]": (s < 0) | (s > 1),
        }
        for what, bad in problems.items():
            if bool(bad.any()):
                k = int(bad.nonzero()[0, 0])
                raise ProposalError(
                    f"{where}: image {i}, proposal {k}: {what} (box {[round(v, 4) for v in b[k].tolist()]}, "
                    f"score {s[k].item():.4g}); {int(bad.sum())} of {b.shape[0]} proposals are so"
                )


@dataclass
class PreparedInputs:
    """The language model's input for a batch, after region selection and prompt expansion."""

    inputs_embeds: Tensor  # (B, L, H)
    attention_mask: Tensor  # (B, L) 1 = real token
    position_ids: Tensor  # (B, L)
    ids: Tensor  # (B, L) expanded ids (pad where padded)
    labels: Tensor | None  # (B, L) or None
    prompt_ids: list[list[int]]  # per sample, after <refer_box>/<ground_box> rewriting, before expansion
    regions: Regions
    features: ImageFeatures
    proposals: Proposals
    region_tokens: list[Tensor] = field(default_factory=list)  # per sample (n_i, H): what the encoder gave


@dataclass
class GromaOutput:
    """Forward result: loss (when labels were given), logits (B, L, V) and the intermediate results."""

    logits: Tensor
    loss: Tensor | None
    inputs: PreparedInputs


@dataclass
class GenerationOutput:
    """Generated ids per sample (new tokens only, EOS excluded), the per-step logits and the regions they index."""

    sequences: list[list[int]]
    prompt_ids: list[list[int]]
    regions: Regions
    step_logits: list[Tensor] = field(default_factory=list)  # each (B, V), one per step
    proposal_extras: dict[str, Any] = field(default_factory=dict)  # the proposer's extras (e.g. masks)


def _rms(x: Tensor) -> Tensor:
    """Root mean square over the last dimension (kept), without gradient: a scale, not a feature."""
    return x.detach().pow(2).mean(-1, keepdim=True).sqrt()


def _unit_rms(x: Tensor) -> Tensor:
    """``x`` scaled to unit RMS over its last dimension (the scale without gradient, as :func:`_rms`)."""
    return x / _rms(x).clamp(min=1e-6)


class PointerLogits:
    """What :meth:`GromaModel._pointer_logits` returns: called with (logits (B, L, V), hidden (B, L, H)), the logits
    with each ``<rK>`` column raised by the pointer's match with region K. Over the whole prepared sequence (training)
    a ``words`` pointer reads each position's last phrase from the inputs; over one position (decoding) it reads the
    phrase :meth:`feed` has followed (``decode``'s ``on_token``), from the prompt on. With a phrase pointer it also
    gives the embeddings whose grounded phrases carry their regions (:meth:`carry`), the loss of the choices
    (:meth:`phrase_loss`), and while decoding chooses the region of each ``<p>`` picked (:meth:`feed`)."""

    def __init__(self, pointer, regions, valid, boxes, columns, inputs, phrase_ids: tuple[int, int] | None,
                 roi_ids: tuple[int, int] | None = None):
        self.pointer, self.regions, self.valid, self.boxes, self.columns = pointer, regions, valid, boxes, columns
        self.inputs, self.phrase_ids, self.roi_ids = inputs, phrase_ids, roi_ids
        self._tracker: PhraseTracker | None = None
        self._words: Tensor | None = None  # the words of the last call (B, L, H)
        self._hidden: Tensor | None = None  # the hidden state of the last call (B, L, H)
        self._carrying: Tensor | None = None  # decoding: what each row carries now (B, 1, H)
        self._state: Tensor | None = None  # decoding: where each row is (see :meth:`feed`)
        self._named: Tensor | None = None  # decoding: the regions named in the answer so far (B, K)
        self._chosen: Tensor | None = None  # decoding: the region each row's phrase pointer chose last (B,)
        self._force: Tensor | None = None  # decoding: rows whose next token is their chosen region's <rK> (B,)

    def _decoding(self) -> PhraseTracker:
        if self._tracker is None:  # started from the prompt at the first decoding step
            self._tracker = PhraseTracker(self.inputs.ids, self.inputs.inputs_embeds.detach(), *self.phrase_ids)
        return self._tracker

    def __call__(self, logits: Tensor, hidden: Tensor) -> Tensor:
        words = None
        if self.phrase_ids is not None:
            ids = self.inputs.ids
            if hidden.shape[1] == 1:  # a decoding step (or a one-token prompt, where both agree)
                words = self._decoding().bag
            elif hidden.shape[1] == ids.shape[1]:
                words = phrase_bags(ids, self.inputs.inputs_embeds, *self.phrase_ids)
            else:
                raise ValueError(f"hidden: {hidden.shape[1]} positions, expected {ids.shape[1]} or 1")
        self._words, self._hidden = words, hidden
        scores = self.pointer(hidden, self.regions, self.valid, self.boxes, words).to(logits.dtype)
        logits = logits.index_add(2, self.columns, scores)
        if self._force is not None and hidden.shape[1] == 1 and bool(self._force.any()):
            # a grounded phrase's first region is the one the phrase pointer chose for it, as in teacher forcing
            # (left to the language model head, a region the phrase's words match better is often picked instead:
            # benchmarks/README.md, session 25)
            rows = torch.nonzero(self._force).flatten()
            logits = logits.clone()
            logits[rows, 0, self.columns[self._chosen[rows]]] = logits[rows, 0].max(-1).values + 1.0
        return logits

    @property
    def _phrase(self) -> PhrasePointer | None:
        return self.pointer.phrase

    def _with_none(self) -> Tensor:
        """The regions (B, K + 1, H) with the phrase pointer's "no more" vector as the last."""
        none = self._phrase.none.to(self.regions.dtype).expand(self.regions.shape[0], 1, -1)
        return torch.cat([self.regions, none], dim=1)

    def carry(self, embeds: Tensor) -> tuple[Tensor, list[PhraseChoice]]:
        """``embeds`` (B, L, H) with the phrase pointer's choices, as teacher forcing gives them
        (:func:`phrase_choices`), carried over their positions (unchanged without a phrase pointer), and the
        choices."""
        if self._phrase is None:
            return embeds, []
        tokens = (*self.phrase_ids, *self.roi_ids)
        choices = phrase_choices(self.inputs.ids, self.inputs.labels, tokens, self.columns.tolist())
        choices = [c for c in choices if c.region == NO_MORE or bool(self.valid[c.row, c.region])]
        if not choices:
            return embeds, choices
        k = self.regions.shape[1]
        spans = [
            (c.row, t, k if c.region == NO_MORE else c.region)
            for c in choices for t in range(c.first, c.last + 1)
        ]
        rows, cols, which = (torch.tensor(v, device=embeds.device) for v in zip(*spans))
        added = self._phrase.carried(self._with_none()[rows, which], embeds[rows, cols])
        return embeds.index_put((rows, cols), embeds[rows, cols] + added), choices

    def phrase_loss(self, choices: list[PhraseChoice]) -> Tensor | None:
        """The mean cross-entropy of the phrase pointer's supervised choices (over the regions, and "no more" where
        it is a choice) against teacher forcing's; None when there is none. Reads the last call's hidden state."""
        chosen = [c for c in choices if c.supervised and c.at >= 0]
        if self._phrase is None or not chosen or self._hidden is None:
            return None
        device, k = self._hidden.device, self.regions.shape[1]
        rows = torch.tensor([c.row for c in chosen], device=device)
        at = torch.tensor([c.at for c in chosen], device=device)
        named = torch.zeros(len(chosen), k, dtype=torch.bool, device=device)
        for n, c in enumerate(chosen):
            named[n, list(c.named)] = True
        may_stop = torch.tensor([[c.may_stop] for c in chosen], device=device)
        scores = self._phrase.scores(
            self._hidden[rows, at][:, None], self.regions[rows], self.valid[rows], self.boxes[rows],
            self._words[rows, at][:, None], named[:, None], may_stop,
        )[:, 0]
        target = torch.tensor([k if c.region == NO_MORE else c.region for c in chosen], device=device)
        return F.cross_entropy(scores.float(), target)

    def feed(self, ids: Tensor, embeds: Tensor) -> Tensor:
        """One decoded token per row (``ids`` (B,), its input embedding (B, 1, H)): followed by a words pointer's
        phrase; with a phrase pointer, the choices :func:`phrase_choices` describes are made (a ``<p>`` with no
        choice pending chooses its region; a ``</roi>`` closing a grounded phrase chooses the next, or "no more")
        and carried. Returns the embeddings the language model reads."""
        if self.phrase_ids is None:
            return embeds
        tracker = self._decoding()
        words = tracker.bag  # the bag the last step's scores read, before this token changes it
        tracker.feed(ids, embeds)
        if self._phrase is None:
            return embeds
        batch, k = self.regions.shape[:2]
        device = ids.device
        if self._state is None:
            self._state = torch.zeros(batch, dtype=torch.long, device=device)
            self._named = torch.zeros(batch, k, dtype=torch.bool, device=device)
            self._carrying = self.regions.new_zeros(batch, 1, self.regions.shape[-1])
            self._chosen = torch.full((batch,), NO_MORE, dtype=torch.long, device=device)
        p_open, p_close = self.phrase_ids
        roi_open, roi_close = self.roi_ids
        state = self._state
        # states: 0 free; 1 in a phrase (carrying); 2 after its </p> (carrying); 3 in its <roi> (not carrying);
        # 4 after its </roi> (carrying the next choice)
        opens, closes = ids == p_open, ids == roi_close
        choose_first = opens & (state != 4)
        choose_next = closes & (state == 3)
        if bool((choose_first | choose_next).any()):
            scores = self._phrase.scores(
                self._hidden, self.regions, self.valid, self.boxes, words, self._named[:, None], choose_next[:, None]
            )[:, 0]
            best = scores.argmax(-1)
            self._chosen = torch.where(choose_first | choose_next, torch.where(best < k, best, NO_MORE), self._chosen)
            pick = self._with_none()[torch.arange(batch, device=device), best][:, None]
            self._carrying = torch.where((choose_first | choose_next)[:, None, None], pick, self._carrying)
        carries = opens | (state == 1) | (state == 4) | ((state == 2) & (ids == roi_open)) | choose_next
        if bool(carries.any()):
            added = self._phrase.carried(self._carrying, embeds)
            embeds = torch.where(carries[:, None, None], embeds + added, embeds)
        state = torch.where(
            opens, 1,
            torch.where((state == 1) & (ids == p_close), 2,
            torch.where((state == 2) & (ids == roi_open), 3,
            torch.where(choose_next, 4,
            torch.where((state == 1) | (state == 3) | (state == 4), state, 0)))),
        )
        self._force = (state == 3) & (ids == roi_open) & (self._chosen != NO_MORE)
        self._state = state
        is_region = torch.isin(ids, self.columns)
        if bool(is_region.any()):  # a region named (this counts any <rK> decoded, as the answer's pointers)
            k_of = (ids[:, None] == self.columns[None]).float().argmax(-1)
            self._named[torch.arange(batch, device=device)[is_region], k_of[is_region]] = True
        return embeds


class GromaModel(nn.Module):
    """A Groma pipeline built from four stages (see DESIGN.md's data flow): it computes; the task API over it is
    :class:`groma_core.inference.Groma`."""

    def __init__(
        self,
        image_tokenizer: ImageTokenizer,
        region_proposer: RegionProposer,
        region_encoder: RegionEncoder,
        language_backbone: LanguageBackbone,
        selection: SelectionConfig | None = None,
        template: str = "llava",
        index_region_tokens: bool = False,
        region_pointer: bool = False,
        region_pointer_box: bool = False,
        region_pointer_words: bool = False,
        region_pointer_phrase: bool = False,
        region_pointer_relation: bool = False,
    ):
        super().__init__()
        self.image_tokenizer = image_tokenizer
        self.region_proposer = region_proposer
        self.region_encoder = region_encoder
        self.language_backbone = language_backbone
        self.image_projector = ImageProjector(image_tokenizer.token_dim, language_backbone.hidden_size)
        self.selection = selection or SelectionConfig()
        self.template = template
        self.index_region_tokens = index_region_tokens
        # only built when asked, so that the reference's state dict is unchanged
        parts = {"box": region_pointer_box, "words": region_pointer_words, "phrase": region_pointer_phrase,
                 "relation": region_pointer_relation}
        for name, asked in parts.items():
            if asked and not region_pointer:
                raise ValueError(f"region_pointer_{name} needs region_pointer")
        if region_pointer_phrase and not region_pointer_words:
            raise ValueError("region_pointer_phrase needs region_pointer_words (its choice reads the last phrase)")
        self.region_pointer = (
            RegionPointer(language_backbone.hidden_size, **parts)
            if region_pointer
            else None
        )
        self.recipe: Any = None
        if region_encoder.hidden_size != language_backbone.hidden_size:
            raise ValueError(
                f"region encoder outputs width {region_encoder.hidden_size} but the language backbone's hidden size "
                f"is {language_backbone.hidden_size}"
            )

    # -- properties ------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        tok = self.language_backbone.tokenizer
        if tok is None:
            raise InputError("this model has no tokenizer: give the language backbone a `tokenizer` directory")
        return tok

    @property
    def device(self) -> torch.device:
        return module_device(self)

    @property
    def needs_images(self) -> bool:
        """Whether a stage reads the original images (:attr:`groma_core.stages.Stage.needs_images`): callers then
        pass them as ``images`` beside the pixel values."""
        stages = (self.image_tokenizer, self.region_proposer, self.region_encoder, self.language_backbone)
        return any(getattr(stage, "needs_images", False) for stage in stages)

    def input_frames(self, images: Sequence[Any]) -> list[Frame]:
        """Where each original (PIL) image lies in the image tokenizer's input (:data:`groma_core.boxes.Frame`)."""
        return self.processor.frames(images)

    @property
    def processor(self) -> GromaProcessor:
        """The :class:`~groma_core.processor.GromaProcessor` of this pipeline: its tokenizer, image preprocessing and
        conversation template."""
        return GromaProcessor(self.tokenizer, self.image_tokenizer, self.template)

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the pipeline takes its pixel values in (that of its image projector's weights)."""
        return self.image_projector.layers[0].weight.dtype

    # -- stages ----------------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: Tensor, images: Sequence[Any] | None = None) -> ImageFeatures:
        """Image features of a batch; ``images`` (the original PIL images) ride along for pixel-based stages."""
        features = self.image_tokenizer(pixel_values)
        if images is not None:
            features.images = list(images)
            features.frames = [tuple(self.image_tokenizer.input_frame(*image.size)) for image in features.images]
        return features

    def propose(self, features: ImageFeatures) -> Proposals:
        """The region proposer's candidates for ``features``, checked by :func:`check_proposals` (in eval mode; in
        training a NaN reaches the loss, whose guard names the batch's samples)."""
        proposals = self.region_proposer(features)
        if not self.training:
            recipe = getattr(self.recipe, "stages", None)
            plugin = recipe["region_proposer"].plugin if recipe else type(self.region_proposer).__name__
            check_proposals(proposals, features.batch_size, plugin)
        return self._into_input_frame(proposals, features)

    def _into_input_frame(self, proposals: Proposals, features: ImageFeatures) -> Proposals:
        """A proposer that reads the original images gives boxes of those images; the core works in the image
        tokenizer's input frame (the same unless it letterboxes), so they are mapped there."""
        if not getattr(self.region_proposer, "needs_images", False) or features.images is None:
            return proposals
        frames = features.frames or self.input_frames(features.images)  # set by encode_images with the images
        if all(tuple(frame) == IDENTITY_FRAME for frame in frames):
            return proposals
        boxes = [to_input_frame(b, frame) for b, frame in zip(proposals.boxes, frames)]
        return Proposals(boxes, proposals.scores, proposals.extras)

    def select(
        self,
        proposals: Proposals,
        refer_boxes: list[Tensor] | None = None,
        ground_boxes: list[Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> Regions:
        return select_regions(proposals, self.selection, refer_boxes, ground_boxes, generator)

    # -- prompt handling -------------------------------------------------------------------------------------
    def _rewrite(self, ids: list[int], placeholder: int, index: Tensor, what: str, sample: int) -> list[int]:
        positions = [j for j, t in enumerate(ids) if t == placeholder]
        if not positions:
            return ids
        if len(positions) != index.numel():
            raise InputError(
                f"sample {sample}: the prompt has {len(positions)} {what} tokens but {index.numel()} boxes were given"
            )
        out = list(ids)
        region_ids = self.tokenizer.region_ids
        for j, k in zip(positions, index.tolist()):
            out[j] = region_ids[k]
        return out

    def _expand(self, ids: list[int], n_regions: int, n_image_tokens: int) -> tuple[list[int], list[int]]:
        """Expand ``<image>`` and ``<region>``; also return, for every expanded position, the index of the prompt
        token it stands for, or -1 for a position the expansion inserted (never supervised)."""
        tok = self.tokenizer
        image_id, region_id = tok.token_id(T.IMAGE), tok.token_id(T.REGION)
        out: list[int] = []
        origin: list[int] = []
        for j, t in enumerate(ids):
            if t == image_id:
                out += [image_id] * n_image_tokens
                origin += [-1] * n_image_tokens
            elif t == region_id:
                for k in range(n_regions):
                    out += [tok.region_ids[k], region_id]
                origin += [-1] * (2 * n_regions)
            else:
                out.append(t)
                origin.append(j)
        return out, origin

    def prepare_inputs(
        self,
        pixel_values: Tensor,
        input_ids: Sequence[Sequence[int]] | Tensor,
        refer_boxes: list[Tensor] | None = None,
        ground_boxes: list[Tensor] | None = None,
        labels: Sequence[Sequence[int]] | Tensor | None = None,
        padding_side: str = "right",
        generator: torch.Generator | None = None,
        features: ImageFeatures | None = None,
        proposals: Proposals | None = None,
        images: Sequence[Any] | None = None,
    ) -> PreparedInputs:
        """Run the vision stages and build the language model's embeddings for a batch.

        ``input_ids``: per-sample prompt ids (a padded tensor is cut at its first pad token, as the reference does);
        each holds one ``<image>`` and one ``<region>``. ``refer_boxes[i]`` (n_i, 4) normalized xyxy, one per
        ``<refer_feat>`` (and per ``<refer_box>``, if the prompt has them) of sample i.
        """
        tok = self.tokenizer
        ids_list = _to_lists(input_ids, tok.pad_id)
        label_list = _to_lists(labels, None) if labels is not None else None
        batch = len(ids_list)
        if pixel_values.shape[0] != batch:
            raise InputError(f"{pixel_values.shape[0]} images but {batch} prompts")
        for name, boxes in (("refer_boxes", refer_boxes), ("ground_boxes", ground_boxes)):
            if boxes is None:
                continue
            if len(boxes) != batch:
                raise InputError(f"{name}: {len(boxes)} box lists for {batch} prompts")
            for i, b in enumerate(boxes):
                try:
                    check_boxes(b.reshape(-1, 4).float().cpu() if b.numel() else b.reshape(0, 4), f"{name}[{i}]")
                except ValueError as exc:
                    raise InputError(str(exc)) from None
        refer_id, feat_id = tok.token_id(T.REFER_BOX), tok.token_id(T.REFER_FEAT)
        ground_id = tok.token_id(T.GROUND_BOX)
        image_id, region_id = tok.token_id(T.IMAGE), tok.token_id(T.REGION)
        for i, ids in enumerate(ids_list):
            n_box = 0 if refer_boxes is None else int(refer_boxes[i].reshape(-1, 4).shape[0])
            n_feat = ids.count(feat_id)
            if n_feat != n_box:
                raise InputError(
                    f"sample {i}: the prompt has {n_feat} <refer_feat> tokens but {n_box} refer boxes were given"
                )
            if ids.count(image_id) != 1 or ids.count(region_id) != 1:
                raise InputError(
                    f"sample {i}: the prompt must contain exactly one <image> and one <region> "
                    f"(found {ids.count(image_id)} and {ids.count(region_id)})"
                )

        limit = max_positions(self.language_backbone)
        n_image_tokens = features.tokens.shape[1] if features is not None else self.image_tokenizer.num_tokens
        for i, ids in enumerate(ids_list):  # before any stage runs: the image's tokens alone may not fit
            if limit is not None and len(ids) - 2 + n_image_tokens > limit:
                raise InputError(
                    f"sample {i}: the prompt is {len(ids)} tokens; with the image's {n_image_tokens} tokens it needs "
                    f"at least {len(ids) - 2 + n_image_tokens} positions, but the language model takes {limit}"
                )

        if features is None:
            features = self.encode_images(pixel_values, images)
        if proposals is None:
            proposals = self.propose(features)
        regions = self.select(proposals, refer_boxes, ground_boxes, generator)
        n_tokens = len(tok.region_ids)
        for i, boxes in enumerate(regions.boxes):  # region K is written <rK>: there must be a token for each
            if boxes.shape[0] > n_tokens:
                raise InputError(
                    f"sample {i}: {boxes.shape[0]} regions, but the tokenizer has {n_tokens} region tokens (<r0>..<r"
                    f"{n_tokens - 1}>); set region_selection.max_regions to at most {n_tokens}"
                )

        prompt_ids, expanded, label_rows = [], [], []
        for i in range(batch):
            ids = self._rewrite(ids_list[i], refer_id, regions.refer_index[i], "<refer_box>", i)
            ids = self._rewrite(ids, ground_id, regions.ground_index[i], "<ground_box>", i)
            prompt_ids.append(ids)
            exp, origin = self._expand(ids, regions.boxes[i].shape[0], features.tokens.shape[1])
            if limit is not None and len(exp) > limit:
                raise InputError(
                    f"sample {i}: the prompt is {len(exp)} tokens once the image and its {regions.boxes[i].shape[0]} "
                    f"regions are expanded, but the language model takes at most {limit} positions"
                )
            expanded.append(exp)
            if label_list is not None:
                original = ids_list[i]
                lab = label_list[i][: len(original)]
                if len(lab) != len(original):
                    raise InputError(f"sample {i}: {len(lab)} labels for {len(original)} prompt ids")
                # supervised placeholders follow their rewritten ids (<ground_box> -> <rK>)
                lab = [ids[j] if t != IGNORE_INDEX and t == original[j] else t for j, t in enumerate(lab)]
                label_rows.append([IGNORE_INDEX if j < 0 else lab[j] for j in origin])

        device = self.device
        length = max(len(e) for e in expanded)
        ids_t = torch.full((batch, length), tok.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((batch, length), dtype=torch.long, device=device)
        labels_t = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long, device=device) if label_list else None
        for i, exp in enumerate(expanded):
            sl = slice(0, len(exp)) if padding_side == "right" else slice(length - len(exp), length)
            ids_t[i, sl] = torch.tensor(exp, device=device)
            mask[i, sl] = 1
            if labels_t is not None:
                labels_t[i, sl] = torch.tensor(label_rows[i], device=device)
        if padding_side == "right":  # as the reference: positions 0..L-1 for every row
            position_ids = torch.arange(length, device=device).expand(batch, length)
        else:
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)

        embeds = self.language_backbone.embed(ids_t)
        image_embeds = self.image_projector(features.tokens.to(self.input_dtype))
        region_feats = self.region_encoder(features, regions.boxes)
        embeds = embeds.clone()
        region_index_embeds = (
            self.language_backbone.embed(torch.tensor(tok.region_ids, device=device))
            if self.index_region_tokens
            else None
        )
        for i in range(batch):
            real = mask[i].bool()
            row_ids = ids_t[i]
            img_pos = torch.nonzero((row_ids == image_id) & real).flatten()
            embeds[i, img_pos] = image_embeds[i].to(embeds.dtype)
            reg_pos = torch.nonzero((row_ids == region_id) & real).flatten()
            feats = region_feats[i]
            if region_index_embeds is not None and feats.shape[0]:
                # region K's token also carries <rK>'s embedding, scaled to the token's own RMS so that neither
                # drowns the other (region tokens are often 100x a word embedding's norm)
                index = region_index_embeds[: feats.shape[0]].to(feats.dtype)
                feats = feats + index * (_rms(feats) / _rms(index).clamp(min=1e-6))
            if reg_pos.numel():
                embeds[i, reg_pos] = feats.to(embeds.dtype)
            feat_pos = torch.nonzero((row_ids == feat_id) & real).flatten()
            if feat_pos.numel():
                embeds[i, feat_pos] = feats[regions.refer_index[i]].to(embeds.dtype)
        return PreparedInputs(
            embeds, mask, position_ids, ids_t, labels_t, prompt_ids, regions, features, proposals, list(region_feats)
        )

    def _pointer_logits(self, inputs: PreparedInputs) -> PointerLogits | None:
        """With ``region_pointer``: a :class:`PointerLogits`, (logits (B, L, V), hidden (B, L, H)) -> logits whose
        ``<rK>`` columns also hold the match of each position's hidden state with region K of its sample."""
        pointer = self.region_pointer
        if pointer is None:
            return None
        tokens = inputs.region_tokens
        batch, width = len(tokens), self.language_backbone.hidden_size
        k_max = max((int(t.shape[0]) for t in tokens), default=0)
        if k_max == 0:
            return None
        device = inputs.inputs_embeds.device
        regions = torch.zeros(batch, k_max, width, device=device, dtype=tokens[0].dtype)
        valid = torch.zeros(batch, k_max, dtype=torch.bool, device=device)
        needs_boxes = pointer.box is not None or pointer.phrase is not None or pointer.relation is not None
        boxes = torch.zeros(batch, k_max, 4, device=device) if needs_boxes else None
        for i, t in enumerate(tokens):
            regions[i, : t.shape[0]] = t
            valid[i, : t.shape[0]] = True
            if boxes is not None:  # only a pointer that reads the geometry needs the boxes
                boxes[i, : t.shape[0]] = inputs.regions.boxes[i].to(device=device, dtype=boxes.dtype)
        columns = torch.tensor(self.tokenizer.region_ids[:k_max], device=device)
        phrase_ids = None
        if pointer.words is not None:  # the pointer's query also reads the last phrase's words
            phrase_ids = (self.tokenizer.token_id(T.P_OPEN), self.tokenizer.token_id(T.P_CLOSE))
        roi_ids = None
        if pointer.phrase is not None:
            roi_ids = (self.tokenizer.token_id(T.ROI_OPEN), self.tokenizer.token_id(T.ROI_CLOSE))
        return PointerLogits(pointer, regions, valid, boxes, columns, inputs, phrase_ids, roi_ids)

    # -- training forward ------------------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: Tensor,
        input_ids: Sequence[Sequence[int]] | Tensor,
        refer_boxes: list[Tensor] | None = None,
        ground_boxes: list[Tensor] | None = None,
        labels: Sequence[Sequence[int]] | Tensor | None = None,
        generator: torch.Generator | None = None,
        images: Sequence[Any] | None = None,
    ) -> GromaOutput:
        """Logits over the full vocabulary and, with ``labels``, the next-token cross-entropy (ignore -100).
        ``images``: the batch's original PIL images, for a stage that reads them (:attr:`needs_images`)."""
        inputs = self.prepare_inputs(
            pixel_values, input_ids, refer_boxes, ground_boxes, labels, generator=generator, images=images
        )
        point = self._pointer_logits(inputs)
        embeds, choices = (inputs.inputs_embeds, []) if point is None else point.carry(inputs.inputs_embeds)
        out = self.language_backbone(embeds, inputs.attention_mask, inputs.position_ids)
        all_logits = out.logits if point is None else point(out.logits, out.hidden_states)
        loss = None
        if inputs.labels is not None:
            logits = all_logits[:, :-1].float()
            target = inputs.labels[:, 1:]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX)
            choice = point.phrase_loss(choices) if point is not None else None
            if choice is not None:  # the phrase pointer's choices (region_pointer_phrase)
                loss = loss + choice
        return GromaOutput(all_logits, loss, inputs)

    # -- generation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        pixel_values: Tensor,
        input_ids: Sequence[Sequence[int]] | Tensor,
        refer_boxes: list[Tensor] | None = None,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        generator: torch.Generator | None = None,
        eos_id: int | None = None,
        keep_step_logits: bool = False,
        images: Sequence[Any] | None = None,
    ) -> GenerationOutput:
        """Greedy or sampled decoding with a key/value cache; batches are left-padded so every sample decodes
        exactly as it would alone."""
        inputs = self.prepare_inputs(
            pixel_values, input_ids, refer_boxes, padding_side="left", generator=generator, images=images
        )
        point = self._pointer_logits(inputs)
        embeds = inputs.inputs_embeds if point is None else point.carry(inputs.inputs_embeds)[0]
        sequences, step_logits = decode(
            self.language_backbone,
            embeds,
            inputs.attention_mask,
            inputs.position_ids,
            max_new_tokens=max_new_tokens,
            eos_id=self.tokenizer.eos_id if eos_id is None else eos_id,
            pad_id=self.tokenizer.pad_id,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            generator=generator,
            keep_step_logits=keep_step_logits,
            adjust_logits=point,
            on_token=point.feed if point is not None else None,
        )
        return GenerationOutput(sequences, inputs.prompt_ids, inputs.regions, step_logits, inputs.proposals.extras)


@torch.no_grad()
def decode(
    backbone: LanguageBackbone,
    inputs_embeds: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    keep_step_logits: bool = False,
    adjust_logits: Callable[[Tensor, Tensor], Tensor] | None = None,
    on_token: Callable[[Tensor, Tensor], None] | None = None,
) -> tuple[list[list[int]], list[Tensor]]:
    """Decode from prepared embeddings with a key/value cache: new ids per sample (EOS excluded) and, if asked,
    the logits of every step. Rows must be left-padded (or unpadded); positions continue from each row's last.
    ``adjust_logits(logits (B, 1, V), hidden (B, 1, H))``, if given, changes each step's logits before picking;
    ``on_token(ids (B,), embeds (B, 1, H))``, if given, sees each picked token and its input embedding and returns
    the embedding the language model then reads."""
    mask = attention_mask
    out = backbone(inputs_embeds, mask, position_ids, use_cache=True)
    batch = mask.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool, device=mask.device)  # kept on the device: one sync per step
    picked: list[Tensor] = []  # each step's ids (B,); a row's ids after its first EOS are padding
    step_logits: list[Tensor] = []
    next_pos = position_ids[:, -1:] + 1
    for step in range(max_new_tokens):
        logits = out.logits[:, -1:]
        if adjust_logits is not None:
            logits = adjust_logits(logits, out.hidden_states[:, -1:])
        logits = logits[:, 0].float()
        if keep_step_logits:
            step_logits.append(logits)
        next_ids = torch.where(finished, pad_id, _pick(logits, do_sample, temperature, top_p, top_k, generator))
        picked.append(next_ids)
        if eos_id is not None:
            finished = finished | (next_ids == eos_id)
        if step == max_new_tokens - 1 or bool(finished.all()):  # no forward for a token nobody will read
            break
        next_ids = torch.where(finished, pad_id, next_ids)
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=mask.device)], dim=1)
        embeds = backbone.embed(next_ids[:, None])
        if on_token is not None:
            embeds = on_token(next_ids, embeds)
        out = backbone(embeds, mask, next_pos, past_key_values=out.past_key_values, use_cache=True)
        next_pos = next_pos + 1
    rows = torch.stack(picked, dim=1).tolist() if picked else [[] for _ in range(batch)]  # one copy to the host
    sequences = [row[: row.index(eos_id)] if eos_id is not None and eos_id in row else row for row in rows]
    return sequences, step_logits


def _pick(
    logits: Tensor, do_sample: bool, temperature: float, top_p: float, top_k: int, generator: torch.Generator | None
) -> Tensor:
    if not do_sample:
        return logits.argmax(-1)
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(max(temperature, 1e-6))])  # then top-k, then top-p
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    logits = warpers(None, logits)  # the warpers read the scores alone
    probs = logits.softmax(-1)
    gen_device = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(gen_device), 1, generator=generator).flatten().to(logits.device)


def _to_lists(ids: Sequence[Sequence[int]] | Tensor | None, pad_id: int | None) -> list[list[int]]:
    if isinstance(ids, Tensor):
        if ids.ndim == 1:
            ids = ids[None]
        rows = ids.tolist()
    else:
        rows = [list(map(int, r)) for r in ids]
    if pad_id is None:
        return rows
    out = []
    for r in rows:
        out.append(r[: r.index(pad_id)] if pad_id in r else r)
    return out
