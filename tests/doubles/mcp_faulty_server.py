"""A misbehaving MCP server over stdio, for the tests of MCP faults (written with the official SDK, like
mcp_notes_server.py).

    python tests/doubles/mcp_faulty_server.py MODE

MODE
  exit        says why on stderr and exits (status 3) before it answers anything
  silent      starts and never answers (not even the handshake)
  serve       a server whose tools misbehave on request:
                echo(text)        answers at once
                hang()            never answers
                flood()           floods stdout with lines that are not JSON-RPC and stderr with text, and
                                  never answers
                spawn(pid_file)   starts a process in a session of its own (as a daemon would), writes its
                                  pid to pid_file and answers with it
                pid()             its own pid
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

MODE = sys.argv[1] if len(sys.argv) > 1 else "serve"

if MODE == "exit":
    print("faulty: cannot open the database /nonexistent/notes.db", file=sys.stderr, flush=True)
    sys.exit(3)

if MODE == "silent":
    while True:
        time.sleep(3600)

from mcp.server.mcpserver import MCPServer  # noqa: E402 - only the serving modes need the SDK

WIRE = os.dup(1)  # the SDK moves its messages off fd 1 (and points fd 1 at stderr): flood the real pipe

server = MCPServer("faulty")


@server.tool()
def echo(text: str) -> str:
    """Answer with the text."""
    return text


@server.tool()
def hang() -> str:
    """Never answer."""
    while True:
        time.sleep(3600)


def _flood(fd: int, line: bytes) -> None:
    while True:
        try:
            os.write(fd, line * 64)
        except OSError:
            return


@server.tool()
def flood() -> str:
    """Flood stdout (not JSON-RPC) and stderr, and never answer."""
    threading.Thread(target=_flood, args=(WIRE, b"this is not JSON-RPC " * 20 + b"\n"), daemon=True).start()
    threading.Thread(target=_flood, args=(2, b"a very chatty server " * 20 + b"\n"), daemon=True).start()
    while True:
        time.sleep(3600)


@server.tool()
def spawn(pid_file: str) -> str:
    """Start a process in a session of its own; its pid."""
    script = 'echo "$$" > "$1.tmp" && mv "$1.tmp" "$1" && exec sleep 1000'
    subprocess.Popen(
        ["sh", "-c", script, "sh", pid_file],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not os.path.exists(pid_file) and time.monotonic() < deadline:
        time.sleep(0.02)
    with open(pid_file, encoding="ascii") as f:
        return f.read().strip()


@server.tool()
def attempt(kind: str, target: str) -> str:
    """Try something a sandboxed server must not do (read, write, connect, run); "ok: ..." or "refused: ..."."""
    import socket

    try:
        if kind == "read":
            with open(target, "rb") as f:
                return "ok: " + f.read(200).decode(errors="replace")
        if kind == "write":
            with open(target, "w", encoding="utf-8") as f:
                f.write("written by the MCP server")
            return "ok: written"
        if kind == "connect":
            host, _, port = target.rpartition(":")
            socket.create_connection((host, int(port)), timeout=3).close()
            return "ok: connected"
        if kind == "run":
            done = subprocess.run(["sh", "-c", target], capture_output=True, text=True, timeout=10)
            return f"ok: exit {done.returncode}: {done.stdout}{done.stderr}"
    except OSError as e:
        return f"refused: {e}"
    return "unknown kind"


@server.tool()
def pid() -> str:
    """This server's pid."""
    return str(os.getpid())


if __name__ == "__main__":
    server.run()
