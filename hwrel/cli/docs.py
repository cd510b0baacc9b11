"""Generate the CLI reference (``hwrel <command> --help`` for every command) as Markdown.

``python -m hwrel.cli.docs`` prints it; ``python -m hwrel.cli.docs --write README.md`` replaces the
block between the ``<!-- cli-reference -->`` markers (a test keeps README in step with the code).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hwrel.cli import build_parser

START, END = "<!-- cli-reference:start -->", "<!-- cli-reference:end -->"


def reference() -> str:
    os.environ["COLUMNS"] = "100"  # stable wrapping
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = ["```", parser.format_help().rstrip(), "```"]
    for name, p in sub.choices.items():
        parts += ["", f"### `hwrel {name}`", "", "```", p.format_help().rstrip(), "```"]
    return "\n".join(parts) + "\n"


def replace_block(text: str, block: str) -> str:
    a, b = text.index(START) + len(START), text.index(END)
    return text[:a] + "\n" + block + text[b:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hwrel.cli.docs")
    ap.add_argument("--write", type=Path, default=None, help="file whose marked block to replace")
    args = ap.parse_args(argv)
    block = reference()
    if args.write is None:
        sys.stdout.write(block)
        return 0
    args.write.write_text(replace_block(args.write.read_text(), block))
    return 0


if __name__ == "__main__":
    sys.exit(main())
