"""README stays in step with the code: the CLI reference and the quickstart."""
from __future__ import annotations

import re
from pathlib import Path

from hwrel.cli.docs import END, START, reference

README = Path(__file__).resolve().parent.parent / "README.md"


def test_cli_reference_is_current():
    text = README.read_text()
    block = text[text.index(START) + len(START):text.index(END)]
    assert block.strip() == reference().strip(), "run: python -m hwrel.cli.docs --write README.md"


def test_quickstart_runs():
    """The first Python block of README runs as written."""
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    exec(compile(code, "README quickstart", "exec"), {})
