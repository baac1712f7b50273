"""End-to-end behaviour of a composed pipeline with tiny real stages."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from groma_core import tokens as T
from groma_core.errors import InputError
from groma_core.inference import Groma
from groma_core.prompt import TEMPLATES


def prompt_ids(model, question: str) -> list[int]:
    return model.tokenizer.encode(TEMPLATES["llava"].render([(question, None)]))


def test_forward_loss_backpropagates_into_every_trainable_stage(tiny_model, images):
    model = tiny_model.train()
    ids = prompt_ids(model, "Locate <p>the red square</p> in the image.")
    pixels = model.image_tokenizer.preprocess(images[:1])
    out = model(pixels, [ids], labels=[ids])
    n_regions = out.inputs.regions.boxes[0].shape[0]
    assert out.logits.shape == (
        1,
        len(ids) - 2 + model.image_tokenizer.num_tokens + 2 * n_regions,
        model.tokenizer.vocab_size,
    )
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name in ("image_projector", "region_encoder", "language_backbone", "image_tokenizer"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name


def test_expanded_sequence_follows_the_reference_layout(tiny_model, images):
    model = tiny_model
    tok = model.tokenizer
    ids = prompt_ids(model, "Locate <p>the red square</p> in the image.")
    inputs = model.prepare_inputs(model.image_tokenizer.preprocess(images[:1]), [ids])
    row = inputs.ids[0].tolist()
    n = inputs.regions.boxes[0].shape[0]
    first_image = row.index(tok.token_id(T.IMAGE))
    assert (
        row[first_image : first_image + model.image_tokenizer.num_tokens]
        == [tok.token_id(T.IMAGE)] * model.image_tokenizer.num_tokens
    )
    start = row.index(tok.region_ids[0])
    expected = [x for k in range(n) for x in (tok.region_ids[k], tok.token_id(T.REGION))]
    assert row[start : start + 2 * n] == expected
    # the image positions carry the projected image tokens, not the <image> embedding
    projected = model.image_projector(inputs.features.tokens)[0]
    assert torch.allclose(inputs.inputs_embeds[0, first_image : first_image + projected.shape[0]], projected)


def test_refer_box_becomes_its_region_and_feature(tiny_model, images):
    model = tiny_model
    tok = model.tokenizer
    ids = prompt_ids(model, "What is <roi><refer_box></roi><refer_feat>?")
    box = torch.tensor([[0.1, 0.2, 0.45, 0.5]])
    inputs = model.prepare_inputs(model.image_tokenizer.preprocess(images[:1]), [ids], refer_boxes=[box])
    k = int(inputs.regions.refer_index[0][0])
    assert torch.allclose(inputs.regions.boxes[0][k], box[0])
    assert inputs.regions.scores[0][k] == 1.0
    assert tok.region_ids[k] in inputs.prompt_ids[0] and tok.token_id(T.REFER_BOX) not in inputs.prompt_ids[0]
    feat_pos = (inputs.ids[0] == tok.token_id(T.REFER_FEAT)).nonzero().flatten()
    region_pos = (inputs.ids[0] == tok.token_id(T.REGION)).nonzero().flatten()
    assert torch.equal(inputs.inputs_embeds[0, feat_pos[0]], inputs.inputs_embeds[0, region_pos[k]])


def test_refer_count_mismatch_is_a_clear_error(tiny_model, images):
    ids = prompt_ids(tiny_model, "Compare <roi><refer_box></roi><refer_feat> and <roi><refer_box></roi><refer_feat>.")
    with pytest.raises(InputError, match="2 <refer_feat> tokens but 1 refer boxes"):
        tiny_model.prepare_inputs(
            tiny_model.image_tokenizer.preprocess(images[:1]), [ids], refer_boxes=[torch.tensor([[0.1, 0.1, 0.5, 0.5]])]
        )


def test_prompt_without_image_placeholder_is_rejected(tiny_model, images):
    ids = tiny_model.tokenizer.encode("no placeholders here")
    with pytest.raises(InputError, match="exactly one <image> and one <region>"):
        tiny_model.prepare_inputs(tiny_model.image_tokenizer.preprocess(images[:1]), [ids])


def test_batched_greedy_generation_equals_one_at_a_time(tiny_model, images):
    model = tiny_model
    questions = ["Locate <p>the red square</p> in the image.", "What is <roi><refer_box></roi><refer_feat>?"]
    boxes = [torch.zeros(0, 4), torch.tensor([[0.2, 0.3, 0.9, 0.8]])]
    ids = [prompt_ids(model, q) for q in questions]
    pixels = model.image_tokenizer.preprocess(images)
    batched = model.generate(pixels, ids, refer_boxes=boxes, max_new_tokens=6, eos_id=-1)
    for i in range(2):
        alone = model.generate(pixels[i : i + 1], [ids[i]], refer_boxes=[boxes[i]], max_new_tokens=6, eos_id=-1)
        assert alone.sequences[0] == batched.sequences[i]
        assert torch.equal(alone.regions.boxes[0], batched.regions.boxes[i])


def test_kv_cache_generation_matches_full_recomputation(tiny_model, images):
    model = tiny_model
    ids = prompt_ids(model, "Locate <p>the red square</p> in the image.")
    pixels = model.image_tokenizer.preprocess(images[:1])
    gen = model.generate(pixels, [ids], max_new_tokens=4, eos_id=-1, keep_step_logits=True)
    full = model(pixels, [ids + gen.sequences[0][:-1]])
    n_prompt = full.logits.shape[1] - 3
    for step in range(4):
        assert torch.allclose(full.logits[0, n_prompt - 1 + step], gen.step_logits[step][0], atol=1e-5)


def test_sampling_is_reproducible_with_a_generator(tiny_model, images):
    model = tiny_model
    ids = prompt_ids(model, "Describe the image.")
    pixels = model.image_tokenizer.preprocess(images[:1])
    runs = [
        model.generate(
            pixels,
            [ids],
            max_new_tokens=8,
            do_sample=True,
            top_p=0.9,
            eos_id=-1,
            generator=torch.Generator().manual_seed(7),
        ).sequences
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


# Sampling filters, through generate: many rows of one prompt, one sampled token each. Every row has the same
# next-token logits (rows decode as they would alone), so the drawn tokens are N independent draws from the
# filtered distribution, which the tests compute from those logits with the textbook definitions.
N_DRAWS = 4000
TEMPERATURE = 0.25  # sharpens the tiny random model's near-uniform logits: a few likely tokens and a long tail


@pytest.fixture(scope="module")
def draw_first_tokens(sp_dir):
    """draw(seed, **sampling) -> (Counter of the N_DRAWS first tokens, the next-token logits in float64)."""
    from PIL import Image

    from groma_core.api import build
    from groma_core.plugins import PluginManager
    from groma_core.recipe import validate_recipe
    from groma_core.testing import tiny

    manager = PluginManager()
    manager.register_plugin(tiny, name="tiny", distribution="groma-core-tests")
    recipe = {  # a short sequence (4 image tokens, 1 region, a few words) so that thousands of rows are cheap
        "image_tokenizer": {"plugin": "tiny-conv", "image_size": 16, "patch_size": 8, "channels": 16},
        "region_proposer": {"plugin": "grid", "cells": 1},
        "region_encoder": {"plugin": "roi-pool"},
        "language_backbone": {"plugin": "tiny-llama", "tokenizer": str(sp_dir)},
        "region_selection": {"score_threshold": 0.0},
    }
    torch.manual_seed(0)
    model = build(validate_recipe(recipe, manager), manager=manager).eval()
    ids = model.tokenizer.encode(f"{T.IMAGE}\n{T.REGION}\nA picture of")
    pixels = model.image_tokenizer.preprocess([Image.new("RGB", (16, 16), (90, 30, 200))])

    def draw(seed: int = 0, **sampling):
        out = model.generate(
            pixels.expand(N_DRAWS, -1, -1, -1),
            [ids] * N_DRAWS,
            max_new_tokens=1,
            do_sample=True,
            temperature=TEMPERATURE,
            eos_id=-1,
            keep_step_logits=True,
            generator=torch.Generator().manual_seed(seed),
            **sampling,
        )
        assert all(len(seq) == 1 for seq in out.sequences)
        logits = out.step_logits[0].double()
        assert torch.allclose(logits, logits[:1].expand_as(logits), atol=1e-5)  # the same distribution every row
        return Counter(seq[0] for seq in out.sequences), logits[0]

    return draw


def filtered_distribution(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> dict[int, float]:
    """The distribution sampling must follow: softmax(logits / temperature); with top_k, the k most likely tokens
    renormalised; then with top_p, the nucleus: the smallest set of most likely tokens whose probability reaches
    top_p, renormalised (top-k first, as transformers does)."""
    probs = (logits / TEMPERATURE).softmax(-1)
    order = probs.argsort(descending=True)
    kept = order[:top_k] if top_k else order
    p = probs[kept] / probs[kept].sum()
    if top_p < 1.0:
        size = int((p.cumsum(0) < top_p).sum()) + 1
        kept, p = kept[:size], p[:size] / p[:size].sum()
    return dict(zip(kept.tolist(), p.tolist()))


def assert_draws_follow(counts: Counter, expected: dict[int, float]) -> None:
    """No token outside ``expected`` is ever drawn, and each token's count lies within 5 binomial standard
    deviations of N_DRAWS * p: a correct sampler misses that with probability below 1e-6 per token (the seed is
    fixed, so the test itself is deterministic), while a wrong temperature or filter moves the counts by tens of
    deviations."""
    assert set(counts) <= set(expected), f"drawn outside the kept set: {set(counts) - set(expected)}"
    for token, p in expected.items():
        sd = math.sqrt(N_DRAWS * p * (1 - p))
        assert abs(counts[token] - N_DRAWS * p) <= 5 * sd + 1e-6, (token, counts[token], N_DRAWS * p, sd)


def test_unfiltered_sampling_follows_the_softmax_tail_included(draw_first_tokens):
    counts, logits = draw_first_tokens(seed=1)
    expected = filtered_distribution(logits)
    assert_draws_follow(counts, expected)
    top4 = sorted(expected, key=expected.get, reverse=True)[:4]
    tail = 1.0 - sum(expected[t] for t in top4)
    assert tail > 0.1  # the filters below have a large mass to remove: ignoring one would draw ~N * tail tokens
    drawn_tail = N_DRAWS - sum(counts[t] for t in top4)
    assert abs(drawn_tail - N_DRAWS * tail) <= 5 * math.sqrt(N_DRAWS * tail * (1 - tail))


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_top_k_draws_only_the_k_most_likely_tokens_renormalised(draw_first_tokens, top_k):
    counts, logits = draw_first_tokens(seed=2, top_k=top_k)
    expected = filtered_distribution(logits, top_k=top_k)
    assert len(expected) == top_k
    assert_draws_follow(counts, expected)
    assert min(expected.values()) * N_DRAWS > 20 and len(counts) == top_k  # every kept token is drawn


@pytest.mark.parametrize("size", [2, 3])
def test_top_p_draws_only_the_nucleus_renormalised(draw_first_tokens, size):
    _, logits = draw_first_tokens(seed=3)
    full = filtered_distribution(logits)
    cumulative = sorted(full.values(), reverse=True)
    cumulative = [sum(cumulative[: i + 1]) for i in range(len(cumulative))]
    top_p = (cumulative[size - 2] + cumulative[size - 1]) / 2  # halfway: the nucleus has `size` tokens
    counts, _ = draw_first_tokens(seed=4, top_p=top_p)
    expected = filtered_distribution(logits, top_p=top_p)
    assert len(expected) == size
    assert_draws_follow(counts, expected)


def test_top_k_then_top_p_takes_the_nucleus_of_the_renormalised_top_k(draw_first_tokens):
    _, logits = draw_first_tokens(seed=5)
    top4 = filtered_distribution(logits, top_k=4)
    p = sorted(top4.values(), reverse=True)
    top_p = p[0] + p[1] / 2  # within the renormalised top 4: a nucleus of 2 tokens
    expected = filtered_distribution(logits, top_k=4, top_p=top_p)
    assert len(expected) == 2
    assert len(filtered_distribution(logits, top_p=top_p)) > 2  # the nucleus of the whole distribution is larger
    counts, _ = draw_first_tokens(seed=6, top_k=4, top_p=top_p)
    assert_draws_follow(counts, expected)


def test_user_boxes_proposer_gives_exactly_the_user_boxes(tiny_recipe, manager, images):
    from groma_core.api import build
    from groma_core.recipe import validate_recipe

    tiny_recipe["region_proposer"] = {"plugin": "user-boxes"}
    model = build(validate_recipe(tiny_recipe, manager), manager=manager).eval()
    boxes = torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.95]])
    ids = prompt_ids(model, "Compare <roi><refer_box></roi><refer_feat> and <roi><refer_box></roi><refer_feat>.")
    inputs = model.prepare_inputs(model.image_tokenizer.preprocess(images[:1]), [ids], refer_boxes=[boxes])
    assert torch.equal(inputs.regions.boxes[0], boxes)
    assert inputs.regions.refer_index[0].tolist() == [0, 1]
    empty = model.prepare_inputs(model.image_tokenizer.preprocess(images[:1]), [prompt_ids(model, "Hi.")])
    assert empty.regions.boxes[0].shape == (0, 4)


def test_ground_boxes_rewrite_ids_and_labels(tiny_model, images):
    model = tiny_model
    tok = model.tokenizer
    text = TEMPLATES["llava"].render([("Locate <p>the red square</p> in the image.", "<roi><ground_box></roi>")])
    ids = tok.encode(text)
    labels = [-100] * (len(ids) - 4) + ids[-4:]
    gt = torch.tensor([[0.06, 0.08, 0.5, 0.5]])
    out = model(model.image_tokenizer.preprocess(images[:1]), [ids], ground_boxes=[gt], labels=[labels])
    k = int(out.inputs.regions.ground_index[0][0])
    supervised = out.inputs.labels[0][out.inputs.labels[0] != -100].tolist()
    assert tok.region_ids[k] in supervised and tok.token_id(T.GROUND_BOX) not in supervised
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize(
    "box, message",
    [
        ([0.5, 0.2, 0.3, 0.6], "x2 > x1"),
        ([0.1, 0.2, 1.3, 0.6], r"outside \[0, 1\]"),
        ([float("nan"), 0.2, 0.3, 0.6], "not finite"),
    ],
)
def test_bad_refer_boxes_are_clear_errors(tiny_model, images, box, message):
    ids = prompt_ids(tiny_model, "What is <roi><refer_box></roi><refer_feat>?")
    with pytest.raises(InputError, match=rf"refer_boxes\[0\]: box 0 .*{message}"):
        tiny_model.prepare_inputs(
            tiny_model.image_tokenizer.preprocess(images[:1]), [ids], refer_boxes=[torch.tensor([box])]
        )


def test_batch_of_eight_mixed_prompts_equals_one_at_a_time(tiny_model):
    from PIL import Image

    model = tiny_model
    questions = [
        ("Locate <p>the red square</p> in the image.", []),
        ("What is <roi><refer_box></roi><refer_feat>?", [[0.1, 0.1, 0.6, 0.5]]),
        ("[grounding]Give me a concise description of the image.", []),
        (
            "Compare <roi><refer_box></roi><refer_feat> with <roi><refer_box></roi><refer_feat> please.",
            [[0.0, 0.0, 0.5, 0.5], [0.4, 0.4, 1.0, 1.0]],
        ),
        ("Hi.", []),
        ("Is there a circle here? Tell me where it is.", []),
        ("Please describe <roi><refer_box></roi><refer_feat> in details.", [[0.2, 0.3, 0.9, 0.95]]),
        ("Where is the tree?", []),
    ]
    images = [Image.new("RGB", (40 + 13 * i, 90 - 7 * i), (30 * i, 200 - 20 * i, 90)) for i in range(8)]
    pixels = model.image_tokenizer.preprocess(images)
    ids = [prompt_ids(model, q) for q, _ in questions]
    boxes = [torch.tensor(b).reshape(-1, 4) for _, b in questions]
    batched = model.generate(pixels, ids, refer_boxes=boxes, max_new_tokens=5, eos_id=-1)
    for i in range(8):
        alone = model.generate(pixels[i : i + 1], [ids[i]], refer_boxes=[boxes[i]], max_new_tokens=5, eos_id=-1)
        assert alone.sequences[0] == batched.sequences[i], f"sample {i}"


def test_proposal_masks_follow_the_selected_regions_into_the_answer(tiny_model, images):
    from groma_core.grounding import parse_grounded
    from groma_core.processor import attach_masks

    model = tiny_model
    ids = prompt_ids(model, "What is <roi><refer_box></roi><refer_feat>?")
    user = torch.tensor([[0.05, 0.07, 0.4, 0.35]])
    inputs = model.prepare_inputs(model.image_tokenizer.preprocess(images[:1]), [ids], refer_boxes=[user])
    sources = inputs.regions.source_index[0]
    n_props = inputs.proposals.boxes[0].shape[0]
    assert sources[inputs.regions.refer_index[0][0]] == -1  # the user box is no proposal
    kept = sources[sources >= 0]
    assert torch.equal(inputs.proposals.boxes[0][kept], inputs.regions.boxes[0][sources >= 0])
    masks = [torch.full((4, 4), p, dtype=torch.int64) for p in range(n_props)]  # mask p holds the value p
    answer = parse_grounded(
        model.tokenizer.encode("<p>it</p><roi><r0><r1></roi>", add_bos=False), model.tokenizer, inputs.regions.boxes[0]
    )
    attach_masks(answer, sources, masks)
    got = answer.phrases[0].masks
    for k, mask in zip([0, 1], got):
        assert (mask is None) if sources[k] < 0 else int(mask[0, 0]) == int(sources[k])


def test_labels_stay_on_their_tokens_after_expansion(tiny_model, images):
    model = tiny_model
    tok = model.tokenizer
    text = TEMPLATES["llava"].render([("Locate <p>the red square</p> in the image.", "<roi><ground_box></roi>")])
    ids = tok.encode(text)
    labels = [-100] * (len(ids) - 4) + ids[-4:]
    out = model.prepare_inputs(
        model.image_tokenizer.preprocess(images[:1]),
        [ids],
        ground_boxes=[torch.tensor([[0.06, 0.08, 0.5, 0.5]])],
        labels=[labels],
    )
    row_ids, row_labels = out.ids[0], out.labels[0]
    supervised = (row_labels != -100).nonzero().flatten()
    assert len(supervised) == 4
    assert torch.equal(row_labels[supervised], row_ids[supervised])  # each label sits on its own token
    assert supervised[-1] == len(row_ids) - 1


def test_index_region_tokens_adds_each_regions_index_at_its_scale(tiny_recipe, manager, images):
    """With ``index_region_tokens`` region K reaches the language model as its region token plus <rK>'s embedding
    rescaled to the region token's RMS (so the token names its region); off (the reference), as the token alone."""
    from groma_core.api import build
    from groma_core.recipe import validate_recipe

    tiny_recipe["region_proposer"] = {"plugin": "user-boxes"}
    boxes = torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.95]])
    for on in (False, True):
        torch.manual_seed(0)
        model = build(validate_recipe({**tiny_recipe, "index_region_tokens": on}, manager), manager=manager).eval()
        tok = model.tokenizer
        ids = prompt_ids(model, "Compare <roi><refer_box></roi><refer_feat> and <roi><refer_box></roi><refer_feat>.")
        with torch.no_grad():
            inputs = model.prepare_inputs(model.image_tokenizer.preprocess(images[:1]), [ids], refer_boxes=[boxes])
            feats = model.region_encoder(inputs.features, inputs.regions.boxes)[0]
            index = model.language_backbone.embed(torch.tensor(tok.region_ids[: feats.shape[0]]))
        region_pos = (inputs.ids[0] == tok.token_id(T.REGION)).nonzero().flatten()
        feat_pos = (inputs.ids[0] == tok.token_id(T.REFER_FEAT)).nonzero().flatten()
        given = inputs.inputs_embeds[0, region_pos]
        assert feats.shape[0] == 2
        # a <refer_feat> carries exactly its region's token, index included
        for j, k in enumerate(inputs.regions.refer_index[0].tolist()):
            assert torch.equal(inputs.inputs_embeds[0, feat_pos[j]], given[k])
        if not on:
            assert torch.equal(given, feats)
            continue
        added = given - feats
        rms = lambda x: x.pow(2).mean(-1).sqrt()  # noqa: E731
        # float32 rounding of a sum of two vectors of equal RMS: 1e-4 relative
        assert torch.allclose(rms(added), rms(feats), rtol=1e-4)
        cos = torch.nn.functional.cosine_similarity(added, index, dim=-1)
        assert torch.allclose(cos, torch.ones_like(cos), atol=1e-4)


REFER = "<roi><refer_box></roi><refer_feat>"


def _two_box_forward(model, images, question: str = f"Compare {REFER} and {REFER}."):
    """A question about two user boxes through ``model``: (boxes, ids, pixels, output, the language model's own
    output on the same inputs)."""
    boxes = torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.95]])
    ids = prompt_ids(model, question)
    pixels = model.image_tokenizer.preprocess(images[:1])
    with torch.no_grad():
        out = model(pixels, [ids], refer_boxes=[boxes])
        inputs = out.inputs
        head = model.language_backbone(inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids)
    return boxes, ids, pixels, out, head


def test_region_pointer_adds_each_regions_match_to_its_index_logit(tiny_recipe, manager, images):
    """With ``region_pointer`` the logit of <rK> is the language model head's plus the pointer's match of the hidden
    state with region K's token, for the regions the sample has; every other logit is the head's alone; generation
    picks from the same logits and training reaches the pointer. Off (the reference) the model has no such tensors."""
    from groma_core.api import build
    from groma_core.recipe import validate_recipe

    tiny_recipe["region_proposer"] = {"plugin": "user-boxes"}
    reference = build(validate_recipe(tiny_recipe, manager), manager=manager)
    assert reference.region_pointer is None
    assert not [k for k in reference.state_dict() if k.startswith("region_pointer")]

    torch.manual_seed(0)
    model = build(validate_recipe({**tiny_recipe, "region_pointer": True}, manager), manager=manager).eval()
    tok = model.tokenizer
    boxes, ids, pixels, out, head = _two_box_forward(model, images)
    with torch.no_grad():
        regions = out.inputs.region_tokens[0]
        assert regions.shape[0] == 2
        pointer = model.region_pointer
        keys = pointer.k(regions / regions.pow(2).mean(-1, keepdim=True).sqrt())
        expected = pointer.q(head.hidden_states[0]) @ keys.T / head.hidden_states.shape[-1] ** 0.5
    columns = tok.region_ids[:2]
    added = out.logits[0] - head.logits[0]
    others = [j for j in range(added.shape[-1]) if j not in columns]
    assert torch.equal(added[:, others], torch.zeros_like(added[:, others]))
    # float32 sums of a few hundred products: 1e-5
    assert torch.allclose(added[:, columns], expected, atol=1e-5)
    assert expected.abs().max() > 1e-3  # a freshly initialised pointer already scores the two regions apart

    gen = model.generate(pixels, [ids], refer_boxes=[boxes], max_new_tokens=3, eos_id=-1, keep_step_logits=True)
    assert torch.allclose(gen.step_logits[0][0], out.logits[0, -1], atol=1e-5)

    model.train()
    model(pixels, [ids], refer_boxes=[boxes], labels=[ids]).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.region_pointer.parameters())


def _pointer_model_with(tiny_recipe, manager, option: str, **more):
    """The tiny model on user boxes with the region pointer, ``option`` and ``more`` options (seeded, in eval mode),
    after checking that the recipe refuses ``option`` without the pointer in one line."""
    from groma_core.api import build
    from groma_core.errors import RecipeError
    from groma_core.recipe import validate_recipe

    tiny_recipe["region_proposer"] = {"plugin": "user-boxes"}
    with pytest.raises(RecipeError, match=f"{option}: true needs region_pointer: true"):
        validate_recipe({**tiny_recipe, option: True}, manager)
    torch.manual_seed(0)
    recipe = validate_recipe({**tiny_recipe, "region_pointer": True, option: True, **more}, manager)
    return build(recipe, manager=manager).eval()


def test_region_pointer_box_adds_each_regions_geometry_to_its_key(tiny_recipe, manager, images):
    """With ``region_pointer_box`` the pointer's key of region K is the map of its token plus a map of its box
    (centre, size, log size), so two regions of the same token would still be told apart by where they are; the box
    map is trained with the pointer. Asked without the pointer, the recipe says what is missing in one line."""
    from groma_core.boxes import box_geometry

    model = _pointer_model_with(tiny_recipe, manager, "region_pointer_box")
    assert {"region_pointer.box.weight", "region_pointer.box.bias"} <= set(model.state_dict())
    boxes, ids, pixels, out, head = _two_box_forward(model, images)
    with torch.no_grad():
        regions, selected = out.inputs.region_tokens[0], out.inputs.regions.boxes[0]
        pointer = model.region_pointer
        keys = pointer.k(regions / regions.pow(2).mean(-1, keepdim=True).sqrt()) + pointer.box(box_geometry(selected))
        expected = pointer.q(head.hidden_states[0]) @ keys.T / head.hidden_states.shape[-1] ** 0.5
        # without the box term the scores differ: the geometry is part of what is added
        without = pointer.q(head.hidden_states[0]) @ (keys - pointer.box(box_geometry(selected))).T
    added = out.logits[0] - head.logits[0]
    columns = model.tokenizer.region_ids[:2]
    # float32 sums of a few hundred products: 1e-5
    assert torch.allclose(added[:, columns], expected, atol=1e-5)
    assert not torch.allclose(added[:, columns], without / head.hidden_states.shape[-1] ** 0.5, atol=1e-3)
    model.train()
    model(pixels, [ids], refer_boxes=[boxes], labels=[ids]).loss.backward()
    assert pointer.box.weight.grad is not None and pointer.box.weight.grad.abs().sum() > 0


def test_box_relations_say_which_side_of_another_box_a_box_lies():
    """The relation features of a box wholly right of and below another: the right and below gaps positive, the
    left and above gaps negative, the centre offsets positive, the area ratio's sign that of the log ratio."""
    from groma_core.boxes import box_relations

    boxes = torch.tensor([[0.1, 0.1, 0.3, 0.3], [0.5, 0.6, 0.9, 0.9]])
    rel = box_relations(boxes)
    assert rel.shape == (2, 2, 7)
    right, left, below, above, dx, dy, area = rel[1, 0].tolist()  # box 1 against box 0
    assert right == pytest.approx(math.tanh(8 * 0.2)) and below == pytest.approx(math.tanh(8 * 0.3))
    assert left == pytest.approx(math.tanh(8 * -0.8)) and above == pytest.approx(math.tanh(8 * -0.8))
    assert dx == pytest.approx(math.tanh(4 * 0.5)) and dy == pytest.approx(math.tanh(4 * 0.55))
    assert area == pytest.approx(math.tanh(math.log(0.12 / 0.04) / 2), rel=1e-5)
    assert torch.allclose(rel[0, 1, :4], rel[1, 0, [1, 0, 3, 2]])  # the same gaps seen from the other box
    assert torch.allclose(rel[0, 1, 4:], -rel[1, 0, 4:])


def test_region_pointer_relation_scores_a_region_by_where_it_lies_against_an_anchor(tiny_recipe, manager, images):
    """With ``region_pointer_relation`` region K's pointer score also reads how its box lies against a softly chosen
    anchor region's. Built, it scores nothing and leaves every other weight as a build without it draws them; taught
    to pick the leftmost region as anchor and to like "wholly right of it", it raises the right-hand region's <rK>
    logit by tanh(8 x gap) and lowers the anchor's own; training reaches it."""
    plain = _pointer_model_with(tiny_recipe, manager, "region_pointer_box")
    model = _pointer_model_with(tiny_recipe, manager, "region_pointer_relation", region_pointer_box=True)
    relation = model.region_pointer.relation
    assert {f"region_pointer.relation.{n}.weight" for n in ("q", "k", "box", "relate")} <= set(model.state_dict())
    shared = plain.state_dict()
    assert all(torch.equal(v, shared[k]) for k, v in model.state_dict().items() if ".relation." not in k)
    boxes, ids, pixels, out, _ = _two_box_forward(model, images)
    assert torch.equal(out.logits, _two_box_forward(plain, images)[3].logits)
    with torch.no_grad():  # anchor: the region whose centre is furthest left; score: the gap wholly right of it
        for layer in (relation.q, relation.k, relation.box):
            layer.weight.zero_()
            layer.bias.zero_()
        relation.box.weight[0, 0] = -1.0
        relation.q.bias[0] = 1000.0
        relation.relate.bias[0] = 1.0
        taught = model(pixels, [ids], refer_boxes=[boxes]).logits[0]
    added = taught - out.logits[0]
    columns = model.tokenizer.region_ids[:2]
    # boxes x 0.1-0.4 and 0.5-0.9: region 1 lies 0.1 right of region 0, region 0 -0.3 "right of" itself
    expected = torch.tensor([math.tanh(8 * -0.3), math.tanh(8 * 0.1)]).expand(added.shape[0], 2)
    assert torch.allclose(added[:, columns], expected, atol=1e-5)  # float32 softmax of a 1000-wide margin: exact
    others = [c for c in range(added.shape[1]) if c not in columns]
    assert added[:, others].abs().max() == 0
    model.train()
    model(pixels, [ids], refer_boxes=[boxes], labels=[ids]).loss.backward()
    assert relation.relate.weight.grad.abs().sum() > 0 and relation.box.weight.grad.abs().sum() > 0


def test_phrase_bags_average_the_words_of_the_last_closed_phrase():
    from groma_core.model import phrase_bags

    P, Q = 90, 91  # stand-ins for <p> and </p>
    ids = torch.tensor([[5, P, 6, 7, Q, 8, P, 9, Q, 4, P, 3]])
    embeds = torch.arange(12, dtype=torch.float32).reshape(1, 12, 1).expand(1, 12, 2).clone()
    bags = phrase_bags(ids, embeds, P, Q)[0, :, 0].tolist()
    # before the first </p>: nothing; from it on the mean of positions 2, 3; from the second </p>: position 7 alone;
    # the phrase still open at the end does not count
    assert bags == [0, 0, 0, 0, 2.5, 2.5, 2.5, 2.5, 7, 7, 7, 7]


def test_phrase_tracker_follows_decoded_tokens_as_the_full_sequence_would():
    """Decoding feeds one token at a time; the bag it holds at each step must be what :func:`phrase_bags` gives over
    the whole sequence at that position, whether the prompt ends inside a phrase, after one, or before any."""
    from groma_core.model import PhraseTracker, phrase_bags

    P, Q = 90, 91
    g = torch.Generator().manual_seed(0)
    for prompt_len in (1, 4, 7):
        words = torch.randint(0, 10, (3, 16), generator=g)
        marks = torch.tensor([[2, 5, 9, 12], [0, 3, 6, 14], [6, 8, 10, 15]])  # <p>, </p>, <p>, </p> per row
        ids = words.clone()
        for row, (a, b, c, d) in enumerate(marks.tolist()):
            ids[row, [a, c]], ids[row, [b, d]] = P, Q
        embeds = torch.randn(3, 16, 4, generator=g)
        full = phrase_bags(ids, embeds, P, Q)
        tracker = PhraseTracker(ids[:, :prompt_len], embeds[:, :prompt_len], P, Q)
        # float32 means of a few vectors summed in another order: 1e-6
        assert torch.allclose(tracker.bag[:, 0], full[:, prompt_len - 1], atol=1e-6)
        for t in range(prompt_len, 16):
            tracker.feed(ids[:, t], embeds[:, t : t + 1])
            assert torch.allclose(tracker.bag[:, 0], full[:, t], atol=1e-6), (prompt_len, t)


def test_region_pointer_words_adds_the_last_phrase_to_the_query(tiny_recipe, manager, images):
    """With ``region_pointer_words`` the pointer's query also maps the mean input embedding of the last phrase (at
    unit RMS): the prompt's phrase reaches the <rK> scores after it; decoding scores its first step as the forward
    does; the map is trained with the pointer. Asked without the pointer, the recipe says what is missing."""
    from groma_core.model import phrase_bags

    model = _pointer_model_with(tiny_recipe, manager, "region_pointer_words")
    assert {"region_pointer.words.weight", "region_pointer.words.bias"} <= set(model.state_dict())
    tok = model.tokenizer
    question = f"Which is <p>the red circle</p>: {REFER} or {REFER}?"
    boxes, ids, pixels, out, head = _two_box_forward(model, images, question)
    inputs = out.inputs
    with torch.no_grad():
        pointer, regions = model.region_pointer, inputs.region_tokens[0]
        bags = phrase_bags(inputs.ids, inputs.inputs_embeds, tok.token_id("<p>"), tok.token_id("</p>"))[0]
        unit = bags / bags.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-6)
        keys = pointer.k(regions / regions.pow(2).mean(-1, keepdim=True).sqrt())
        width = head.hidden_states.shape[-1]
        expected = (pointer.q(head.hidden_states[0]) + pointer.words(unit)) @ keys.T / width**0.5
    closed = int((inputs.ids[0] == tok.token_id("</p>")).nonzero()[0])
    assert bags[:closed].abs().max() == 0 and bags[closed:].abs().min() > 0  # the phrase counts once it is closed
    added = out.logits[0] - head.logits[0]
    columns = tok.region_ids[:2]
    # float32 sums of a few hundred products: 1e-5
    assert torch.allclose(added[:, columns], expected, atol=1e-5)
    gen = model.generate(pixels, [ids], refer_boxes=[boxes], max_new_tokens=2, eos_id=-1, keep_step_logits=True)
    assert torch.allclose(gen.step_logits[0][0], out.logits[0, -1], atol=1e-5)
    model.train()
    model(pixels, [ids], refer_boxes=[boxes], labels=[ids]).loss.backward()
    assert pointer.words.weight.grad is not None and pointer.words.weight.grad.abs().sum() > 0


def test_region_pointer_phrase_carries_each_choice_until_its_phrase_is_grounded(tiny_recipe, manager, images):
    """With ``region_pointer_phrase`` the tokens of an answer carry the phrase pointer's choices: its first phrase's
    region from <p> to <roi>, then from each </roi> the next phrase's region, or "no more" to the answer's end. The
    forward over an answer reads differently when its phrase names another region; decoding that answer, when the
    pointer itself chooses as the answer does, gives the forward's logits at every step; with labels the choices'
    cross-entropy joins the loss and trains the pointer. The option needs the words pointer, and says so."""
    from groma_core.errors import RecipeError
    from groma_core.model import decode
    from groma_core.recipe import validate_recipe

    with pytest.raises(RecipeError, match="region_pointer_phrase: true needs region_pointer_words: true"):
        validate_recipe({**tiny_recipe, "region_pointer": True, "region_pointer_phrase": True}, manager)
    model = _pointer_model_with(tiny_recipe, manager, "region_pointer_phrase", region_pointer_words=True)
    phrase = model.region_pointer.phrase
    assert {"region_pointer.phrase.carry.weight", "region_pointer.phrase.none"} <= set(model.state_dict())
    with torch.no_grad():  # choose by the box's centre (100 x); a named region -40; "no more" scores 0
        for layer in (phrase.match.q, phrase.match.k, phrase.match.words, phrase.match.box, phrase.stop):
            layer.weight.zero_()
            layer.bias.zero_()
        phrase.match.box.weight[0, 0] = 1.0
        phrase.match.q.bias[0] = 100.0
        phrase.named.fill_(-20.0)
    tok = model.tokenizer
    boxes = torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.95]])  # centres x 0.25 and 0.7, no overlap
    pixels = model.image_tokenizer.preprocess(images[:1])
    prompt = prompt_ids(model, f"Compare {REFER} and {REFER}.")

    def answer(first: int) -> list[int]:
        text = f"<p>the red square</p><roi><r{first}></roi> is bigger than <p>that</p><roi><r{1 - first}></roi>."
        return [t for t in tok.encode(text) if t != tok.bos_id]

    n = len(answer(1))
    with torch.no_grad():  # the logits that predict each token of the answer (the prompt's <image> expanded)
        full = model(pixels, [prompt + answer(1)], refer_boxes=[boxes]).logits[0, -n - 1 : -1]
        other = model(pixels, [prompt + answer(0)], refer_boxes=[boxes]).logits[0, -n - 1 : -1]
    start = answer(1).index(tok.token_id("<p>"))
    assert not torch.allclose(full[start + 1], other[start + 1], atol=1e-3)  # region 1's carry, not region 0's

    inputs = model.prepare_inputs(pixels, [prompt], refer_boxes=[boxes], padding_side="left")
    point = model._pointer_logits(inputs)
    steps, forced = [], answer(1)

    def force(logits, hidden):  # the answer's tokens picked; the pointer's own logits kept
        steps.append(point(logits, hidden)[0, 0])
        out = torch.full_like(logits, -1e4)
        out[0, 0, forced[len(steps) - 1]] = 0.0
        return out

    decode(
        model.language_backbone, point.carry(inputs.inputs_embeds)[0], inputs.attention_mask, inputs.position_ids,
        len(forced), None, tok.pad_id, adjust_logits=force, on_token=point.feed,
    )
    # after each <roi> the region the pointer chose is the pick, as teacher forcing has it; elsewhere the same float32
    # sums over the whole sequence or step by step with a cache: 1e-4
    regions = [i for i, t in enumerate(forced) if i and forced[i - 1] == tok.token_id("<roi>")]
    steps = torch.stack(steps)
    assert [int(steps[i].argmax()) for i in regions] == [forced[i] for i in regions]
    kept = [i for i in range(n) if i not in regions]
    assert torch.allclose(steps[kept], full[kept], atol=1e-4)

    # a language model head that prefers region 0 after the first phrase's <roi> still names region 1, the choice
    point = model._pointer_logits(inputs)
    head = [t for t in tok.encode("<p>the red square</p><roi>") if t != tok.bos_id]
    r0, r1 = tok.token_id("<r0>"), tok.token_id("<r1>")
    picks = []

    def prefer_r0(logits, hidden):
        raw = logits.clone()
        raw[..., r0] += 1e3
        out = point(raw, hidden)
        picks.append((int(raw[0, 0].argmax()), int(out[0, 0].argmax())))
        if len(picks) <= len(head):
            out = torch.full_like(logits, -1e4)
            out[0, 0, head[len(picks) - 1]] = 0.0
        return out

    decode(
        model.language_backbone, point.carry(inputs.inputs_embeds)[0], inputs.attention_mask, inputs.position_ids,
        len(head) + 1, None, tok.pad_id, adjust_logits=prefer_r0, on_token=point.feed,
    )
    assert picks[-1] == (r0, r1)

    model.train()
    ids = prompt + answer(1)
    out = model(pixels, [ids], refer_boxes=[boxes], labels=[[-100] * len(prompt) + answer(1)])
    words = F.cross_entropy(out.logits[0, :-1], out.inputs.labels[0, 1:], ignore_index=-100)
    # the three choices: region 1 first (no "no more" then), region 0 after it, "no more" after that
    left, right = (100 * x / model.language_backbone.hidden_size**0.5 for x in (0.25, 0.7))
    scores = torch.tensor([[left, right, -math.inf], [left, right - 40, 0.0], [left - 40, right - 40, 0.0]])
    choice = F.cross_entropy(scores, torch.tensor([1, 0, 2]))
    assert torch.allclose(out.loss - words, choice, atol=1e-4)  # float32 of a few hundred products: 1e-4
    out.loss.backward()
    assert phrase.match.box.weight.grad.abs().sum() > 0 and phrase.carry.weight.grad.abs().sum() > 0
    assert phrase.stop.bias.grad.abs() > 0 and phrase.none.grad.abs().sum() > 0


def test_phrase_choices_follow_an_answers_phrases_and_end_with_no_more():
    """The choices a phrase pointer is taught: the first phrase of an answer chosen before its <p> and carried to
    its <roi>; after each grounded phrase's </roi> the next phrase's region, carried to that phrase's <roi>, or "no
    more", carried to the answer's end; named regions count within the answer only (a run of supervised labels;
    the whole row without labels), never the prompt's region list or a bare phrase's."""
    from groma_core.model import NO_MORE, phrase_choices

    P, Q, ROI, END, R = 90, 91, 92, 93, [70, 71, 72, 73, 74]
    question = [5, ROI, R[3], END, 6, P, 7, Q, 8]  # a user box <r3> and a bare phrase
    regions = [R[0], 60, R[1], 60]  # "<r0><region><r1><region>": the prompt's list
    first = [P, 9, Q, ROI, R[1], END, 4, P, 9, 9, Q, ROI, R[2], R[4], END, 2]
    second = [P, 9, Q, ROI, R[0], END, 2]
    ids = regions + question + first + [5, 6] + second
    supervised = [False] * len(regions + question) + [True] * len(first) + [False, False] + [True] * len(second)
    labels = torch.tensor([[t if keep else -100 for t, keep in zip(ids, supervised)]])
    a, b = len(regions + question), len(regions + question + first) + 2
    found = phrase_choices(torch.tensor([ids]), labels, (P, Q, ROI, END), R)
    assert [(c.at, c.first, c.last, c.region, c.named, c.may_stop) for c in found] == [
        (a - 1, a, a + 3, 1, (), False),  # the first phrase, chosen before its <p>
        (a + 4, a + 5, a + 11, 2, (1,), True),  # after its </roi>: the next phrase's region, to that one's <roi>
        (a + 13, a + 14, a + 15, NO_MORE, (1, 2, 4), True),  # after the last </roi>: "no more" to the answer's end
        (b - 1, b, b + 3, 0, (), False),
        (b + 4, b + 5, b + 6, NO_MORE, (0,), True),
    ]
    assert all(c.supervised for c in found)
    unlabelled = phrase_choices(torch.tensor([ids]), None, (P, Q, ROI, END), R)
    assert [c.named for c in unlabelled] == [(3,), (3, 1), (3, 1, 2, 4), (3, 1, 2, 4, 0)]
    assert unlabelled[-1].last == len(ids) - 1  # one answer: the last choice runs to the row's end


def test_box_geometry_reads_position_size_and_aspect():
    from groma_core.boxes import box_geometry

    geometry = box_geometry(torch.tensor([[0.1, 0.2, 0.3, 0.6], [0.5, 0.5, 0.5, 0.7]]))
    expected = torch.tensor([[0.2, 0.4, 0.2, 0.4, math.log(0.2), math.log(0.4)],
                             [0.5, 0.6, 1e-3, 0.2, math.log(1e-3), math.log(0.2)]])
    # float32 of decimal fractions: 1e-6
    assert torch.allclose(geometry, expected, atol=1e-6)  # a zero-width box gets the floor, not -inf


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda b, s: (b.index_fill(0, torch.tensor([0]), float("nan")), s), "a box that is not finite"),
        (lambda b, s: (b, s.index_fill(0, torch.tensor([1]), 2.0)), "proposal 1: a score outside [0, 1]"),
        (lambda b, s: (b[:, [2, 1, 0, 3]], s), "a box with x1 < x0 or y1 < y0"),
        (lambda b, s: (b * 640, s), "a box whose centre is outside the image (normalized xyxy expected)"),
    ],
    ids=["nan-box", "score-2", "flipped", "pixels"],
)
def test_a_proposer_breaking_its_contract_is_named_at_run_time(tiny_model, images, corrupt, message):
    from groma_core.errors import ProposalError
    from groma_core.types import Proposals

    def broken(module, args, out):  # the real proposer's output, spoilt as a faulty plugin would
        pairs = [corrupt(b, s) for b, s in zip(out.boxes, out.scores)]
        return Proposals([b for b, _ in pairs], [s for _, s in pairs], out.extras)

    assert Groma(tiny_model).caption(images[0], max_new_tokens=2).text is not None  # the unspoilt proposer passes
    handle = tiny_model.region_proposer.register_forward_hook(broken)
    try:
        with pytest.raises(ProposalError) as err:
            Groma(tiny_model).caption(images[0], max_new_tokens=2)
    finally:
        handle.remove()
    plugin = tiny_model.recipe.stages["region_proposer"].plugin
    assert str(err.value).startswith(f"region proposer {plugin!r}: image 0, proposal ")
    assert message in str(err.value)


def test_decode_ends_each_row_at_its_own_eos_and_drops_what_follows(sp_dir):
    """Rows of one batch finishing at different steps (EOS forced through the logits hook): each sequence holds the
    tokens before its first EOS, no EOS and none of the padding fed after it; a row without EOS runs to the limit."""
    from groma_core.model import decode
    from groma_core.prompt import GromaTokenizer, SentencePieceCodec
    from groma_core.testing.tiny import TinyLlamaBackbone

    torch.manual_seed(0)
    tok = GromaTokenizer(SentencePieceCodec(sp_dir / "tokenizer.model"))
    backbone = TinyLlamaBackbone(tok, 32, 2, 4).eval()
    eos, plan = tok.eos_id, {0: 1, 1: 3}  # row -> the step at which it says EOS; row 2 never does
    step = {"n": 0}

    def force(logits, hidden):
        forced = torch.full_like(logits, -1e4)
        for row in range(logits.shape[0]):
            forced[row, 0, eos if plan.get(row) == step["n"] else 100 + row] = 0.0
        step["n"] += 1
        return forced

    embeds = backbone.embed(torch.tensor([[1, 5, 9]] * 3))
    sequences, _ = decode(
        backbone, embeds, torch.ones(3, 3, dtype=torch.long), torch.arange(3).expand(3, 3), 6, eos, tok.pad_id,
        adjust_logits=force,
    )
    assert sequences == [[100], [101, 101, 101], [102] * 6]
