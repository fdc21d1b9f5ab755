"""The launcher: confine this process as a policy says, then become the program.

    python -I -S launch.py POLICY_JSON -- ARGV...

The program replaces the launcher (exec): same pid, nothing left in between, so the services'
supervisor sees and stops the program itself. Exit 126 with one line on stderr when the policy cannot
be applied as required, 127 when the program cannot be run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

LAUNCH = Path(__file__).resolve()


def argv_for(policy_json: str, argv: list[str], python: str = sys.executable) -> list[str]:
    """The command line that runs argv under the policy."""
    return [python, "-I", "-S", str(LAUNCH), policy_json, "--", *argv]


def inner(argv: list[str]) -> list[str]:
    """The program's own command line from a launcher's (what the process shows once it runs)."""
    if len(argv) > 5 and argv[1:3] == ["-I", "-S"] and Path(argv[3]).name == LAUNCH.name and argv[5] == "--":
        return argv[6:]
    return argv


def main(args: list[str]) -> None:
    if len(args) < 3 or args[1] != "--":
        os.write(2, b"usage: launch.py POLICY_JSON -- ARGV...\n")
        os._exit(2)
    sys.path.insert(0, str(LAUNCH.parents[2]))  # -I -S: only the standard library is on the path
    from stigmer.sandbox import linux

    argv = args[2:]
    try:
        linux.apply(linux.loads(args[0]))
    except linux.SandboxError as e:
        os.write(2, f"error: cannot sandbox {argv[0]!r}: {e}\n".encode(errors="replace"))
        os._exit(126)
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        os.write(2, f"error: cannot run {argv[0]!r}: {e.strerror}\n".encode(errors="replace"))
        os._exit(127)


if __name__ == "__main__":
    main(sys.argv[1:])
