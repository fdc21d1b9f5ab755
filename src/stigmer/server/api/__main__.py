"""`python -m stigmer.server.api`: serve the API on 127.0.0.1:server.port until SIGTERM."""

from __future__ import annotations

import logging
import os
import sys

from stigmer.config import store
from stigmer.paths import Paths
from stigmer.server.api.app import create_app
from stigmer.server.token import ensure_token


def main() -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    paths = Paths.from_env()
    settings = store.load(paths)
    app = create_app(settings, paths, token=ensure_token(paths))
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=settings.server.port,
        log_level="warning",
        access_log=False,
        lifespan="on",  # opens the database and resumes watching unfinished executions
        server_header=False,
    )
    logging.getLogger("stigmer.api").info(
        "Stigmer API on http://127.0.0.1:%d (pid %d)", settings.server.port, os.getpid()
    )
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
