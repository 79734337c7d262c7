"""What one ``galr-serve`` process is allowed to do: files, address, limits, batching (one typed config)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from galr import paths
from galr.errors import InputError
from galr.preprocess.text import DEFAULT_MAX_CHARS


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServeSettings:
    """Settings of the HTTP service.

    Attributes:
        bundle: the galr.plan bundle.
        index: the gallery index (``.gidx``) served; ``reload`` re-reads this path.
        host, port: where to listen; anything but a loopback address needs ``api_key``.
        api_key: bearer key required on every ``/v1`` route when set (``Authorization: Bearer KEY``).
        backend, device, precision: as for ``load_engine``.
        max_body_bytes: largest request body (JSON or upload) accepted; larger gets 413.
        max_queries: queries in one text request at most.
        max_query_chars: characters in one query at most.
        max_top_k: results per query at most.
        max_batch_queries: queries gathered into one encoder call at most.
        max_wait_ms: how long the first waiting request may wait for others to join its batch.
        max_queued_queries: queries waiting or running at most; more gets 503 with Retry-After.
        request_timeout_s: a request not answered by then gets 504.
        cors_origins: origins allowed by CORS (none: CORS headers are not sent).
        warmup: encode one query before reporting ready.
        detector: an Ultralytics oriented-box detector ONNX run on every uploaded image for the
            DREA input (``None``: the bundle's own detector when it has one, else the all-zero fallback).
        use_bundled_detector: run the bundle's detector (``galr-export --detector``) when ``detector`` is ``None``.
        encoder_threads: ONNX Runtime threads per operator (0: one per core). Ray replicas take the
            CPUs Ray reserved for them, so replicas sharing a node do not fight over its cores.
        encoder_spinning: whether ONNX Runtime's threads spin after their work (``None``: ONNX
            Runtime's default, on). Off by default here: right after each encoder batch the same cores
            run the search and the HTTP answers, and spinning threads compete with them for the cores
            (BENCHMARKS.md section 8 compares both).
    """

    bundle: Path = Path(paths.DEFAULT_BUNDLE)
    index: Path = Path(paths.DEFAULT_INDEX)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    backend: str = "auto"
    device: str = "auto"
    precision: str = "auto"
    max_body_bytes: int = 8 << 20
    max_queries: int = 64
    max_query_chars: int = DEFAULT_MAX_CHARS
    max_top_k: int = 100
    max_batch_queries: int = 32
    max_wait_ms: float = 20.0
    max_queued_queries: int = 1024
    request_timeout_s: float = 30.0
    cors_origins: tuple[str, ...] = field(default_factory=tuple)
    warmup: bool = True
    detector: Path | None = None
    use_bundled_detector: bool = True
    encoder_threads: int = 0
    encoder_spinning: bool | None = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "bundle", Path(self.bundle))
        if self.detector is not None:
            object.__setattr__(self, "detector", Path(self.detector))
        object.__setattr__(self, "index", Path(self.index))
        for name in ("max_body_bytes", "max_queries", "max_query_chars", "max_top_k", "max_batch_queries",
                     "max_queued_queries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.encoder_threads, bool) or not isinstance(self.encoder_threads, int) or \
                self.encoder_threads < 0:
            raise InputError(f"encoder_threads must be 0 (one per core) or more, got {self.encoder_threads!r}")
        if not 0 <= self.max_wait_ms <= 1000:
            raise InputError(f"max_wait_ms must be between 0 and 1000, got {self.max_wait_ms}")
        if self.request_timeout_s <= 0:
            raise InputError(f"request_timeout_s must be positive, got {self.request_timeout_s}")
        if not 0 < self.port < 65536:
            raise InputError(f"port must be between 1 and 65535, got {self.port}")
        if self.api_key is not None and len(self.api_key) < 16:
            raise InputError("the API key must have at least 16 characters")
        if not is_loopback(self.host) and not self.api_key:
            raise InputError(f"binding {self.host} exposes the service to other machines: give an API key "
                             "(--api-key-file FILE or GALR_API_KEY), or bind 127.0.0.1")

    @staticmethod
    def key_from_environment() -> str | None:
        """The API key in ``GALR_API_KEY``, if set (keeps it out of the process list)."""
        return os.environ.get("GALR_API_KEY") or None


__all__ = ["ServeSettings", "is_loopback"]
