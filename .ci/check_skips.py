"""Fail CI when a test was skipped for a reason that is not on the allow-list.

Usage: ``python .ci/check_skips.py JUNIT.xml [...]`` (files written by pytest ``--junitxml``).

A test may skip only for what a user's machine may lack: the shared data sets next to the
clone (``../shared/data``) or an optional package. Anything else (a kpnet module that does not
import, a function that is missing, an xfail) is a failure the suite would otherwise hide.
Write skip reasons in one of the forms below.
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET

OPTIONAL = ("jax", "pandas", "tables")  # the optional extras and conversion helpers
ALLOWED = (
    re.compile(r"shared data not available: \S"),
    re.compile(rf"optional dependency not installed: ({'|'.join(OPTIONAL)})\b"),
    re.compile(rf"could not import '({'|'.join(OPTIONAL)})'"),  # pytest.importorskip
)


def bad_skips(path: str) -> tuple[int, list[str]]:
    """(number of skips, 'test: reason' of each skip whose reason is not allowed)."""
    skips, bad = 0, []
    for case in ET.parse(path).getroot().iter("testcase"):
        for skipped in case.findall("skipped"):
            skips += 1
            reason = skipped.get("message") or skipped.text or ""
            reason = reason.removeprefix("Skipped: ").strip()  # pytest.skip() reasons carry it
            if skipped.get("type") == "pytest.xfail" or not any(p.match(reason) for p in ALLOWED):
                test = f"{case.get('classname')}::{case.get('name')}"
                bad.append(f"{test}: {skipped.get('type')}: {reason or '(no reason given)'}")
    return skips, bad


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    total, bad = 0, []
    for path in paths:
        try:
            skips, found = bad_skips(path)
        except (OSError, ET.ParseError) as err:
            print(f"check_skips: cannot read the pytest report {path}: {err}", file=sys.stderr)
            return 2
        total, bad = total + skips, bad + found
    if bad:
        print(f"check_skips: {len(bad)} of {total} skips have a reason not on the allow-list "
              "(shared data or an optional package absent); fix the test or the module:")
        for line in bad:
            print(f"  {line}")
        return 1
    print(f"check_skips: {total} skips, all for absent shared data or optional packages")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
