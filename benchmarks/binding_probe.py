"""How many steps a language model of the embedded default's size needs to learn Groma's region binding alone.

Groma answers "where is X" by emitting the index token ``<rK>`` that *precedes* the matching region embedding in
``Regions: <r0>[emb 0]<r1>[emb 1]...``, several tokens after the words of X (``<p>X</p><roi><rK>``): an
in-context lookup that needs a head copying each ``<rK>`` into the next position, a head gathering X into the
answer position, and a head matching the two. Vicuna brings such heads from pretraining; a model trained from
scratch has to grow them. This probe isolates that step with the easiest possible regions: each region embedding
is the embedding of one ordinary word of the tokenizer, and a query names that word. No image, no region encoder.

    python benchmarks/binding_probe.py [--layout groma|adjacent] [--steps 1500] [--regions 12] [--device cuda]
        [--index-in-region] [--adjacent-first N] [--first-layout adjacent|echo] [--noise F] [--pairs] [--copy-mix F]
        [--pointer]

``groma``: the reference's layout (``USER: <p> word </p> <roi>`` -> ``<rK>``); ``adjacent``: the answer follows the
word directly (one hop fewer). The model is the embedded default's language backbone architecture, freshly
initialised (the recipe's ``init_seed``), with the default's tokenizer. Prints accuracy every 100 steps next to
chance (picking one of the sample's regions at random), and the machine. ``--index-in-region`` adds each ``<rK>``'s
embedding, rescaled to the word's RMS, to region K's word (what the recipe option ``index_region_tokens`` does to
region tokens); ``--adjacent-first N`` trains N steps on the adjacent (or ``--first-layout``) layout before the chosen
one; ``--noise F`` adds Gaussian noise of F times the word's RMS to each region's word; ``echo``: the REC layout with
the answer repeating ``<p>word</p>`` before ``<roi>``; ``--pointer`` adds to each ``<rK>`` logit a learned match of
the hidden state with region K's slot (what the recipe option ``region_pointer`` does).
"""

from __future__ import annotations

import argparse
import platform
import random
import time

import torch
import torch.nn.functional as F

from groma_core import tokens as T
from groma_core.api import build, default_model
from groma_core.training.synthetic import RecallDataset, ordinary_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layout", choices=("groma", "adjacent", "echo"), default="groma")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--copy-mix", type=float, default=0.0, help="fraction of each batch that is dense copying text")
    ap.add_argument("--adjacent-first", type=int, default=0, help="a curriculum: this many adjacent-layout steps first")
    ap.add_argument("--first-layout", choices=("adjacent", "echo"), default="adjacent",
                    help="the layout of the --adjacent-first steps")
    ap.add_argument("--regions", type=int, default=12, help="each sample has 2..N regions")
    ap.add_argument("--queries", type=int, default=8, help="queries per sample (regions drawn with replacement)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--index-in-region", action="store_true",
                    help="add <rK>'s embedding to region K's embedding (the recipe option index_region_tokens)")
    ap.add_argument("--noise", type=float, default=0.0,
                    help="add Gaussian noise of this many times the word's RMS to each region's word (real region "
                    "tokens carry box position and appearance besides the name)")
    ap.add_argument("--pairs", action="store_true",
                    help="each region is a pair of words (12 x 8 words, like colour x shape; a sample's regions may "
                    "share one word), its slot the sum of their embeddings, and a query names both words")
    ap.add_argument("--pointer", action="store_true",
                    help="the <rK> logits also get a content match between the hidden state and region K's slot "
                    "(the recipe option region_pointer)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    model = build(default_model() / "recipe.yaml", ["weights=null"])
    backbone, tok = model.language_backbone.to(args.device), model.tokenizer
    region_ids = tok.region_ids[: args.regions]
    words = torch.tensor(ordinary_ids(tok))

    def text(s: str) -> list[int]:
        return tok.encode(s, add_bos=False)

    prefix = text("Regions:")
    p_open, p_close = tok.token_id(T.P_OPEN), tok.token_id(T.P_CLOSE)
    roi_open, roi_close = tok.token_id(T.ROI_OPEN), tok.token_id(T.ROI_CLOSE)
    user = text("USER:")
    locate, rest = text("USER: Locate"), text("in the image. ASSISTANT:")

    first_words, second_words = words[:12], words[12:20]  # the pairs' vocabularies (--pairs)
    second_of: list[list[tuple[int, int]]] = []  # per batch row: (position, second word) of each pair's slot
    slots_of: list[list[int]] = []  # per batch row: the position of region K's slot, K = 0..n-1

    def sample(layout: str) -> tuple[list[int], list[int], float]:
        n = int(torch.randint(2, args.regions + 1, (1,)))
        if args.pairs:
            pairs = torch.randperm(len(first_words) * len(second_words))[:n].tolist()
            names = [[int(first_words[c // 8]), int(second_words[c % 8])] for c in pairs]
        else:
            names = [[w] for w in words[torch.randperm(len(words))[:n]].tolist()]
        ids = [tok.bos_id] + prefix
        seconds = []
        slots_of.append([])
        for k in range(n):
            ids += [region_ids[k], names[k][0]]
            slots_of[-1].append(len(ids) - 1)  # a pair's slot holds its first word; its second is added below
            if args.pairs:
                seconds.append((len(ids) - 1, names[k][1]))
        second_of.append(seconds)
        labels = [-100] * len(ids)
        for k in torch.randint(0, n, (args.queries,)).tolist():
            if layout == "groma":  # as the REC prompt: the phrase, the rest of the question, then <roi>
                q = locate + [p_open, *names[k], p_close] + rest + [roi_open]
            elif layout == "echo":  # the REC prompt, and the answer repeats the phrase before <roi>
                q = locate + [p_open, *names[k], p_close] + rest + [p_open, *names[k], p_close, roi_open]
            else:
                q = user + names[k]
            ids += q + [region_ids[k]] + ([roi_close] if layout != "adjacent" else [])
            labels += [-100] * len(q) + [region_ids[k]] + ([-100] if layout != "adjacent" else [])
        return ids, labels, 1.0 / n

    recall = RecallDataset(tok, 1, copy_fraction=1.0)

    def copy_sample() -> tuple[list[int], list[int], float]:
        """Dense in-context copying (the ``recall`` format's copying samples)."""
        s = recall.copying()
        return s["input_ids"], s["labels"], -1.0

    hidden = backbone.hidden_size
    pointer = torch.nn.ModuleDict({"q": torch.nn.Linear(hidden, hidden), "k": torch.nn.Linear(hidden, hidden)})
    params = list(backbone.parameters()) + (list(pointer.parameters()) if args.pointer else [])
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    hits = total = copy_hits = copy_total = 0
    chance = []
    start = time.perf_counter()
    print(f"layout {args.layout}, 2-{args.regions} regions, {args.queries} queries per sample, batch {args.batch_size}")
    for step in range(1, args.steps + 1):
        layout = args.first_layout if step <= args.adjacent_first else args.layout
        n_copy = round(args.copy_mix * args.batch_size)
        second_of.clear()
        slots_of.clear()
        rows = [copy_sample() for _ in range(n_copy)] + [sample(layout) for _ in range(args.batch_size - n_copy)]
        length = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), length), tok.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        labels_binding_mask = [True] * len(rows)
        for i, (r_ids, r_labels, c) in enumerate(rows):
            ids[i, : len(r_ids)] = torch.tensor(r_ids)
            labels[i, : len(r_labels)] = torch.tensor(r_labels)
            if c < 0:
                labels_binding_mask[i] = False
            else:
                chance.append(c)
        ids, labels = ids.to(args.device), labels.to(args.device)
        mask = (ids != tok.pad_id).long()
        position_ids = torch.arange(length, device=args.device).expand_as(ids)
        embeds = backbone.embed(ids)
        is_index = torch.isin(ids, torch.tensor(region_ids, device=ids.device))
        in_region = torch.zeros_like(is_index)  # a region's word: right after its <rK>
        in_region[:, 1:] = is_index[:, :-1]
        in_region &= ~is_index
        if args.pairs:  # a pair's slot: the sum of its two words' embeddings
            extra = torch.zeros_like(embeds)
            for row, seconds in enumerate(second_of, start=n_copy):
                for position, word in seconds:
                    extra[row, position] = backbone.embed(torch.tensor([[word]], device=ids.device))[0, 0]
            embeds = embeds + extra
        if args.noise:
            word_rms = embeds.detach().pow(2).mean(-1, keepdim=True).sqrt()
            noise = torch.randn_like(embeds) * word_rms * args.noise
            embeds = torch.where(in_region[..., None], embeds + noise, embeds)
        if args.index_in_region:  # add <rK>'s embedding to region K's word
            shifted = torch.zeros_like(embeds)
            shifted[:, 1:] = embeds[:, :-1]
            rms = lambda x: x.detach().pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-6)  # noqa: E731
            embeds = torch.where(in_region[..., None], embeds + shifted * rms(embeds) / rms(shifted), embeds)
        out = backbone(embeds, mask, position_ids)
        logits = out.logits
        if args.pointer:  # score_K = q(h) . k(slot K / rms) / sqrt(H), added to <rK>'s logit where region K exists
            k_max = len(region_ids)
            slots = torch.zeros(len(rows), k_max, hidden, device=ids.device)
            valid = torch.zeros(len(rows), k_max, dtype=torch.bool, device=ids.device)
            for row, positions in enumerate(slots_of, start=n_copy):
                slots[row, : len(positions)] = embeds[row, positions]
                valid[row, : len(positions)] = True
            slots = slots / slots.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-6)
            score = pointer["q"](out.hidden_states) @ pointer["k"](slots).transpose(1, 2) / hidden**0.5
            score = score.masked_fill(~valid[:, None, :], 0.0)
            logits = logits.index_add(2, torch.tensor(region_ids, device=ids.device), score)
        logits = logits[:, :-1].float()
        target = labels[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        supervised = (target != -100) & torch.tensor(labels_binding_mask, device=target.device)[:, None]
        hits += int((logits.argmax(-1)[supervised] == target[supervised]).sum())
        total += int(supervised.sum())
        copying = (target != -100) & ~supervised
        copy_hits += int((logits.argmax(-1)[copying] == target[copying]).sum())
        copy_total += int(copying.sum())
        if step % 100 == 0:
            print(
                f"step {step} ({layout}): accuracy {hits / total:.3f} (chance {sum(chance) / len(chance):.3f}), loss "
                f"{loss.item():.3f}, {time.perf_counter() - start:.0f} s"
                + (f"; copying accuracy {copy_hits / copy_total:.3f}" if copy_total else ""),
                flush=True,
            )
            hits = total = copy_hits = copy_total = 0
            chance = []
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"device {args.device}, torch {torch.__version__}"
    )


if __name__ == "__main__":
    main()
