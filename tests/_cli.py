"""What the CLI tests share: run ``kpnet`` in-process, read its one error line, snapshot a
folder to prove nothing in it changed."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from kpnet.cli import main


def invoke(*args) -> Result:
    """``kpnet ARGS`` through click's CliRunner (exceptions propagate: a traceback fails)."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def refused(result: Result, *needles: str) -> str:
    """The one error line of a refused command; it holds every needle."""
    assert result.exit_code not in (0, None), result.output
    assert "Traceback" not in result.output, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], (needle, result.output)
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative names and bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}  # fmt: skip
