#!/usr/bin/env python3
"""Coverage-guided fuzzing of one target of tests/fuzz_targets.py with atheris (libFuzzer).

    PYTHON fuzz_atheris.py TARGET SECONDS WORKDIR

PYTHON is an interpreter that has atheris and nsvpn's dependencies (scripts/soak makes one:
a scratch venv with atheris that also sees $NSVPN_VENV's packages and the working tree).
Only nsvpn's own modules are instrumented. WORKDIR/corpus/TARGET is the growing corpus
(seeded from fuzz_targets.seeds()); a crashing input is written as WORKDIR/crash/TARGET/crash-*
(scripts/soak copies it to tests/fuzz_regressions/TARGET/, which tests/test_fuzz.py replays).
libFuzzer prints "Done N runs in S second(s)" at the end, which scripts/soak reads.
"""

from __future__ import annotations

import hashlib
import os
import sys

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

with atheris.instrument_imports(include=["nsvpn"]):
    import fuzz_targets


def main() -> None:
    target, secs, work = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    fn = fuzz_targets.TARGETS[target]
    corpus = os.path.join(work, "corpus", target)
    crash = os.path.join(work, "crash", target)
    os.makedirs(corpus, exist_ok=True)
    os.makedirs(crash, exist_ok=True)
    for s in fuzz_targets.seeds(target):
        name = hashlib.sha1(s).hexdigest()
        with open(os.path.join(corpus, name), "wb") as f:
            f.write(s)

    atheris.Setup([sys.argv[0], f"-max_total_time={secs}", "-print_final_stats=1",
                   "-max_len=4096", "-timeout=20", "-rss_limit_mb=2048",
                   f"-artifact_prefix={crash}/", corpus], fn)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
