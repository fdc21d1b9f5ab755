"""What a process started for an agent may do, enforced by the operating system.

Tool processes (shell commands, stdio MCP servers) and the Local LLM runtime and engine start through a
launcher that applies a Policy (policy.py) before the program runs: on Linux no_new_privs, Landlock
(files, TCP ports, signals and abstract sockets), a seccomp filter and rlimits (linux.py); on macOS a
sandbox-exec profile (macos.py). rules.py says which policy each process gets; probe.py what this
kernel gives.

policy.py, linux.py and launch.py use the standard library only: the launcher and the tools' guardian
load them under `python -I -S`, which starts in a few tens of milliseconds.
"""

# A policy's network (standard library only: the launcher imports this package and nothing heavier).
NONE = "none"  # no IP sockets at all
PORTS = "ports"  # TCP connect to the policy's `connect` ports only (the tool's host proxy); no UDP
ANY = "any"  # not restricted
