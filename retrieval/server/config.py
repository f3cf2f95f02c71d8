"""The server's settings: one frozen dataclass, filled by `retrieve serve` (the command line only overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_UPLOAD_MB = 50  # the browser's limit too (ui/backend.py MAX_UPLOAD_MB)
DEFAULT_MAX_CONCURRENT = 64  # queries in flight (reading, waiting or running); more get 503 at once
# frames one upload may query with: each frame is a query of its own through the encoder (about 0.1-0.3 s a
# frame on a 2-core CPU), and queries take turns on the index, so a long clip would hold everyone else up
DEFAULT_MAX_QUERY_FRAMES = 64
MAX_K = 1000  # the most results one request may ask for
THUMBNAIL_MAX_SIDE = 1024


@dataclass(frozen=True)
class PacsSettings:
    """How the server talks to its index's PACS (credentials: the sync's env variables or file, never logged)."""

    timeout: float = 10.0  # seconds per request: a query waits at most about timeout * (retries + 1)
    retries: int = 1
    thumbnail_cache: Path | None = None  # None: a temporary folder for the server's life
    thumbnail_cache_bytes: int = 64 << 20  # least recently used thumbnails go beyond this
    viewer_template: str | None = None  # None: the viewer links stored at indexing; else rebuilt at query time


@dataclass(frozen=True)
class ServeConfig:
    index: Path
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None  # the access token itself (read from the operator's env var or file); never logged
    insecure_no_auth: bool = False
    cors_origins: tuple[str, ...] = ()
    data_root: Path | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 1024 * 1024
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    max_query_frames: int = DEFAULT_MAX_QUERY_FRAMES
    use_gpu: bool = True
    pacs: PacsSettings = field(default_factory=PacsSettings)

    def __repr__(self) -> str:  # the token must never reach a log line through a repr
        shown = "set" if self.token else None
        return (
            f"ServeConfig(index={self.index!s}, host={self.host}, port={self.port}, token={shown}, "
            f"insecure_no_auth={self.insecure_no_auth}, cors_origins={self.cors_origins}, "
            f"data_root={self.data_root}, max_upload_bytes={self.max_upload_bytes}, "
            f"max_concurrent={self.max_concurrent}, max_query_frames={self.max_query_frames}, pacs={self.pacs})"
        )
