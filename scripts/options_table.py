#!/usr/bin/env python
"""Write the options table of docs/training.md from the declarations in ahiq/options.py:

    python scripts/options_table.py           # rewrite the table in place
    python scripts/options_table.py --check   # exit 1 if the docs' table is not the generated one

The table lies between the two marker comments; tests/test_docs.py checks that it is the generated one.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PAGE = ROOT / "docs" / "training.md"
START = "<!-- the options table: made by python scripts/options_table.py from ahiq/options.py -->\n"
END = "<!-- end of the options table -->\n"


def with_table(text: str) -> str:
    from ahiq.options import markdown_table

    if START not in text or END not in text:
        raise SystemExit(f"error: {PAGE} lacks the marker lines {START.strip()} and {END.strip()}")
    head, rest = text.split(START, 1)
    return head + START + markdown_table() + END + rest.split(END, 1)[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when the table is out of date")
    args = parser.parse_args(argv)
    text = PAGE.read_text()
    wanted = with_table(text)
    if args.check:
        if wanted != text:
            print(f"{PAGE} holds an outdated options table: run python scripts/options_table.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
