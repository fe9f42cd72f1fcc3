"""The distilled student: the teacher's units with dot-product attention in place of Sinkhorn.

Same heads and scores as the teacher (models/otmel.py); every correlation assignment is
  rows = softmax_j(sim_ij / t)   (each row item attends over the columns)
  cols = softmax_i(sim_ij / t)   (each column item attends over the rows)
with sim = cos of projected features [..., N, M] and t = the teacher's eps, so one softmax stands in for
the teacher's Sinkhorn iterations. Training adds row-wise and column-wise KL(teacher plan || student
attention) to the task losses (models/train.py), which teaches the student's projections to produce
transport-like correspondences without solving OT at encode time.

A shallower mention encoder. The request path encodes mentions, and the text backbone dominates that time,
so the student's mention side may run only the first `mention_layers` backbone layers (the teacher runs all
of them); the top `tuned_layers` of those are fine-tuned with the heads and ship in the student's weights.
Entities are encoded once, at index build, with the full frozen backbone.

The exported encoders (models/export.py) are `StudentEncoder`s: text backbone + one head, end to end.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from models.otmel import HeadConfig, ItemEncoding, ItemHead, OTMELModel, attention_assignment


@dataclass
class StudentConfig:
    head: HeadConfig = field(default_factory=HeadConfig)
    temperature: float = 0.05  # softmax temperature = the teacher's eps (same kernel exp(sim / eps))
    mention_layers: int = 0  # text-backbone layers the mention encoder runs; 0 = all of them
    tuned_layers: int = 0  # the top ones of those fine-tuned with the heads (0: the backbone stays frozen)
    layer_config: dict = field(default_factory=dict)  # the backbone's BERT config, to rebuild the tuned layers

    def __post_init__(self) -> None:
        if not 0 <= self.tuned_layers <= self.mention_layers:
            raise ValueError(f"tuned_layers must be within mention_layers, got {self.tuned_layers} of {self.mention_layers}")

    @property
    def frozen_layers(self) -> int:
        """The backbone layer whose states feed a shallow student's mention side in training (mention_layers > 0)."""
        return self.mention_layers - self.tuned_layers


LAYER_KEYS = ("hidden_size", "num_attention_heads", "intermediate_size", "hidden_act", "hidden_dropout_prob",
              "attention_probs_dropout_prob", "layer_norm_eps")


def layer_config_of(bert: nn.Module) -> dict:
    """What rebuilds one of this BERT model's layers (`StudentConfig.layer_config`)."""
    return {k: getattr(bert.config, k) for k in LAYER_KEYS}


def content_attention(text_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool content tokens -> [B, T] attention mask of `[CLS] first [SEP] second [SEP]` (every student
    input is such a pair, the second text possibly empty): the content tokens plus 3 special tokens, from the
    start (the cached features keep only the content mask)."""
    pos = torch.arange(text_mask.shape[1], device=text_mask.device)
    return pos[None] < (text_mask.sum(-1) + 3)[:, None]


class OTMELStudent(OTMELModel):
    def __init__(self, cfg: StudentConfig | None = None) -> None:
        self.config = cfg or StudentConfig()
        super().__init__(self.config.head, attention_assignment(self.config.temperature))
        self.mention_layers = nn.ModuleList()
        if self.config.tuned_layers:
            from transformers import BertConfig
            from transformers.models.bert.modeling_bert import BertLayer

            # sdpa as in the loaded backbone (a bare config leaves the attention implementation unset).
            bert = BertConfig(**self.config.layer_config, attn_implementation="sdpa")
            self.mention_layers = nn.ModuleList(BertLayer(bert) for _ in range(self.config.tuned_layers))

    def init_tuned_layers(self, bert_layers: nn.ModuleList) -> None:
        """Start the tuned layers from the backbone's own layers [frozen_layers, mention_layers)."""
        lo = self.config.frozen_layers
        for mine, theirs in zip(self.mention_layers, list(bert_layers)[lo : self.config.mention_layers]):
            mine.load_state_dict(theirs.state_dict())  # copies the values

    def run_tuned_layers(self, tokens: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """tokens [B, T, Dt] (states of backbone layer `frozen_layers`), attention [B, T] -> the mention states."""
        if not len(self.mention_layers):
            return tokens
        additive = (~attention.bool())[:, None, None, :].to(tokens.dtype) * torch.finfo(tokens.dtype).min
        for layer in self.mention_layers:
            out = layer(tokens, attention_mask=additive)
            tokens = out[0] if isinstance(out, tuple) else out
        return tokens

    def encode_mentions(self, *features: torch.Tensor) -> ItemEncoding:
        tokens, text_mask, *rest = features
        tokens = self.run_tuned_layers(tokens, content_attention(text_mask))
        return self.mention(tokens, text_mask, *rest, assign=self.assign)


class StudentEncoder(nn.Module):
    """Text backbone + one student head, as exported to ONNX (mention side or entity side).

    Inputs:  input_ids, attention_mask [B, T] int64; text_mask, first_mask [B, T] bool (content tokens; tokens
             of the mention / entity name); image_global [B, Di]; image_patches [B, P, Di]; image_present [B] bool
    Outputs: global [B, 4d] (retrieval vector), text_local [B, T, d], image_local [B, P, d],
             g_text [B, d], g_image [B, d] (the unit globals the reranker's cross term needs)
    """

    def __init__(self, text_backbone: nn.Module, head: ItemHead, temperature: float) -> None:
        super().__init__()
        self.backbone = text_backbone
        self.head = head
        self.temperature = temperature
        self.assign = attention_assignment(temperature)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, text_mask: torch.Tensor,
                first_mask: torch.Tensor, image_global: torch.Tensor, image_patches: torch.Tensor,
                image_present: torch.Tensor) -> tuple[torch.Tensor, ...]:
        _, tokens = self.backbone(input_ids, attention_mask)
        enc = self.head(tokens, text_mask, first_mask, image_global, image_patches, image_present, self.assign)
        return enc.retrieval_vector(), enc.text_local, enc.image_local, enc.g_text, enc.g_image


class TextOnlyStudentEncoder(StudentEncoder):
    """`StudentEncoder` for batches with no image: text inputs only, the blank image's features folded in as
    constants (`ItemHead.forward_blank`), so the runtime neither builds nor projects all-zero image inputs.
    The same outputs as `StudentEncoder` fed image_present all False."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, text_mask: torch.Tensor,  # type: ignore[override]
                first_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        _, tokens = self.backbone(input_ids, attention_mask)
        # Through the module call (not forward_blank directly): the export names the nodes "/head/...", which is
        # how int8 quantisation keeps the head in fp32 (models/export.head_node_names).
        enc = self.head(tokens, text_mask, first_mask, None, None, None, self.assign)
        return enc.retrieval_vector(), enc.text_local, enc.image_local, enc.g_text, enc.g_image


def mention_backbone(text_backbone: nn.Module, student: OTMELStudent) -> nn.Module:
    """The student's mention-side text backbone: the first `mention_layers` layers, the tuned ones replaced by
    the student's (a copy; the shared backbone stays whole for the entity side)."""
    cfg = student.config
    if not cfg.mention_layers:
        return text_backbone
    shallow = copy.deepcopy(text_backbone)
    layers = shallow.model.encoder.layer  # type: ignore[union-attr]
    if cfg.mention_layers > len(layers):
        raise ValueError(f"student mention encoder wants {cfg.mention_layers} layers, the backbone has {len(layers)}")
    kept = list(layers)[: cfg.mention_layers]
    for i, layer in enumerate(student.mention_layers):  # weights only: the modules keep the backbone's attention setup
        kept[cfg.frozen_layers + i].load_state_dict(layer.state_dict())
    shallow.model.encoder.layer = nn.ModuleList(kept)  # type: ignore[union-attr]
    shallow.model.config.num_hidden_layers = cfg.mention_layers  # type: ignore[union-attr]
    return shallow
