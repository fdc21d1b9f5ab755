"""`stigmer ui`: a one-time sign-in link to the web console (served by the API), opened in the browser."""

from __future__ import annotations

import argparse

from stigmer.cli.render import Out


def ui(args: argparse.Namespace) -> int:
    from stigmer.cli.run_cmd import _api
    from stigmer.cli.server_cmd import _can_open_browser

    out = Out()
    link = _api(start=True, out=out).post("/v1/console/signin")
    print(link["url"], flush=True)
    if not args.no_open and _can_open_browser():
        import webbrowser

        webbrowser.open(link["url"])
    out.info(f"The link works once, within {link['expires_in']} seconds; the session lasts 12 h idle.")
    return 0
