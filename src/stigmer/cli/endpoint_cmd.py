"""`stigmer endpoint`: what a tool needs to use Stigmer's OpenAI-compatible endpoint (the base URL, how to
make a key, the two environment lines). Reads the server's state file only: no request, no start."""

from __future__ import annotations

import argparse

from stigmer.cli.render import Out


def endpoint(args: argparse.Namespace) -> int:
    from stigmer.config import store
    from stigmer.paths import Paths
    from stigmer.server import control
    from stigmer.server import state as st

    paths = Paths.from_env()
    running = control.is_running(paths)
    state = st.read(paths) if running else None
    root = state.api_url if state is not None else f"http://127.0.0.1:{store.load(paths).server.port}"
    base_url = root.rstrip("/") + "/v1"
    make_key = "stigmer key create NAME --models --all-agents"
    doc = {
        "base_url": base_url,
        "running": running,
        "models": "local (the Local LLM's model), its other models, and agent/NAME for every agent: "
        f"GET {base_url}/models",
        "make_key": make_key,
        "env": {"OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "<the key that stigmer key create prints>"},
    }
    out = Out()
    if args.json:
        out.json(doc)
        return 0
    out.line("OpenAI-compatible endpoint: the Local LLM and every agent at one URL")
    out.line(f"  {'Base URL:':<10} {base_url}")
    out.line(f"  {'Models:':<10} local, the Local LLM's models, agent/NAME for each agent (GET /v1/models)")
    out.line(f"  {'A key:':<10} {make_key}   (narrower: --models, or --agents A,B)")
    out.line("")
    out.line("For tools that read the environment (the openai package, pydantic-ai, LangChain, Aider):")
    out.line(f"  export OPENAI_BASE_URL={base_url}")
    out.line("  export OPENAI_API_KEY=sk-stigmer-...   # the key that stigmer key create prints")
    if not running:
        out.warn("The Stigmer server is not running: start it with  stigmer server")
    return 0
