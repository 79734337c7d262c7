"""``galr-serve``: the HTTP service over a bundle and a gallery index (torch-free).

The command checks its settings, builds the application (:mod:`galr.runtime.serve`) and runs it
under uvicorn; everything else is in the application.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import click

from galr import paths
from galr.console import GalrCommand
from galr.errors import InputError, NotFoundError, UnavailableError
from galr.runtime.backends.registry import AUTO, REQUESTABLE_DEVICES, backend_names

_EPILOG = """\b
Examples:
  galr-serve --engine galr.plan --index gallery.gidx            # http://127.0.0.1:8000/
  curl -s localhost:8000/v1/search/text -H 'Content-Type: application/json' \\
       -d '{"queries": ["two planes next to the runway"], "top_k": 5}'
  kill -HUP <pid>        # after `galr-index --update` on the served index: swap it in
  galr-serve --engine galr.plan --index gallery.gidx --ray --replicas 2          # Ray Serve on this machine
  galr-serve --engine galr.plan --index gallery.gidx --ray --address HEAD:6379 --host 0.0.0.0 --api-key-file key
"""


def _api_key(path: Path | None) -> str | None:
    from galr.runtime.serve import ServeSettings

    if path is None:
        return ServeSettings.key_from_environment()
    try:
        key = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such API key file") from None
    if not key:
        raise InputError(f"{path} is empty; put the API key on its first line")
    return key


@click.command("galr-serve", cls=GalrCommand, epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engine", "bundle", type=click.Path(path_type=Path), default=paths.DEFAULT_BUNDLE, show_default=True,
              help="The galr.plan bundle.")
@click.option("--index", "index_path", type=click.Path(path_type=Path), default=paths.DEFAULT_INDEX, show_default=True,
              help="The gallery index to serve (SIGHUP or POST /v1/admin/reload re-reads it).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs an API key.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--api-key-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="File whose first line is the bearer API key  [default: $GALR_API_KEY, else none]")
@click.option("--backend", type=click.Choice([AUTO, *backend_names()]), default=AUTO, show_default=True)
@click.option("--device", type=click.Choice(list(REQUESTABLE_DEVICES)), default=AUTO, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "int8", "int8-cpu"]), default="auto",
              show_default=True, help="auto: int8-cpu on ONNX Runtime CPU when the bundle has it, else fp32 (fp16 on GPUs).")
@click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True,
              help="Queries gathered into one encoder call at most.")
@click.option("--max-wait-ms", type=click.FloatRange(0, 1000), default=20.0, show_default=True,
              help="How long a batch may wait for the clients it expects (a lone client never waits).")
@click.option("--max-queue", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Queries waiting at most; beyond, requests get 503 with Retry-After.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds before a request gets 504.")
@click.option("--threads", "encoder_threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="ONNX Runtime threads per operator (0: one per core).")
@click.option("--spin/--no-spin", "encoder_spinning", default=False,
              help="Whether ONNX Runtime's threads spin after their work  [default: --no-spin, which leaves the "
                   "cores to the search and the HTTP answers between batches].")
@click.option("--access-log", is_flag=True,
              help="Log one line per request (off by default: at hundreds of requests a second the log lines cost "
                   "the event loop more than the metrics at /metrics, which count every request anyway).")
@click.option("--cors-origin", "cors_origins", multiple=True, help="Allow this browser origin (repeat); none by default.")
@click.option("--detector", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="An Ultralytics oriented-box detector ONNX run on every uploaded image for the DREA input.")
@click.option("--no-detector", "no_detector", is_flag=True,
              help="Do not run the detector stored in the bundle on uploads (galr-export --detector).")
@click.option("--ray", "on_ray", is_flag=True,
              help="Run as a Ray Serve deployment behind Ray's HTTP proxy (`pip install 'galr[ray]'`).")
@click.option("--address", default=None, metavar="HOST:PORT",
              help="--ray: a running Ray cluster's head (`ray start --head`)  [default: start Ray here]")
@click.option("--replicas", type=click.IntRange(min=1), default=2, show_default=True, help="--ray: service replicas.")
@click.option("--replica-cpus", type=click.FloatRange(min=0.01), default=1.0, show_default=True,
              help="--ray: CPUs Ray reserves for each replica.")
def main(bundle: Path, index_path: Path, host: str, port: int, api_key_file: Path | None, backend: str, device: str,
         precision: str, max_batch: int, max_wait_ms: float, max_queue: int, timeout_s: float,
         encoder_threads: int, encoder_spinning: bool | None, access_log: bool, cors_origins: tuple[str, ...],
         detector: Path | None, no_detector: bool, on_ray: bool, address: str | None,
         replicas: int, replica_cpus: float) -> None:
    """Serve text and image search over HTTP (JSON API under /v1, search page at /, OpenAPI at /docs)."""
    try:
        import uvicorn

        from galr.runtime.serve import ServeSettings, create_app
    except ImportError as exc:
        raise UnavailableError(f"galr-serve needs the serve extra: pip install 'galr[serve]' ({exc})") from None
    for path, what in ((bundle, "bundle"), (index_path, "index"), (detector, "detector")):
        if path is not None and not path.is_file():
            raise NotFoundError(f"{what} not found: {path}")
    settings = ServeSettings(bundle=bundle, index=index_path, host=host, port=port, api_key=_api_key(api_key_file),
                             backend=backend, device=device, precision=precision, max_batch_queries=max_batch,
                             max_wait_ms=max_wait_ms, max_queued_queries=max_queue, request_timeout_s=timeout_s,
                             cors_origins=cors_origins, detector=detector, use_bundled_detector=not no_detector,
                             encoder_threads=encoder_threads, encoder_spinning=encoder_spinning)
    from galr.preprocess.drea import NoDetectionsWarning

    # Uploaded images come without detections: the fallback is documented, not worth a line per request.
    warnings.filterwarnings("ignore", category=NoDetectionsWarning)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if on_ray:
        from galr.runtime.serve.ray import RaySettings, serve_on_ray

        serve_on_ray(settings, RaySettings(address=address, replicas=replicas, cpus_per_replica=replica_cpus,
                                           batch_wait_s=max_wait_ms / 1e3), log=click.echo)
        return
    if address is not None:
        raise click.UsageError("--address names a Ray cluster: add --ray")
    click.echo(f"galr-serve: http://{host}:{port}/ (API under /v1, OpenAPI at /docs)")
    uvicorn.run(create_app(settings, reload_on_sighup=True), host=host, port=port, log_level="info",
                access_log=access_log, timeout_graceful_shutdown=10)


__all__ = ["main"]
