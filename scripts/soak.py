"""Crash soak: SIGKILL a saving CheckpointManager at random moments, many times.

The long form of tests/test_reliability_crash.py. Each trial starts a worker that
resumes the directory and saves numbered checkpoints; the trial SIGKILLs it after a
random delay, then restores every committed checkpoint and compares it bit for bit
with what was saved under its number.

Usage: python scripts/soak.py [--trials N] [--seed S] [--max-delay SECS] [--dir DIR]
Exits 1 on the first inconsistency, printing the seed and trial to replay it.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from tests.workers import crash_worker  # noqa: E402

__all__ = ["main"]


def _trial(directory: str, rng: random.Random, trial: int, max_delay: float, env) -> dict:
    after_ready = rng.random() < 0.8
    delay = rng.uniform(0.0, max_delay) if after_ready else rng.uniform(0.0, 3.0)
    return crash_worker.kill_trial(directory, delay_secs=delay, after_ready=after_ready,
                                   use_async=rng.random() < 0.5, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-delay", type=float, default=1.0)
    parser.add_argument("--dir", default=None, help="directory to use (default: a temp dir)")
    args = parser.parse_args(argv)
    directory = args.dir or tempfile.mkdtemp(prefix="dcheckpoint-soak-")
    os.makedirs(directory, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu")
    rng = random.Random(args.seed)
    saved: list[int] = []
    leftovers = 0
    for trial in range(args.trials):
        outcome = _trial(directory, rng, trial, args.max_delay, env)
        saved += outcome["saved"]
        facts = crash_worker.check_directory(directory)
        leftovers += bool(facts["leftovers"])
        bad = facts["mismatches"] or (saved and (
            facts["latest"] is None or facts["latest"] < max(saved)
            or facts["latest"] not in facts["committed"]))
        if bad:
            print(f"INCONSISTENT after trial {trial} (seed {args.seed}): {facts}, "
                  f"last returned save {max(saved) if saved else None}", flush=True)
            return 1
        print(f"trial {trial}: {len(outcome['saved'])} saves, latest {facts['latest']}, "
              f"leftovers {len(facts['leftovers'])}", flush=True)
    print(f"OK: {args.trials} kills, {len(saved)} saves returned, {leftovers} crashes "
          f"left temporaries, every committed checkpoint restored bit-identically")
    return 0


if __name__ == "__main__":
    sys.exit(main())
