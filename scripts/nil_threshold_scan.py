"""What moving the NIL threshold (EL_CALIBRATION__NIL_MIN_ANSWERABLE) does, with the shipped answerable model:
NIL precision, recall and F1, and the H@1 points lost on the answerable mentions, per split, under the NIL protocol
(service/offline/nil_protocol.py: a fixed-seed 20 % of each split's gold entities removed from the KB).

    python scripts/nil_threshold_scan.py [--thresholds 0.3 0.4 0.5 0.6] [--splits wikimel:dev ...]
                                         [--out reports/nil-threshold-scan.json]

Each split is linked twice through the served pipeline (whole KB, then the NIL protocol), as `el fit-calibration`
does; the model is not refitted: the figures are those of the calibration the service loads (EL_CALIBRATION__PATH
or the shipped models/weights/calibration.json). Prints a table and writes the JSON report.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from service.logging_setup import configure_logging
from service.offline.bench import machine_info
from service.offline.calibration import collect_pair
from service.offline.nil_protocol import nil_metrics
from service.pipeline.linker import Linker
from service.settings import Settings

logger = logging.getLogger("nil_threshold_scan")

SPLITS = ("wikimel:dev", "richpedia:dev", "wikidiverse:dev", "wikimel:test")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    ap.add_argument("--splits", nargs="+", default=list(SPLITS), help="dataset:split")
    ap.add_argument("--out", default="reports/nil-threshold-scan.json")
    args = ap.parse_args()
    settings = Settings()
    configure_logging(settings.log_level)
    linker = Linker.for_serving(settings)
    verdict = linker.verdict
    calibration = getattr(verdict, "calibration", None)
    if calibration is None:
        raise SystemExit("no calibration loaded: nothing to scan")
    report: dict = {"machine": machine_info(), "index_version": linker.index.version,
                    "fitted_threshold": calibration.nil_threshold, "splits": {}}
    for spec in args.splits:
        dataset, split = spec.split(":")
        pair = collect_pair(linker, settings.data_dir, dataset, split)
        _, p_answerable = calibration.assess(list(pair.nil.mentions), pair.nil.scores, pair.nil.facts)
        answerable = ~pair.nil.no_answer
        today = float(pair.full.top1_right[answerable].mean())
        rows = {}
        for t in args.thresholds:
            m = nil_metrics(pair.nil.no_answer, p_answerable < t, pair.nil.top1_right)
            m["h@1_points_vs_today"] = round(100 * (m["h@1_answerable"] - today), 2)
            rows[f"{t:g}"] = m
        report["splits"][f"{dataset} {split}"] = {"h@1_answerable_today": round(today, 4), "thresholds": rows}
    lines = ["threshold | " + " | ".join(report["splits"])]
    for t in args.thresholds:
        cells = [f"F1 {s['thresholds'][f'{t:g}']['nil_f1']:.3f} ({s['thresholds'][f'{t:g}']['h@1_points_vs_today']:+.2f})"
                 for s in report["splits"].values()]
        lines.append(f"{t:g} | " + " | ".join(cells))
    print("\n".join(lines))
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    np.seterr(over="ignore")
    main()
