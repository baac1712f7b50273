"""Groma's two-stage, class-agnostic Deformable DETR transformer on a single feature map."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from groma_plugin_deformable_detr.attention import MultiscaleDeformableAttention
from groma_plugin_deformable_detr.layers import Decoder, Encoder
from groma_plugin_deformable_detr.position import box_position_embedding, map_position_embedding

#: feature levels of Groma's Deformable DETR (``num_feature_levels`` of the released config)
NUM_LEVELS = 1


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``log(x / (1 - x))`` after clamping x to [0, 1] and both x and 1 - x to at least ``eps``."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def encoder_proposals(height: int, width: int, level: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """One proposal box per pixel of a map: centre = pixel centre, width = height = 0.05 * 2 ** level.

    Returns the box logits (h * w, 4) (``log(p / (1 - p))``, +inf for invalid boxes) and the validity mask
    (h * w, 1): a box is valid when all its coordinates lie strictly inside (0.01, 0.99).
    """
    y = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
    x = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
    centres = torch.stack(torch.meshgrid(x, y, indexing="xy"), -1).reshape(-1, 2)
    boxes = torch.cat([centres, torch.full_like(centres, 0.05 * 2.0**level)], -1)
    valid = ((boxes > 0.01) & (boxes < 0.99)).all(-1, keepdim=True)
    logits = torch.log(boxes / (1 - boxes)).masked_fill(~valid, float("inf"))
    return logits, valid


class BoxHead(nn.Module):
    """MLP ``d_model -> hidden -> hidden -> 4`` with ReLU between layers: box logit offsets (cx, cy, w, h)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d_model, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 4)])

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


@dataclass
class DeformableDetrOutput:
    """Everything the transformer computes for a batch of B maps (Q queries, L decoder layers, S map tokens).

    ``boxes`` and reference points are cxcywh in [0, 1]; logits are raw (before sigmoid).
    """

    encoder_logits: Tensor  # (B, S, 1) objectness of every encoder proposal
    encoder_coord_logits: Tensor  # (B, S, 4) box logits of every encoder proposal
    init_reference_points: Tensor  # (B, Q, 4) the top-Q encoder proposals, the decoder's fixed reference boxes
    intermediate_reference_points: Tensor  # (B, L, Q, 4) sigmoid(bbox_embed[l](h_l) + logit(init reference))
    hidden_states: Tensor  # (B, L, Q, d) decoder layer outputs
    logits_coco: Tensor  # (B, L, Q, 1) per-layer objectness, COCO-trained head
    logits_sa1b: Tensor  # (B, L, Q, 1) per-layer objectness, SA-1B-trained head
    boxes: Tensor  # (B, L, Q, 4) per-layer boxes

    @property
    def pred_boxes(self) -> Tensor:
        """(B, Q, 4) boxes of the last decoder layer."""
        return self.boxes[:, -1]


class TwoStageDeformableTransformer(nn.Module):
    """Encoder over the map, every map token as a proposal, the top ``num_queries`` proposals as fixed reference
    boxes of the decoder, and per-layer box and objectness heads.

    Mixed query selection: the positional part of each query embeds its proposal box; the content part is a
    learned embedding (``query_position_embeddings``). Parameter names follow the reference's
    ``ddetr_transformer``, with the heads (``decoder.bbox_embed`` etc. there) at the top level.
    """

    def __init__(
        self,
        d_model: int = 256,
        encoder_layers: int = 6,
        decoder_layers: int = 6,
        encoder_attention_heads: int = 8,
        decoder_attention_heads: int = 8,
        encoder_n_points: int = 4,
        decoder_n_points: int = 4,
        encoder_ffn_dim: int = 1024,
        decoder_ffn_dim: int = 1024,
        dropout: float = 0.1,
        num_queries: int = 300,
        box_head_hidden: int = 256,
    ):
        super().__init__()
        self.d_model = d_model
        self.num_queries = num_queries
        self.level_embed = nn.Parameter(torch.empty(NUM_LEVELS, d_model))
        self.encoder = Encoder(
            encoder_layers, d_model, encoder_attention_heads, NUM_LEVELS, encoder_n_points, encoder_ffn_dim, dropout
        )
        self.decoder = Decoder(
            decoder_layers, d_model, decoder_attention_heads, NUM_LEVELS, decoder_n_points, decoder_ffn_dim, dropout
        )
        self.query_position_embeddings = nn.Embedding(num_queries, d_model)
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.pos_trans = nn.Linear(2 * d_model, 2 * d_model)
        self.pos_trans_norm = nn.LayerNorm(2 * d_model)
        self._reset_parameters()
        # heads: bbox_embed[l] for decoder layer l, bbox_embed[decoder_layers] for the encoder proposals
        self.bbox_embed = nn.ModuleList(BoxHead(d_model, box_head_hidden) for _ in range(decoder_layers + 1))
        self.class_embed_enc = nn.Linear(d_model, 1)
        self.class_embed_coco = nn.ModuleList(nn.Linear(d_model, 1) for _ in range(decoder_layers))
        self.class_embed_sa1b = nn.ModuleList(nn.Linear(d_model, 1) for _ in range(decoder_layers))
        self._init_heads()

    @torch.no_grad()
    def _reset_parameters(self) -> None:
        """Xavier for every matrix, Deformable DETR's own scheme for the deformable attentions, N(0, 1) level
        embedding (the reference's initialisation for training from scratch)."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for module in self.modules():
            if isinstance(module, MultiscaleDeformableAttention):
                module.reset_parameters()
        nn.init.normal_(self.level_embed)

    @torch.no_grad()
    def _init_heads(self) -> None:
        """Objectness biases at the prior probability 0.01; box heads start by predicting no offset."""
        prior_bias = -math.log((1 - 0.01) / 0.01)
        for head in [self.class_embed_enc, *self.class_embed_coco, *self.class_embed_sa1b]:
            nn.init.constant_(head.bias, prior_bias)
        for head in self.bbox_embed:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)

    def forward(self, source: Tensor) -> DeformableDetrOutput:
        """Detect on a projected feature map ``source`` (B, d_model, h, w)."""
        batch, channels, height, width = source.shape
        if channels != self.d_model:
            raise ValueError(f"source has {channels} channels, expected d_model = {self.d_model}")
        if height * width < self.num_queries:
            raise ValueError(
                f"a {height}x{width} map has {height * width} proposals, fewer than num_queries = {self.num_queries}"
            )
        shapes = [(height, width)]
        position = map_position_embedding(height, width, self.d_model // 2, source.device).to(source.dtype)
        position = position.flatten(1).transpose(0, 1)[None] + self.level_embed[0]
        memory = self.encoder(source.flatten(2).transpose(1, 2), position.expand(batch, -1, -1), shapes)

        proposal_logits, valid = encoder_proposals(height, width, 0, source.device)
        object_query = self.enc_output_norm(self.enc_output(memory.masked_fill(~valid, 0.0)))
        encoder_logits = self.class_embed_enc(object_query)
        encoder_coord_logits = self.bbox_embed[-1](object_query) + proposal_logits.to(memory.dtype)

        top = torch.topk(encoder_logits[..., 0], self.num_queries, dim=1).indices
        top_coord_logits = torch.gather(encoder_coord_logits, 1, top[..., None].expand(-1, -1, 4)).detach()
        init_reference = top_coord_logits.sigmoid()
        query_pos = self.pos_trans_norm(self.pos_trans(box_position_embedding(top_coord_logits, self.d_model // 2)))
        query_pos = query_pos[..., : self.d_model]
        target = self.query_position_embeddings.weight[None].expand(batch, -1, -1)
        hidden = self.decoder(target, query_pos, init_reference, memory, shapes)

        init_logit = inverse_sigmoid(init_reference)
        references, boxes, coco, sa1b = [], [], [], []
        for layer in range(hidden.shape[1]):
            h = hidden[:, layer]
            delta = self.bbox_embed[layer](h)
            # the reference never refines its reference boxes, so each layer's box offsets apply to the initial
            # ones; the layer's output box stacks them on the previous layer's (look-forward-twice)
            references.append((delta + init_logit).sigmoid())
            previous = init_reference if layer == 0 else references[layer - 1]
            boxes.append((delta + inverse_sigmoid(previous)).sigmoid())
            coco.append(self.class_embed_coco[layer](h))
            sa1b.append(self.class_embed_sa1b[layer](h))
        return DeformableDetrOutput(
            encoder_logits=encoder_logits,
            encoder_coord_logits=encoder_coord_logits,
            init_reference_points=init_reference,
            intermediate_reference_points=torch.stack(references, 1),
            hidden_states=hidden,
            logits_coco=torch.stack(coco, 1),
            logits_sa1b=torch.stack(sa1b, 1),
            boxes=torch.stack(boxes, 1),
        )
