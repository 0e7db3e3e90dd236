"""``.ci/check_skips.py``: CI fails on a skip that is not for absent shared data or packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "check_skips.py"
ALLOWED = """
import pytest
def test_data(): pytest.skip("shared data not available: /somewhere/coco_mini")
def test_jax(): pytest.importorskip("jax")
@pytest.mark.skipif(True, reason="optional dependency not installed: pandas")
def test_pandas(): pass
def test_runs(): pass
"""
REFUSED = """
import pytest
def test_own_module(): pytest.importorskip("kpnet.not_a_module")
def test_bare_skip(): pytest.skip()
def test_other_reason(): pytest.skip("too slow today")
@pytest.mark.xfail(reason="flaky")
def test_xfail(): assert 0
def test_lookalike_package(): pytest.importorskip("jaxlike_absent")
def test_data(): pytest.skip("shared data not available: /somewhere/coco_mini")
"""


def _check(tmp_path: Path, source: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_case.py").write_text(source)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not the repository's settings
    report = tmp_path / "report.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
         "-c", str(tmp_path / "pytest.ini"), str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, check=False,
    )  # fmt: skip
    return subprocess.run([sys.executable, str(SCRIPT), str(report)], capture_output=True,
                          text=True, check=False)  # fmt: skip


def test_allowed_skips_pass(tmp_path):
    result = _check(tmp_path, ALLOWED)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 skips" in result.stdout or "2 skips" in result.stdout  # jax may be installed


def test_other_skips_fail(tmp_path):
    result = _check(tmp_path, REFUSED)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "5 of 6 skips" in result.stdout, result.stdout
    for name in ("own_module", "bare_skip", "other_reason", "xfail", "lookalike_package"):
        assert f"test_case::test_{name}:" in result.stdout, name
