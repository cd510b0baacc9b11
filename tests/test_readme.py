"""README stays in step with the code: the CLI reference, the quickstart and "Your own model"."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

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


@pytest.mark.slow
def test_your_own_model_runs_from_the_shell(tmp_path):
    """The "Your own model" block runs as written in an empty folder: every command succeeds on
    the user's model and data, the report and the campaign results are written."""
    text = README.read_text()
    section = text[text.index("## Your own model"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert (tmp_path / "bc-report" / "index.html").is_file()
    md = (tmp_path / "bc-report" / "report.md").read_text()
    assert "range of the test inputs in bc_test.npz" in md and "--data=bc_test.npz" in md
    flips = pd.read_parquet(tmp_path / "bc-flips.parquet")
    assert len(flips) == 500 and "accuracy" in flips.columns
    out = proc.stdout
    for words in ("input domain [", "certified bound", "measured accuracy", "crash probabilities"):
        assert words in out, words
