"""The README stays true: every setting is documented and the two commands exist in the Makefile."""

from __future__ import annotations

import re

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
