"""`python -m stigmer.server.api`: serve the API on 127.0.0.1:server.port until SIGTERM."""

from __future__ import annotations

import logging
import os
import socket
import sys

from stigmer.config import store
from stigmer.net.head_deadline import with_head_deadline
from stigmer.paths import Paths
from stigmer.server.api.app import create_app
from stigmer.server.token import ensure_token


def main() -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    paths = Paths.from_env()
    settings = store.load(paths)
    from stigmer.server.keys import ensure_keys, worker_token

    ensure_keys(paths)
    from stigmer.errors import StigmerError
    from stigmer.server.db import Database

    try:  # a damaged database, a full disk: the log's last lines say which file and what to do
        Database(paths.data_dir / "stigmer.db").close()
    except StigmerError as e:
        logging.getLogger("stigmer.api").error("%s\n%s", e.message, e.hint)
        return e.exit_code
    app = create_app(settings, paths, token=ensure_token(paths), worker_token=worker_token(paths))
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=settings.server.port,
        log_level="warning",
        access_log=False,
        lifespan="on",  # opens the database and resumes watching unfinished executions
        server_header=False,
        http=with_head_deadline(),  # a connection that never sends its request is closed
    )
    logging.getLogger("stigmer.api").info(
        "Stigmer API on http://127.0.0.1:%d (pid %d)", settings.server.port, os.getpid()
    )
    ports = [settings.server.port]
    if settings.temporal.managed and settings.temporal.ui_port:
        ports.append(settings.temporal.ui_port)  # Temporal's Web UI, behind its guard (temporal_ui.py)
    uvicorn.Server(config).run(sockets=[_listen(port) for port in ports])
    return 0


def _listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as e:
        sock.close()
        logging.getLogger("stigmer.api").error("port %d on 127.0.0.1 is taken: %s", port, e)
        raise SystemExit(f"✗ Port {port} on 127.0.0.1 is taken ({e.strerror}).") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


if __name__ == "__main__":
    from stigmer.services.secret_pipe import start_child

    start_child()  # the secrets the daemon sent, before anything reads the settings
    sys.exit(main())
