#!/usr/bin/env python3
"""Write README.md's generated tables from their sources (tests/test_config.py checks they are current).

    python scripts/readme_tables.py [--check]

Today one table: the export's options, from hparams/export.yaml (common/config.py: each top-level key, its default
and its comment), between the markers ``<!-- export-options:begin -->`` and ``<!-- export-options:end -->``.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import config  # noqa: E402

README = ROOT / "README.md"
BEGIN, END = "<!-- export-options:begin -->", "<!-- export-options:end -->"


def generated() -> str:
    return config.markdown_table(config.read_options(ROOT / "hparams" / "export.yaml"))


def current(text: str) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{README}: markers {BEGIN} / {END} not found")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def main() -> int:
    text = README.read_text(encoding="utf-8")
    if "--check" in sys.argv[1:]:
        ok = current(text) == generated()
        print("README export options table is up to date" if ok else
              "README export options table is stale: run python scripts/readme_tables.py")
        return 0 if ok else 1
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    README.write_text(f"{head}{BEGIN}\n{generated()}\n{END}{tail}", encoding="utf-8")
    print(f"wrote {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
