"""Wall time for `fledge train` to reach a validation loss, as a user would time it.

    python bench/time_to_loss.py recipes/shakespeare-char.yaml --target 1.88
    python bench/time_to_loss.py recipes/shakespeare-char-fast.yaml --target 1.88 --repeat 2

Runs the real CLI in a fresh process (prepared data reused, so tokenizing is not timed
twice), timestamps every output line from the moment the process starts, and reports when
the first evaluation at or below the target printed, the final val loss and the whole
run's wall time. nanoGPT's 2,000-iteration CPU run took 74 s on this machine (issue #2);
the target for fledge is 0.7x that.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time

EVAL = re.compile(r"eval step (\d+) \| val loss ([0-9.]+)")


def run(recipe: str, target: float, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fledge", "train", recipe, "--quiet", "--set", f"run_dir={tmp}/run",
               "--set", f"data.prepared_dir={tmp}/data", *extra]
        subprocess.run([sys.executable, "-m", "fledge", "prepare", recipe, "--quiet",
                        "--set", f"data.prepared_dir={tmp}/data"], check=True, capture_output=True)
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        reached, final, evals = None, None, []
        for line in proc.stdout:
            now = time.perf_counter() - start
            match = EVAL.search(line)
            if match:
                step, loss = int(match.group(1)), float(match.group(2))
                evals.append((step, loss, round(now, 1)))
                final = loss
                if reached is None and loss <= target:
                    reached = (step, round(now, 1))
        proc.wait()
        total = time.perf_counter() - start
        if proc.returncode:
            raise SystemExit(f"fledge train failed ({proc.returncode})")
        return {"reached": reached, "final": final, "total_s": round(total, 1), "evals": evals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--target", type=float, default=1.88)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--nanogpt-seconds", type=float, default=74.0)
    args = parser.parse_args()
    extra = [x for item in args.overrides for x in ("--set", item)]
    for i in range(args.repeat):
        r = run(args.recipe, args.target, extra)
        print(f"run {i + 1}: evals (step, val, s) {r['evals']}")
        if r["reached"]:
            step, seconds = r["reached"]
            print(f"  reached val <= {args.target} at step {step} after {seconds} s "
                  f"({seconds / args.nanogpt_seconds:.2f}x nanoGPT's {args.nanogpt_seconds} s); "
                  f"final val {r['final']}, whole run {r['total_s']} s")
        else:
            print(f"  never reached {args.target}; final val {r['final']}, whole run {r['total_s']} s")


if __name__ == "__main__":
    main()
