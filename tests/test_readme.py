"""The README stays true: every setting is documented and the two commands exist in the Makefile."""

from __future__ import annotations

import re

import pytest

from service.settings_doc import render, setting_rows
from tests.conftest import ROOT


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [var for var, _, _ in setting_rows() if f"`{var}`" not in readme]
    assert not missing, f"undocumented settings (run: python -m service.settings_doc --write README.md): {missing}"
    assert render() in readme, "settings table is stale: python -m service.settings_doc --write README.md"


def test_readme_commands_are_makefile_targets() -> None:
    readme = (ROOT / "README.md").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    used = set(re.findall(r"^make ([a-z-]+)", readme, re.MULTILINE))
    assert {"serve", "test"} <= used
    assert used <= targets, f"README names make targets that do not exist: {used - targets}"


HEADLINE_REPORTS = {"WikiMEL test": "wikimel-test", "WikiMEL dev": "wikimel-dev", "RichpediaMEL dev": "richpedia-dev",
                    "WikiDiverse dev": "wikidiverse-dev"}


def test_headline_figures_match_the_reports() -> None:
    """The README's short results table quotes reports/eval-*.json (the full tables live in reports/README.md)."""
    import json

    readme = (ROOT / "README.md").read_text()
    assert "(reports/README.md)" in readme and (ROOT / "reports" / "README.md").exists()
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if cells[0] in HEADLINE_REPORTS and len(cells) == 5:
            rows[cells[0]] = cells
    assert set(rows) == set(HEADLINE_REPORTS), f"headline rows missing: {set(HEADLINE_REPORTS) - set(rows)}"
    for split, (_, mentions, h1, mrr, teacher) in rows.items():
        report = json.loads((ROOT / "reports" / f"eval-{HEADLINE_REPORTS[split]}.json").read_text())
        served, exhaustive = report["systems"]["retrieval+ot+name+kg"], report["systems"]["teacher_exhaustive"]
        t_h1, t_mrr = teacher.split(" / ")
        assert int(mentions.replace(",", "")) == report["n_mentions"], split
        for quoted, measured in ((h1, served["h@1"]), (mrr, served["mrr"]), (t_h1, exhaustive["h@1"]),
                                 (t_mrr, exhaustive["mrr"])):
            assert abs(float(quoted) - measured) <= 0.0005 + 1e-9, f"{split}: README {quoted}, report {measured}"


def test_confidence_and_nil_figures_match_the_reports() -> None:
    """The README's Confidence and NIL table quotes the `calibration` and `nil` blocks of reports/eval-*.json."""
    import json

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Confidence and NIL", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if cells[0] in HEADLINE_REPORTS and len(cells) == 11:
            rows[cells[0]] = cells
    assert set(rows) == set(HEADLINE_REPORTS)
    for split, cells in rows.items():
        report = json.loads((ROOT / "reports" / f"eval-{HEADLINE_REPORTS[split]}.json").read_text())
        c, n = report["calibration"], report["nil"]
        assert float(cells[2].split()[0]) == c["ece"], split
        quoted = [float(x) for x in cells[5:10]]
        measured = [n["nil_precision"], n["nil_recall"], n["nil_f1"], n["h@1_answerable"], n["h@1_answerable_today"]]
        assert quoted == pytest.approx(measured, abs=0.0005 + 1e-9), split
