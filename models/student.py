"""The distilled student: the teacher's units with dot-product attention in place of Sinkhorn.

Same heads and scores as the teacher (models/otmel.py); every correlation assignment is
  rows = softmax_j(sim_ij / t)   (each row item attends over the columns)
  cols = softmax_i(sim_ij / t)   (each column item attends over the rows)
with sim = cos of projected features [..., N, M] and t = the teacher's eps, so one softmax stands in for
the teacher's Sinkhorn iterations. Training adds row-wise and column-wise KL(teacher plan || student
attention) to the task losses (models/train.py), which teaches the student's projections to produce
transport-like correspondences without solving OT at encode time.

The exported encoders (models/export.py) are `StudentEncoder`s: MiniLM + one head, end to end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from models.otmel import HeadConfig, ItemHead, OTMELModel, attention_assignment


@dataclass
class StudentConfig:
    head: HeadConfig = field(default_factory=HeadConfig)
    temperature: float = 0.05  # softmax temperature = the teacher's eps (same kernel exp(sim / eps))


class OTMELStudent(OTMELModel):
    def __init__(self, cfg: StudentConfig | None = None) -> None:
        self.config = cfg or StudentConfig()
        super().__init__(self.config.head, attention_assignment(self.config.temperature))


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
        self.assign = attention_assignment(temperature)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, text_mask: torch.Tensor,
                first_mask: torch.Tensor, image_global: torch.Tensor, image_patches: torch.Tensor,
                image_present: torch.Tensor) -> tuple[torch.Tensor, ...]:
        _, tokens = self.backbone(input_ids, attention_mask)
        enc = self.head(tokens, text_mask, first_mask, image_global, image_patches, image_present, self.assign)
        return enc.retrieval_vector(), enc.text_local, enc.image_local, enc.g_text, enc.g_image
