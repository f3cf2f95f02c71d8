"""Start the Streamlit browser on an index (building the demo index when none is given)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

APP_FILE = Path(__file__).with_name("app.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def streamlit_command(index: Path, port: int, address: str = "localhost", data_root: Path | None = None) -> list[str]:
    """The Streamlit command line; its own upload limit is ours (retrieval.data.limits.MAX_UPLOAD_MB)."""
    from retrieval.data.limits import MAX_UPLOAD_MB

    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP_FILE),
        "--server.port",
        str(port),
        "--server.address",
        address,
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
        "--client.toolbarMode",
        "viewer",
        "--server.maxUploadSize",
        str(MAX_UPLOAD_MB),
        "--",
        "--index",
        str(Path(index).resolve()),
        *(["--data-root", str(Path(data_root).resolve())] if data_root is not None else []),
    ]


def resolve_index(index: Path | None, demo_out: Path) -> Path:
    """The given index, or the demo index (built by `retrieve demo` if it is missing)."""
    from indexer.index_dir import read_manifest

    if index is None:
        index = demo_out / "index"
        if not (index / "manifest.json").is_file():
            from retrieval.demo.run import run_demo
            from retrieval.encoders.registry import DEFAULT_ENCODER

            print(f"no --index given and no demo index at {index}: building it with `retrieve demo`")
            run_demo(demo_out, DEFAULT_ENCODER, None, None, progress=True)
    read_manifest(index)  # one-line error now rather than in the page
    return index


def check_host(host: str, insecure_no_auth: bool) -> None:
    """The browser shows patients' images and Streamlit has no access-token support: it listens on
    loopback only, unless the operator passes --insecure-no-auth knowingly (an SSH tunnel or an
    authenticating reverse proxy is the safe way to reach it from elsewhere)."""
    from retrieval.errors import RetrieveError
    from retrieval.server.auth import is_loopback

    if not is_loopback(host) and not insecure_no_auth:
        raise RetrieveError(
            f"--host {host}: the browser has no access token (Streamlit cannot check one), so anyone who can "
            "reach it would see patients' images; keep it on 127.0.0.1 and use an SSH tunnel or an "
            "authenticating reverse proxy, or pass --insecure-no-auth knowingly (`retrieve serve` has tokens)"
        )


def launch(
    index: Path | None,
    port: int,
    demo_out: Path,
    host: str = "127.0.0.1",
    insecure_no_auth: bool = False,
    data_root: Path | None = None,
) -> int:
    from retrieval.server.auth import is_loopback

    check_host(host, insecure_no_auth)
    index = resolve_index(index, demo_out)
    print(f"similar-case browser on http://{host}:{port} (index {index}); Ctrl+C to stop")
    if not is_loopback(host):
        print(f"warning: --insecure-no-auth: anyone who can reach {host}:{port} can see this index's images")
    try:
        return subprocess.call(streamlit_command(index, port, host, data_root))
    except KeyboardInterrupt:
        return 0


@contextmanager
def running_app(index: Path, port: int | None = None, timeout: float = 90.0) -> Iterator[str]:
    """Serve the app in a child process for tests and screenshots; yields its URL."""
    port = port or free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        streamlit_command(index, port, "127.0.0.1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                raise RuntimeError(f"streamlit exited with {proc.returncode}: {out[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"streamlit did not answer on {url} within {timeout:.0f} s")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
