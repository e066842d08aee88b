"""`make bench`: runs every benchmark, each printing one JSON line beside its baseline."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BENCHES = ["journal.py", "tap.py", "wan.py", "e2e.py"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs (about a minute each)")
    args = parser.parse_args()
    here = Path(__file__).resolve().parent
    failed = []
    for name in BENCHES:
        script = here / name
        if not script.exists():
            print(f"# {name}: not written yet", flush=True)
            continue
        argv = [sys.executable, str(script), *(["--quick"] if args.quick else [])]
        print(f"# {name}", flush=True)
        if subprocess.run(argv, check=False).returncode != 0:
            failed.append(name)
    if failed:
        print(f"# failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
