"""galr-serve on Ray Serve: the same application in N replicas behind Ray's HTTP proxy, with Ray's batching.

Each replica builds the FastAPI application of :func:`~galr.runtime.serve.create_app` (same routes,
limits, errors, page and metrics) with its text searches going through a ``@serve.batch`` method
instead of the app's own batcher: Ray gathers concurrent requests per replica, and
:func:`~galr.runtime.serve.batching.answer_together` answers a gathered batch with one encoder call
per search setting, exactly as the single-process service does. A replica loads the engine and the
index before Ray routes to it; the index's vectors are memory-mapped, so replicas on one node share
its pages instead of holding a copy each. Ray replaces a replica that dies or fails its health check.

>>> app = galr_application(ServeSettings(bundle="galr.plan", index="gallery.gidx"), RaySettings(replicas=2))  # doctest: +SKIP
>>> serve.run(app, name="galr", route_prefix="/")                                   # doctest: +SKIP

``ray`` is an optional dependency (``pip install 'galr[ray]'``); nothing else imports this module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from galr.console import process_defaults
from galr.errors import InputError, UnavailableError
from galr.runtime.ray_cluster import check_address, check_address_form
from galr.runtime.serve.settings import ServeSettings

INSTALL_HINT = "pip install 'galr[ray]'"


@dataclass(frozen=True)
class RaySettings:
    """Where and how wide the service runs on Ray.

    Attributes:
        address: a running cluster's GCS address (``HOST:PORT``); ``None`` starts Ray on this machine.
        replicas: copies of the service (each loads the engine once).
        cpus_per_replica: CPUs Ray reserves per replica (Ray's default of 1 can leave replicas unplaced
            on small machines). A replica runs ONNX Runtime on that many threads (at least one), without
            spinning, so replicas and Ray's proxy on one node share its cores instead of fighting.
        batch_wait_s: how long Ray's batching waits for company (``max_batch`` from the serve settings).
        health_check_period_s: how often Ray asks each replica whether it is healthy.
    """

    address: str | None = None
    replicas: int = 2
    cpus_per_replica: float = 1.0
    batch_wait_s: float = 0.005
    health_check_period_s: float = 5.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise InputError(f"replicas must be at least 1, got {self.replicas}")
        if self.cpus_per_replica <= 0:
            raise InputError(f"cpus_per_replica must be positive, got {self.cpus_per_replica}")
        if self.address is not None:
            check_address_form(self.address)


def require_ray() -> Any:
    """``ray`` with Serve, or :class:`UnavailableError` naming the extra."""
    try:
        import ray
        from ray import serve  # noqa: F401
    except ImportError:
        raise UnavailableError(f"galr-serve --ray needs Ray Serve: {INSTALL_HINT}") from None
    return ray


def replica_settings(settings: ServeSettings, ray_settings: RaySettings) -> ServeSettings:
    """What one replica runs with: ONNX Runtime on the CPUs Ray reserved for it (at least one), not spinning."""
    return dataclasses.replace(settings, encoder_spinning=False,
                               encoder_threads=max(1, round(ray_settings.cpus_per_replica)))


def replica_actor_options(ray_settings: RaySettings) -> dict[str, Any]:
    """Ray's options for a replica: its CPUs, and galr's process defaults in its environment (a worker
    on another machine does not inherit this process's; without them OpenBLAS's threads spin after
    every search through the next encoder batch)."""
    return {"num_cpus": ray_settings.cpus_per_replica, "runtime_env": {"env_vars": process_defaults()}}


def galr_application(settings: ServeSettings, ray_settings: RaySettings) -> Any:
    """The Ray Serve application (a bound deployment) of the service; see the module docstring."""
    require_ray()
    from ray import serve

    from galr.runtime.serve.app import create_app
    from galr.runtime.serve.batching import answer_together

    @serve.deployment(num_replicas=ray_settings.replicas, ray_actor_options=replica_actor_options(ray_settings),
                      health_check_period_s=ray_settings.health_check_period_s,
                      max_ongoing_requests=max(settings.max_batch_queries * 2, 16))
    @serve.ingress()
    class GalrReplica:
        def __init__(self, serve_settings: ServeSettings) -> None:
            import warnings

            from galr.preprocess.drea import NoDetectionsWarning

            warnings.filterwarnings("ignore", category=NoDetectionsWarning)  # uploads come without detections
            # not `self.app`: Ray's ingress wrapper owns that name
            self.galr_app = create_app(serve_settings, search_call=self.search, background_load=False)

        def __serve_build_asgi_app__(self) -> Any:
            return self.galr_app

        @serve.batch(max_batch_size=settings.max_batch_queries, batch_wait_timeout_s=ray_settings.batch_wait_s)
        async def search(self, calls: list[Any]) -> list[Any]:
            state = self.galr_app.state  # on the app's one worker thread, as every other blocking call
            return await state.batcher.run_blocking(answer_together, state.service.search_text, calls,
                                                    state.metrics.batch.observe)

        def check_health(self) -> None:
            failure = self.galr_app.state.service.failure
            if failure:
                raise RuntimeError(f"galr replica could not load: {failure}")

    return GalrReplica.bind(replica_settings(settings, ray_settings))


def serve_on_ray(settings: ServeSettings, ray_settings: RaySettings, *, block: bool = True,
                 log: Any = print) -> None:
    """Start (or join) Ray, deploy the service behind Ray's proxy on ``settings.host:port``, and wait.

    Raises:
        UnavailableError: Ray is not installed, or no cluster answers at ``ray_settings.address``.
    """
    ray = require_ray()
    from ray import serve

    if ray_settings.address is not None:
        check_address(ray_settings.address)
    import time

    ray.init(address=ray_settings.address or "local", ignore_reinit_error=True, include_dashboard=False,
             log_to_driver=False)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(galr_application(settings, ray_settings), name="galr", route_prefix="/")
        log(f"galr-serve on Ray: http://{settings.host}:{settings.port}/ ({ray_settings.replicas} replicas; "
            f"cluster resources {ray.cluster_resources()})")
        while block:
            time.sleep(3600)
    except KeyboardInterrupt:  # Ctrl-C, also while the deployment was still starting
        log("stopping: serve.shutdown()")
    finally:
        if block:  # the service lives as long as this command
            if ray_settings.address is None:
                serve.shutdown()  # our own Ray instance: all of it goes
            else:
                serve.delete("galr")  # a shared cluster: only our application goes
            ray.shutdown()


__all__ = ["RaySettings", "galr_application", "require_ray", "serve_on_ray"]
