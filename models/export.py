"""Export the configured backbones to ONNX (checked by onnx.checker) with dynamic batch and length.

Run once per machine, at index-build time; the runtime and the index builder both load the result.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from models import contract
from models.backbones import Backbones, load_backbones

logger = logging.getLogger(__name__)

OPSET = 17


def _export(module: torch.nn.Module, args: tuple, path: Path, inputs: tuple, outputs: tuple, axes: dict) -> None:
    import onnx

    tmp = path.with_suffix(".tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow in HF code
        torch.onnx.export(
            module, args, str(tmp), input_names=list(inputs), output_names=list(outputs),
            dynamic_axes=axes, opset_version=OPSET, dynamo=False,
        )
    onnx.checker.check_model(str(tmp), full_check=True)
    tmp.replace(path)  # atomic: a half-written file never carries the final name


def export_backbones(backbones: Backbones, out_dir: Path, *, max_tokens: int, image_size: int) -> contract.EncoderSpec:
    """Write text/image ONNX files, the tokenizer and the spec into out_dir; return the spec."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = backbones.text.eval()
    ids = torch.ones(2, 12, dtype=torch.long)
    mask = torch.ones(2, 12, dtype=torch.long)
    _export(
        text, (ids, mask), out_dir / contract.TEXT_FILE, contract.TEXT_INPUTS, contract.TEXT_OUTPUTS,
        {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
         "text_global": {0: "batch"}, "text_tokens": {0: "batch", 1: "tokens"}},
    )
    shutil.copyfile(text.tokenizer_path, out_dir / "tokenizer.json")
    image = backbones.image
    if image is not None:
        pixels = torch.zeros(2, 3, image_size, image_size)
        _export(
            image.eval(), (pixels,), out_dir / contract.IMAGE_FILE, contract.IMAGE_INPUTS, contract.IMAGE_OUTPUTS,
            {"pixels": {0: "batch"}, "image_global": {0: "batch"}, "image_patches": {0: "batch"}},
        )
    spec = contract.EncoderSpec(
        name=f"{text.name}+{image.name if image else 'none'}",
        text_dim=text.dim,
        image_dim=image.dim if image else 0,
        image_patches=image.patches if image else 0,
        max_tokens=max_tokens,
        image_size=image_size,
        pixel_mean=image.mean if image else (0.0, 0.0, 0.0),
        pixel_std=image.std if image else (1.0, 1.0, 1.0),
        tokenizer="tokenizer.json",
        weights_sha256=backbones.weights_sha256,
    )
    (out_dir / contract.SPEC_FILE).write_text(spec.to_json())
    logger.info("exported encoders %s to %s (signature %s)", spec.name, out_dir, spec.signature())
    return spec


def ensure_exported(out_dir: Path, *, text: str, image: str, clip_path: Path | None, max_tokens: int,
                    image_size: int, heads: Path | None = None, quantize: bool = False) -> contract.EncoderSpec:
    """Export unless out_dir already holds a complete export of the same configuration.

    heads: trained student weights (models/weights/student.pt) -> also export the student's mention and
    entity encoders (text backbone + head); None -> zero-shot features only."""
    spec_path = out_dir / contract.SPEC_FILE
    files = [out_dir / contract.TEXT_FILE, out_dir / "tokenizer.json"] + ([out_dir / contract.IMAGE_FILE] if image != "none" else [])
    spec: contract.EncoderSpec | None = None
    if spec_path.exists() and all(f.exists() for f in files):
        spec = contract.EncoderSpec.from_json(spec_path.read_text())
        if not (spec.max_tokens == max_tokens and spec.image_size == image_size and (spec.image_dim > 0) == (image != "none")
                and spec.contract_version == contract.CONTRACT_VERSION):
            spec = None
    backbones = None
    if spec is None:
        logger.info("exporting encoders to ONNX in %s", out_dir)
        backbones = load_backbones(text, image, clip_path)
        spec = export_backbones(backbones, out_dir, max_tokens=max_tokens, image_size=image_size)
    if heads is None:
        if spec.heads:
            spec = replace(spec, heads="", heads_dim=0)
            spec_path.write_text(spec.to_json())
        return spec
    from models.checkpoint import weights_digest

    tag = f"student@{weights_digest(heads)}"
    student_files = [out_dir / f for f in (*contract.STUDENT_FILES.values(), contract.TEXT_ONLY_MENTION_FILE)]
    if quantize:
        student_files += [(out_dir / f).with_suffix(".int8.onnx")
                          for f in (contract.STUDENT_FILES["mention"], contract.TEXT_ONLY_MENTION_FILE)]
    # An int8 file of an older recipe (LEGACY_INT8_SUFFIXES) matches neither and is redone.
    if spec.heads in (tag, tag + contract.INT8_SUFFIX) and spec.int8_mentions == quantize and all(
            f.exists() for f in student_files):
        return spec
    backbones = backbones or load_backbones(text, image, clip_path)
    return export_student(backbones, spec, heads, out_dir, tag=tag, quantize=quantize)


def student_encoders(backbones: Backbones, heads: Path) -> dict[str, torch.nn.Module]:
    """The torch modules that are exported: {"mention": backbone + mention head, "entity": ... }."""
    from models.checkpoint import load_model
    from models.student import OTMELStudent, StudentEncoder, mention_backbone

    model = load_model(heads)
    if not isinstance(model, OTMELStudent):
        raise TypeError(f"{heads}: not student weights")
    cfg = model.config.head
    image_dim = backbones.image.dim if backbones.image is not None else 0
    if backbones.text.dim != cfg.text_dim or image_dim != cfg.image_dim:
        raise ValueError(f"{heads}: heads trained on {cfg.text_dim}-d text / {cfg.image_dim}-d image features, "
                         f"the configured backbones give {backbones.text.dim} / {image_dim}; set EL_ENCODER__HEADS=none "
                         "for zero-shot features or train heads for these backbones (make train)")
    out = {}
    for side, head in (("mention", model.mention), ("entity", model.entity)):
        head.dense_images = True  # static graph: no data-dependent indexing
        text = mention_backbone(backbones.text, model) if side == "mention" else backbones.text
        out[side] = StudentEncoder(text, head, model.config.temperature).eval()
    return out


def example_inputs(batch: int, tokens: int, cfg_image_dim: int, patches: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Student encoder inputs of a given shape: real-looking ids and masks, one row with an image."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (batch, tokens), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    attn = torch.ones(batch, tokens, dtype=torch.long)
    attn[-1, tokens // 2 :] = 0  # one padded row
    text_mask = attn.bool().clone()
    text_mask[:, 0] = False
    first = torch.zeros(batch, tokens, dtype=torch.bool)
    first[:, 1:3] = True
    present = torch.zeros(batch, dtype=torch.bool)
    present[0] = True
    ig = torch.rand(batch, cfg_image_dim, generator=g)
    ip = torch.rand(batch, patches, cfg_image_dim, generator=g)
    return ids, attn, text_mask, first, ig, ip, present


def export_student(backbones: Backbones, spec: contract.EncoderSpec, heads: Path, out_dir: Path, *, tag: str,
                   quantize: bool) -> contract.EncoderSpec:
    """Write student_{mention,entity}.onnx (checked, parity-tested at other shapes), optionally an int8
    mention encoder behind an accuracy gate; record the heads in the spec."""
    encoders = student_encoders(backbones, heads)
    head_cfg = next(iter(encoders.values())).head.cfg
    for side, module in encoders.items():
        path = out_dir / contract.STUDENT_FILES[side]
        export_student_encoder(module, path)
        err = parity_error(module, path)
        if err > 1e-4:
            raise RuntimeError(f"{path}: ONNX differs from torch by {err:.2e} (> 1e-4)")
        logger.info("exported %s (max |onnx - torch| %.1e at a new shape)", path.name, err)
    text_only = export_text_only_mention_encoder(encoders["mention"], out_dir)
    # int8 only for the mention encoder: it is the one on the request path; the entity encoder runs once, at
    # index build, and keeps full precision (so both precisions read the same index).
    int8_path = (out_dir / contract.STUDENT_FILES["mention"]).with_suffix(".int8.onnx")
    int8_ok = quantize and _quantize(out_dir, backbones.text.tokenizer_path, head_cfg)
    heads_tag = tag + contract.INT8_SUFFIX if int8_ok else tag
    if int8_ok:
        text_only_int8 = text_only.with_suffix(".int8.onnx")
        quantize_student_encoder(text_only, text_only_int8, keep_output_projections=True)
        check_text_only(int8_path, text_only_int8, backbones.text.tokenizer_path, head_cfg)
    if quantize and not int8_ok:
        logger.warning("the int8 mention encoder failed the accuracy gate; serving fp32")
        int8_path.unlink(missing_ok=True)
        text_only.with_suffix(".int8.onnx").unlink(missing_ok=True)
    spec = replace(spec, heads=heads_tag, heads_dim=head_cfg.hidden)
    (out_dir / contract.SPEC_FILE).write_text(spec.to_json())
    return spec


STUDENT_AXES = {name: {0: "batch", 1: "tokens"} for name in ("input_ids", "attention_mask", "text_mask", "first_mask",
                                                              "text_local")}
STUDENT_AXES |= {name: {0: "batch"} for name in ("image_global", "image_patches", "image_present", "global",
                                                 "image_local", "g_text", "g_image")}


def export_student_encoder(module: torch.nn.Module, path: Path) -> None:
    """One student encoder (backbone + head) to ONNX, traced at 2 x 12 with dynamic batch and length."""
    cfg = module.head.cfg  # type: ignore[union-attr]
    args = example_inputs(2, 12, cfg.image_dim, cfg.image_patches)
    _export(module, args, path, contract.STUDENT_INPUTS, contract.STUDENT_OUTPUTS, STUDENT_AXES)


def export_text_only_mention_encoder(module: torch.nn.Module, out_dir: Path) -> Path:
    """The mention encoder for runs with no image (`TextOnlyStudentEncoder`), checked against the full export."""
    from models.student import TextOnlyStudentEncoder

    text_only = TextOnlyStudentEncoder(module.backbone, module.head, module.temperature).eval()  # type: ignore[arg-type]
    cfg = module.head.cfg  # type: ignore[union-attr]
    path = out_dir / contract.TEXT_ONLY_MENTION_FILE
    args = example_inputs(2, 12, cfg.image_dim, cfg.image_patches)[: len(contract.TEXT_ONLY_INPUTS)]
    axes = {k: v for k, v in STUDENT_AXES.items() if k in contract.TEXT_ONLY_INPUTS + contract.STUDENT_OUTPUTS}
    _export(text_only, args, path, contract.TEXT_ONLY_INPUTS, contract.STUDENT_OUTPUTS, axes)
    inputs = example_inputs(3, 17, cfg.image_dim, cfg.image_patches, seed=1)
    err = text_only_error(out_dir / contract.STUDENT_FILES["mention"], path, inputs)
    if err > 1e-5:
        raise RuntimeError(f"{path}: differs from the full mention encoder by {err:.2e} on text-only rows")
    logger.info("exported %s (max |text-only - full| %.1e)", path.name, err)
    return path


def text_only_error(full: Path, text_only: Path, inputs: tuple[torch.Tensor, ...]) -> float:
    """Max |text-only graph - full graph| over every output, the full one fed image_present all False."""
    absent = (*inputs[:-1], torch.zeros_like(inputs[-1]))
    ref = run_onnx(full, absent)
    got = run_onnx(text_only, absent[: len(contract.TEXT_ONLY_INPUTS)], contract.TEXT_ONLY_INPUTS)
    return max(float(np.abs(a - b).max()) for a, b in zip(ref, got))


def check_text_only(full: Path, text_only: Path, tokenizer_path: Path, cfg) -> None:
    """The int8 text-only graph answers the probes as the int8 full graph does (the same quantised weights)."""
    err = text_only_error(full, text_only, probe_inputs(tokenizer_path, cfg.image_dim, cfg.image_patches))
    if err > 1e-4:
        raise RuntimeError(f"{text_only}: differs from {full.name} by {err:.2e} on the probes")


def run_onnx(path: Path, inputs: tuple[torch.Tensor, ...],
             names: tuple[str, ...] = contract.STUDENT_INPUTS) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {name: t.numpy() for name, t in zip(names, inputs)}
    return sess.run(list(contract.STUDENT_OUTPUTS), feed)


def parity_error(module: torch.nn.Module, path: Path, batch: int = 3, tokens: int = 17) -> float:
    """Max |ONNX - torch| over every output, at a batch and length other than the export's (2 x 12)."""
    cfg = module.head.cfg  # type: ignore[union-attr]
    inputs = example_inputs(batch, tokens, cfg.image_dim, cfg.image_patches, seed=1)
    with torch.no_grad():
        ref = [t.numpy() for t in module(*inputs)]
    got = run_onnx(path, inputs)
    return max(float(np.abs(a - b).max()) for a, b in zip(ref, got))


# Accuracy gate for the int8 mention encoder, on the probe pairs below (each text both a mention and an entity):
# every probe mention keeps its top-1 probe entity, and the mention x entity score matrix stays close to fp32's.
INT8_MIN_SCORE_CORRELATION = 0.98
INT8_MIN_UNIT_COSINE = 0.98
PROBE_TEXTS = [  # mention/entity pairs in the benchmarks' style
    ("Douglas Adams", "Douglas Adams wrote The Hitchhiker's Guide to the Galaxy."),
    ("Paris", "Instance of: capital city. Country: France."),
    ("Jordan", "Jordan scored 40 points for the Bulls last night."),
    ("Ada Lovelace", "Sex: female. Birth: 1815, London. Occupation: mathematician, writer."),
    ("Mercury", "Mercury is the closest planet to the Sun."),
    ("Queen", "Queen performed at Live Aid in 1985 at Wembley Stadium."),
    ("Amazon", "Instance of: river. Country: Brazil, Peru, Colombia."),
    ("Lincoln", "Abraham Lincoln delivered the Gettysburg Address in 1863."),
    ("Jordan", "Instance of: country. Capital: Amman. Continent: Asia."),
    ("Mercury", "Freddie Mercury was the lead singer of Queen."),
    ("Lincoln", "Instance of: city. Country: England. County: Lincolnshire."),
    ("Paris Hilton", "Paris Hilton is an American media personality and businesswoman."),
]


def probe_inputs(tokenizer_path: Path, image_dim: int, patches: int, max_tokens: int = 40) -> tuple[torch.Tensor, ...]:
    """Real tokenised probe pairs (no images) in the student encoder's input layout."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.enable_truncation(max_tokens, strategy="longest_first")
    tok.enable_padding()
    encs = tok.encode_batch(PROBE_TEXTS)
    ids = torch.tensor([e.ids for e in encs])
    attn = torch.tensor([e.attention_mask for e in encs])
    special = torch.tensor([e.special_tokens_mask for e in encs]).bool()
    types = torch.tensor([e.type_ids for e in encs])
    content = attn.bool() & ~special
    n = len(encs)
    return (ids, attn, content, content & (types == 0), torch.zeros(n, image_dim), torch.zeros(n, patches, image_dim),
            torch.zeros(n, dtype=torch.bool))


def head_node_names(model) -> list[str]:
    """The student head's node names, to keep it out of int8 quantisation: as they are in the graph, and as the
    quantiser renames a Gemm it turns into a MatMul first (`<name>_MatMul`), which a list of the graph's own names
    does not exclude. Quantised, the head's image projections (fed the all-zero blank image of a text-only item)
    bent the fusion units of the retrieval vector (cosine to fp32 about 0.55) and cost H@1."""
    names = [n.name for n in model.graph.node if n.name.startswith("/head")]
    return names + [f"{n.name}_MatMul" for n in model.graph.node if n.name.startswith("/head") and n.op_type == "Gemm"]


def _quantize(out_dir: Path, tokenizer_path: Path, cfg) -> bool:
    """Dynamic int8 of the mention encoder -> student_mention.int8.onnx; kept only if it passes `int8_gate`. The
    head and the output projections stay fp32 (`int8_excluded_nodes`; reports/README.md, "int8 mention encoder")."""
    src = out_dir / contract.STUDENT_FILES["mention"]
    out = src.with_suffix(".int8.onnx")
    quantize_student_encoder(src, out, keep_output_projections=True)
    return int8_gate("mention", out_dir, out, tokenizer_path, cfg.image_dim, cfg.image_patches, cfg.hidden)


def int8_excluded_nodes(model, *, keep_output_projections: bool) -> list[str]:
    """The nodes int8 quantisation leaves in fp32: the head (`head_node_names`) and, for the mention encoder
    (recipe 3), each layer's two output projections (`.../attention/output/dense`, `.../output/dense`: the FFN's
    down projection reads GELU outputs, whose outliers a per-tensor activation scale serves worst). Quantised, those
    cost up to 0.27 H@1 points (WikiMEL dev); kept, served H@1 and MRR stay within 0.05 points of fp32 on WikiMEL
    test and the three dev splits (reports/README.md, "int8 mention encoder")."""
    names = head_node_names(model)
    if keep_output_projections:
        names += [n.name for n in model.graph.node if n.op_type == "MatMul" and "/output/dense/" in n.name]
    return names


def quantize_student_encoder(src: Path, out: Path, *, keep_output_projections: bool = False) -> None:
    """Dynamic int8 (per-channel weights) of the text backbone's matrix products of one student encoder; the
    head stays fp32, and with `keep_output_projections` (the mention encoder) the output projections too."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = out.with_name(out.name + ".tmp")
    model = onnx.load(str(src), load_external_data=False)
    quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                     nodes_to_exclude=int8_excluded_nodes(model, keep_output_projections=keep_output_projections),
                     extra_options={"MatMulConstBOnly": True})
    tmp.replace(out)  # never a half-written model under the served name


INT8_STAMP_KEY = "el_int8_of"  # metadata of an int8 entity encoder: the fp32 export it was made from, and the recipe


def ensure_int8_entity_encoder(onnx_dir: Path) -> Path | None:
    """student_entity.int8.onnx for the live-update worker (EL_UPDATES__INT8_ENCODER), made on first use from the
    fp32 entity encoder and stamped with the export's signature and recipe, so a new export or recipe redoes it;
    None (keep fp32) when the export has no student or the int8 encoder fails `int8_gate`. The index build keeps
    fp32: only entities changed while serving are encoded in int8."""
    import os

    import onnx

    spec = contract.EncoderSpec.from_json((onnx_dir / contract.SPEC_FILE).read_text())
    if not spec.heads:
        return None
    src = onnx_dir / contract.STUDENT_FILES["entity"]
    out = src.with_suffix(".int8.onnx")
    stamp = spec.signature() + contract.ENTITY_INT8_RECIPE
    if out.exists():
        meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
        if meta.get(INT8_STAMP_KEY) == stamp:
            return out
    tmp = out.with_name(f"{out.stem}.{os.getpid()}.onnx")  # two servers on one folder never share a half file
    try:
        quantize_student_encoder(src, tmp)
        if not int8_gate("entity", onnx_dir, tmp, onnx_dir / spec.tokenizer, spec.image_dim, spec.image_patches,
                         spec.heads_dim):
            logger.warning("the int8 entity encoder failed the accuracy gate; entity changes are encoded in fp32")
            return None
        model = onnx.load(str(tmp))
        onnx.helper.set_model_props(model, {INT8_STAMP_KEY: stamp})
        onnx.save(model, str(tmp))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def int8_gate(side: str, out_dir: Path, int8_path: Path, tokenizer_path: Path, image_dim: int, patches: int,
              unit_dim: int) -> bool:
    """Whether an int8 `side` encoder ranks the probes as fp32 does against the other side's fp32 encoder: every
    probe keeps its top-1, the score matrix correlates >= INT8_MIN_SCORE_CORRELATION with fp32's, and each unit of
    the retrieval vector (text, image, two fusion units) keeps a mean cosine >= INT8_MIN_UNIT_COSINE to fp32's
    (the score check alone let through a model whose fusion units had turned (cosine 0.55) and lost H@1)."""
    other = "entity" if side == "mention" else "mention"
    probe = probe_inputs(tokenizer_path, image_dim, patches)
    fixed = run_onnx(out_dir / contract.STUDENT_FILES[other], probe)[0]
    ref_v, got_v = run_onnx(out_dir / contract.STUDENT_FILES[side], probe)[0], run_onnx(int8_path, probe)[0]
    ref, got = ref_v @ fixed.T, got_v @ fixed.T
    same_top1 = bool((ref.argmax(1) == got.argmax(1)).all())
    corr = float(np.corrcoef(ref.ravel(), got.ravel())[0, 1])
    units = []
    for k in range(ref_v.shape[1] // unit_dim):
        a, b = ref_v[:, k * unit_dim:(k + 1) * unit_dim], got_v[:, k * unit_dim:(k + 1) * unit_dim]
        norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        units.append(float(((a * b).sum(1) / norms).mean()))
    unit_cos = min(units)
    ok = same_top1 and corr >= INT8_MIN_SCORE_CORRELATION and unit_cos >= INT8_MIN_UNIT_COSINE
    logger.info("int8 %s: top-1 kept on every probe: %s, score correlation to fp32 %.4f (gate %.2f), lowest unit "
                "cosine %.4f (gate %.2f): %s", int8_path.name, same_top1, corr, INT8_MIN_SCORE_CORRELATION, unit_cos,
                INT8_MIN_UNIT_COSINE, "kept" if ok else "refused")
    return ok
