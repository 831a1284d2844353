"""bench/run.py --quick: every benchmark module runs at tiny sizes and BENCHMARKS.md gets its sections and a row
from each module. No timing is asserted: the figures of a smoke run on a shared machine mean nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from bench.run import MODULES


@pytest.mark.slow  # trials in fresh processes and fresh interpreters: about 40 s
def test_quick_run_writes_every_module_row(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    result = subprocess.run(
        [sys.executable, "bench/run.py", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    assert "smoke run" in text
    for section in ("## Machine", "- CPU: ", "- cores: ", "- memory: ", "- GPU: ", "## Versions", "torch ", "commit "):
        assert section in text, section
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0] == "| what | figure | against | ratio | target | met | note |"
    for name in MODULES:  # run.py names each row after its module; a failed module would have set the exit status
        assert any(line.startswith(f"| {name}: ") for line in table[1:]), name
    assert "## Targets missed" in text and "the whole run: " in text
    assert not out.with_suffix(".md.partial").exists()
