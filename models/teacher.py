"""The OT-MEL teacher: the three matching units with OT-guided correlation assignment.

Wherever the network must decide which mention token corresponds to which entity token (text unit),
which patch to which patch (visual unit) or which token to which patch inside one item (fusion unit),
the teacher solves an entropic optimal-transport problem instead of taking a softmax:
  cost  C = 1 - cos(x_i, y_j)   [..., N, M]  over projected features, detached from the graph
  plan  P = Sinkhorn(C, uniform marginals over real tokens/patches, eps)       [..., N, M]
and uses P (normalised per row, and per column, for the two directions) as the attention map.
Marginal constraints make every token carry mass, so a few tokens cannot take all the weight.
Shapes and scores: models/otmel.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from models.otmel import HeadConfig, OTMELModel, sinkhorn_assignment


@dataclass
class TeacherConfig:
    head: HeadConfig = field(default_factory=HeadConfig)
    eps: float = 0.05  # entropic regulariser, in cosine-cost units (OT-MEL)
    sinkhorn_iters: int = 10  # OT-MEL's release stops at 3; 10 brings the column marginals close


class OTMELTeacher(OTMELModel):
    """Mention and entity heads over frozen MiniLM tokens [B, 40, 384] and EfficientNet patches [B, 49, 1280]."""

    def __init__(self, cfg: TeacherConfig | None = None) -> None:
        self.config = cfg or TeacherConfig()
        super().__init__(self.config.head, sinkhorn_assignment(self.config.eps, self.config.sinkhorn_iters))
