"""Render the EL_ settings table for the README from the Settings class, and the table of rerank score terms
from their registry (service/pipeline/terms.py): keeps the docs true.

    python -m service.settings_doc --write README.md   # rewrites the blocks between the markers
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from service.pipeline.terms import render_table
from service.settings import Settings

BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"
TERMS_BEGIN, TERMS_END = "<!-- terms:begin -->", "<!-- terms:end -->"


def setting_rows(model: type[BaseModel] = Settings, prefix: str = "EL_") -> Iterator[tuple[str, str, str]]:
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from setting_rows(ann, f"{prefix}{name.upper()}__")
        else:
            default = field.get_default(call_default_factory=True)
            shown = "" if default is None else str(default)
            if hasattr(default, "get_secret_value"):
                shown = "(secret)"
            yield f"{prefix}{name.upper()}", shown, (field.description or "").replace("|", "\\|")


def render() -> str:
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    lines += [f"| `{var}` | `{default}` | {desc} |" if default else f"| `{var}` | | {desc} |"
              for var, default, desc in setting_rows()]
    return "\n".join([BEGIN, *lines, END])


def render_terms() -> str:
    return f"{TERMS_BEGIN}\n{render_table()}\n{TERMS_END}"


def rewrite(readme: Path) -> bool:
    text = readme.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)
    new = pattern.sub(lambda _: render(), text) if pattern.search(text) else text.replace("SETTINGS_PLACEHOLDER", render())
    pattern = re.compile(re.escape(TERMS_BEGIN) + r".*?" + re.escape(TERMS_END), re.DOTALL)
    new = pattern.sub(lambda _: render_terms(), new)
    changed = new != text
    readme.write_text(new)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", type=Path, help="README to update in place")
    args = parser.parse_args(argv)
    if args.write:
        rewrite(args.write)
    else:
        sys.stdout.write(render() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
