"""Benchmark: what the sandbox adds to the start of a shell tool call (issue 19's target: < +20 ms).

The same call as the agent runner makes it, `true` in a workspace, N times each way, alternating:
  baseline: shell.run under the guardian, without a policy (the tool before the sandbox);
  sandboxed: call.tool_process (policy, private temp folder) + shell.run with the policy (the guardian
             applies no_new_privs, dropped capabilities, Landlock, seccomp and rlimits before exec);
  hosts:     the same with `sandbox: {network: [...]}`, which also starts and stops the host proxy.
Prints median and p90 of each, and the differences and ratios to the baseline measured in the same run.

    python bench/sandbox_overhead.py [-n 40]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_busy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["STIGMER_HOME"] = str(Path(tmp) / "home")
        from stigmer.sandbox import call
        from stigmer.tools import shell

        workspace = Path(tmp) / "workspace"
        workspace.mkdir()

        def baseline() -> None:
            shell.run(["true"], cwd=workspace, timeout=30)

        def sandboxed(options: object = None) -> None:
            with call.tool_process("shell", options, write=(workspace,), timeout=30) as box:
                result = shell.run(["true"], cwd=workspace, timeout=30, policy=box.policy, extra_env=box.env)
            assert result.exit_code == 0, result.output

        cases = {
            "baseline": baseline,
            "sandboxed": sandboxed,
            "hosts": lambda: sandboxed({"network": ["127.0.0.1:9"]}),
        }
        for run in cases.values():  # warm-ups: imports, page cache
            run()
            run()
        times: dict[str, list[float]] = {name: [] for name in cases}
        busy = cpu_busy(0.5)
        for _ in range(args.n):
            for name, run in cases.items():
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) * 1000)
        print(f"{sys.platform}, Landlock {call.enforced()}; machine busy before: {busy}")
        base = statistics.median(times["baseline"])
        for name, values in times.items():
            median = statistics.median(values)
            p90 = sorted(values)[int(len(values) * 0.9) - 1]
            print(
                f"{name:10} median {median:6.1f} ms  p90 {p90:6.1f} ms  "
                f"+{median - base:5.1f} ms  x{median / base:4.2f}"
            )


if __name__ == "__main__":
    main()
