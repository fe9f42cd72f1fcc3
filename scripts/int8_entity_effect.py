"""What the int8 entity encoder of live updates (EL_UPDATES__INT8_ENCODER) costs in accuracy and saves in time.

    python scripts/int8_entity_effect.py [--splits wikimel:test,wikimel:dev,richpedia:dev,wikidiverse:dev]
                                         [--out reports/int8-entities.json]

The worst case for accuracy: every gold entity of a split is put again through the live-update path (the
update worker's encoder, the change log, the live index), so that each right answer carries int8 vectors and
local features while every other entity keeps the fp32 ones of the index build. Two arms per split, each on a
private copy of the served index folder: "fp32" (the shipped update encoder: a control, which must give today's
H@1) and "int8". Reported per arm: retrieval and served H@1 / MRR on the split, and the update encoder's ms per
entity (both arms alternate chunk by chunk, so that other load reaches both alike).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 64


def main() -> None:
    from kg_index.build import load_entity_image
    from kg_index.live import Change
    from kg_index.readers import read_mel_kb, read_mentions
    from service.offline.bench import machine_info
    from service.offline.bench_updates import private_copy
    from service.offline.evaluation import SystemScores, _linker_ranks
    from service.pipeline.linker import Linker
    from service.settings import Settings

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--splits", default="wikimel:test,wikimel:dev,richpedia:dev,wikidiverse:dev")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "int8-entities.json")
    args = ap.parse_args()

    base = Settings()
    images = {e.id: e.image for e in read_mel_kb(base.data_dir)}
    report: dict = {"machine": machine_info(), "splits": {}}
    for spec in args.splits.split(","):
        dataset, split = spec.split(":")
        mentions = read_mentions(base.data_dir, dataset, split)
        with tempfile.TemporaryDirectory() as tmp:
            linkers = {}
            for arm, int8 in (("fp32", False), ("int8", True)):
                folder = Path(tmp) / arm
                private_copy(base.index.dir, folder)
                settings = base.model_copy(update={
                    "index": base.index.model_copy(update={"dir": folder}),
                    "updates": base.updates.model_copy(update={"int8_encoder": int8, "compact_after": 0})})
                linkers[arm] = Linker.from_settings(settings, live=True)
                linkers[arm].warm_up_updates()  # loads (and for int8 first makes) the update encoder, untimed
            index = linkers["fp32"].index
            golds = sorted({m.answer for m in mentions if m.answer in index.row_of})
            metas = [replace(index.entities[index.row_of[g]], changed=True) for g in golds]
            encode_s = dict.fromkeys(linkers, 0.0)
            for i in range(0, len(metas), CHUNK):
                chunk = metas[i:i + CHUNK]
                pics = [load_entity_image(images.get(m.id)) if m.has_image else None for m in chunk]
                for arm, lk in linkers.items():
                    t = time.perf_counter()
                    rows = lk.encode_entities(chunk, pics)
                    encode_s[arm] += time.perf_counter() - t
                    lk.apply_changes([Change(m.id, r) for m, r in zip(chunk, rows)])
            out: dict = {"mentions": len(mentions), "entities_re_encoded": len(golds),
                         "with_image": sum(m.has_image for m in metas)}
            for arm, lk in linkers.items():
                row: dict = {"update_encode_ms_per_entity": round(encode_s[arm] * 1000 / max(len(golds), 1), 3)}
                for name, rerank in (("retrieval", False), ("served", True)):
                    ranks, _ = _linker_ranks(lk, mentions, rerank=rerank, k=lk.settings.rerank.candidates,
                                             batch=64, desc=f"{dataset} {split} {arm} {name}",
                                             load_image=load_entity_image)
                    s = SystemScores(len(mentions), len(lk.index), ranks).summary()
                    row[name] = {"h@1": s["h@1"], "mrr": s["mrr"]}
                out[arm] = row
                if lk.store is not None:
                    lk.store.close()  # the change log file
            out["encode_speedup"] = round(out["fp32"]["update_encode_ms_per_entity"]
                                          / max(out["int8"]["update_encode_ms_per_entity"], 1e-9), 2)
            out["served_h1_points"] = round(100 * (out["int8"]["served"]["h@1"] - out["fp32"]["served"]["h@1"]), 2)
            report["splits"][f"{dataset}-{split}"] = out
            print(json.dumps({f"{dataset}-{split}": out}), flush=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
