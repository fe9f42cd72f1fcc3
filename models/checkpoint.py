"""Save and load trained OT-MEL heads: an fp16 state dict plus a JSON side file (config, data, metrics).

The shipped defaults live in models/weights/ (small: the teacher about 2.7 MB, the student about 6 MB with its
fine-tuned backbone layer); `make train` rewrites them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch

from models.otmel import HeadConfig, OTMELModel
from models.student import OTMELStudent, StudentConfig
from models.teacher import OTMELTeacher, TeacherConfig

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
STUDENT_WEIGHTS = WEIGHTS_DIR / "student.pt"
TEACHER_WEIGHTS = WEIGHTS_DIR / "teacher.pt"


def save_model(model: OTMELModel, path: Path, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    torch.save(state, path)
    body = {"config": asdict(model.config), **meta}  # type: ignore[arg-type]
    path.with_suffix(".json").write_text(json.dumps(body, indent=2, default=str) + "\n")


def read_meta(path: Path) -> dict:
    return json.loads(path.with_suffix(".json").read_text())


def load_model(path: Path) -> OTMELModel:
    """Rebuild the teacher or student named by the side file and load its weights (fp32, eval mode)."""
    meta = read_meta(path)
    raw = dict(meta["config"])
    head = HeadConfig(**raw.pop("head"))
    model: OTMELModel
    if meta["kind"] == "teacher":
        model = OTMELTeacher(TeacherConfig(head=head, **raw))
    elif meta["kind"] == "student":
        model = OTMELStudent(StudentConfig(head=head, **raw))
    else:
        raise ValueError(f"{path}: unknown model kind {meta['kind']!r}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()


def weights_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
