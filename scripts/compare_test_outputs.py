"""Compare every file the test suite writes with a record made by an earlier commit.

    python scripts/compare_test_outputs.py RECORD.json.gz [pytest args]   # run the suite, compare
    python scripts/compare_test_outputs.py --record OUT.json.gz [pytest args]

The suite's ``tests/conftest.py`` writes the SHA-256 of every file under each test's ``tmp_path``
when ``OFTMERGE_RECORD_OUTPUTS`` is set (text files with the temporary directory and the repository
root replaced by placeholders). Tests are matched by name (``test_x[params]``, not by file, so
tests moved between files still match). A record keeps only the files that were the same in two
runs of the recording commit (provenance files that hold paths outside ``tmp_path`` differ between
runs); ``tests/fixtures/test_outputs_before_redesign.json.gz`` is the record of the commit before
the plan/kernel/engine redesign (88c6115), made that way.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def record(pytest_args: list[str]) -> dict[str, dict[str, str]]:
    with tempfile.TemporaryDirectory(prefix="oftmerge-outputs-") as tmp:
        path = Path(tmp) / "record.jsonl"
        env = dict(os.environ, OFTMERGE_RECORD_OUTPUTS=str(path), PYTHONHASHSEED="0")
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args], cwd=ROOT, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"the test suite failed (exit {proc.returncode}); nothing compared")
        out: dict[str, dict[str, str]] = {}
        for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
            row = json.loads(line)
            out.setdefault(row["test"].split("::", 1)[1], {}).update(row["files"])
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baseline", nargs="?", help="record to compare with (.json.gz)")
    parser.add_argument("--record", metavar="OUT", help="write this run's record instead of comparing")
    args, pytest_args = parser.parse_known_args()
    now = record(pytest_args)
    if args.record:
        with gzip.open(args.record, "wt", encoding="utf-8") as f:
            json.dump(now, f, sort_keys=True)
        print(f"recorded {sum(len(v) for v in now.values())} files of {len(now)} tests in {args.record}")
        return
    with gzip.open(args.baseline, "rt", encoding="utf-8") as f:
        before = json.load(f)
    missing_tests = sorted(set(before) - set(now))
    same = differ = 0
    for test, files in sorted(before.items()):
        for name, digest in sorted(files.items()):
            got = now.get(test, {}).get(name)
            if got == digest:
                same += 1
            elif got is not None:
                differ += 1
                print(f"DIFFERS  {test}  {name}")
    print(f"{same} files identical, {differ} differ; {len(missing_tests)} recorded tests not run now"
          + (f" (e.g. {', '.join(missing_tests[:3])})" if missing_tests else ""))
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
