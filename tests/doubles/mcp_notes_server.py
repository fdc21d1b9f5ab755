"""A small MCP server over stdio, written with the official SDK, for the agent tool tests.

    python tests/doubles/mcp_notes_server.py NOTES_FILE

Tools: add_note(text) appends a line to NOTES_FILE and returns how many notes there are; count_notes().
"""

from __future__ import annotations

import sys
from pathlib import Path

from mcp.server.mcpserver import MCPServer

NOTES = Path(sys.argv[1])
server = MCPServer("notes")


@server.tool()
def add_note(text: str) -> str:
    """Add a note; returns the number of notes."""
    with NOTES.open("a", encoding="utf-8") as f:
        f.write(text.replace("\n", " ") + "\n")
    return f"{len(NOTES.read_text(encoding='utf-8').splitlines())} notes"


@server.tool()
def count_notes() -> str:
    """How many notes there are."""
    return str(len(NOTES.read_text(encoding="utf-8").splitlines()) if NOTES.exists() else 0)


if __name__ == "__main__":
    server.run()
