"""The suite's fuzz properties (tests/test_fuzz.py), run long: ``python bench/fuzz.py [EXAMPLES]`` (default 2000).

Every generated request must get a success or a 4xx in OpenAI's error schema, and the daemon must write nothing
outside its state directory and still answer afterwards. Prints the number of examples and the outcome.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    examples = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    env = {**os.environ, "SOLVERX_FUZZ_EXAMPLES": str(examples)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fuzz.py"],
                          cwd=REPO, env=env)  # fmt: skip
    seconds = time.perf_counter() - started
    print(f"fuzz: {examples} examples per property x 3 properties, {seconds:.0f} s: "
          f"{'no 5xx, no file outside the state dir' if done.returncode == 0 else 'FAILED (see above)'}")  # fmt: skip
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
