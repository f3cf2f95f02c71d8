"""Run the server: check who may reach it, load once, serve with uvicorn."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from retrieval.errors import RetrieveError
from retrieval.server.auth import check_exposure, is_loopback
from retrieval.server.config import ServeConfig

log = logging.getLogger(__name__)

WEB_PACKAGES = {"fastapi", "uvicorn", "starlette", "multipart", "python_multipart"}  # the serve extra


def serve(cfg: ServeConfig) -> None:
    """Blocks until Ctrl-C. Bad settings fail before the model is loaded."""
    check_exposure(cfg.host, cfg.token, cfg.insecure_no_auth)
    try:
        import uvicorn

        from retrieval.server.app import create_app
    except ModuleNotFoundError as exc:
        if exc.name not in WEB_PACKAGES:
            raise
        raise RetrieveError(
            f"retrieve serve needs {exc.name}: pip install 'retrieve[serve]' (fastapi, uvicorn, python-multipart)"
        ) from None
    from retrieval.server.engine import load_engine

    _check_port(cfg.host, cfg.port)
    engine = load_engine(cfg.index, cfg.data_root, cfg.use_gpu, cfg.pacs)
    app = create_app(engine, cfg)
    if not is_loopback(cfg.host) and not cfg.token:
        log.warning("--insecure-no-auth: anyone who can reach %s:%d can read this index's images", cfg.host, cfg.port)
    auth = "token required" if cfg.token else "no token"
    log.info("listening on http://%s:%d (%s); API docs at /docs", cfg.host, cfg.port, auth)
    uvicorn.run(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level="info",
        server_header=False,
        timeout_keep_alive=5,
        proxy_headers=False,
    )


def _check_port(host: str, port: int) -> None:
    """A port that is taken (or a host that is not ours) fails now, in one line, not after the model loads."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise RetrieveError(f"--host {host}: not an address of this machine ({exc.strerror or exc})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as exc:
            raise RetrieveError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror or exc})") from None


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(app: Any, port: int | None = None, timeout: float = 30.0) -> Iterator[str]:
    """Serve an app with uvicorn in a thread on a free loopback port (tests, benchmarks); yields its URL."""
    import uvicorn

    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", server_header=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on 127.0.0.1:{port}")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
