"""galr-serve on Ray Serve: settings checks (fast), and a slow run on a simulated two-node cluster that
sends real HTTP requests through Ray's proxy and kills a replica."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from galr.errors import InputError, UnavailableError
from galr.runtime.ray_cluster import check_address
from galr.runtime.serve.ray import RaySettings
from tests.ray_cluster import two_node_cluster
from tests.test_runtime_cli import deployment  # noqa: F401  (the shared module fixture)


def test_ray_settings_are_checked():
    with pytest.raises(InputError, match="HOST:PORT"):
        RaySettings(address="no-port")
    with pytest.raises(InputError, match="replicas"):
        RaySettings(replicas=0)


def test_an_address_nothing_answers_at_is_refused_at_once():
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.perf_counter()
    with pytest.raises(UnavailableError, match="no Ray cluster answers"):
        check_address(f"127.0.0.1:{port}", timeout_s=2)
    assert time.perf_counter() - started < 5


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post(port: int, body: dict, timeout: float = 30) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/search/text", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, {}


@pytest.mark.slow
def test_two_nodes_two_replicas_answer_through_the_proxy_and_survive_a_killed_replica(deployment, tmp_path):  # noqa: F811
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'galr[ray]')")
    from ray import serve

    from galr.runtime.index import load_index
    from galr.runtime.retriever import Retriever
    from galr.runtime.serve import ServeSettings
    from galr.runtime.serve.ray import galr_application

    port = _free_port()
    with two_node_cluster() as ray:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = ServeSettings(bundle=deployment["bundle"], index=deployment["index"], backend="onnxruntime",
                                 device="cpu")
        serve.run(galr_application(settings, RaySettings(replicas=2, cpus_per_replica=0.5)), name="galr",
                  route_prefix="/")
        queries = ["two white planes on a runway", "many ships in the harbor"]
        expected = Retriever(deployment["engine"], load_index(deployment["index"])).search_text(queries, top_k=4)
        status, answer = _post(port, {"queries": queries, "top_k": 4})
        assert status == 200
        assert [[h["id"] for h in r["hits"]] for r in answer["results"]] == [[h.id for h in r.hits] for r in expected]
        with ThreadPoolExecutor(8) as pool:  # concurrent requests: Ray's batching and both replicas
            statuses = list(pool.map(lambda q: _post(port, {"queries": [q], "top_k": 2})[0], queries * 8))
        assert statuses == [200] * 16
        replicas = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith("SERVE_REPLICA::")]
        assert len(replicas) == 2
        ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
        after = [_post(port, {"queries": [queries[n % 2]], "top_k": 3})[0] for n in range(20)]
        assert after == [200] * 20, after  # the proxy routes around the dead replica
        deadline = time.time() + 60
        while time.time() < deadline:  # Ray replaces it
            alive = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["name"].startswith("SERVE_REPLICA::")]
            if len(alive) == 2 and replicas[0] not in alive:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"the killed replica was not replaced: {alive}")
        assert _post(port, {"queries": queries, "top_k": 4})[0] == 200
        assert _post(port, {"queries": [], "top_k": 4})[0] == 400  # the app's own errors, through the proxy
        serve.shutdown()


@pytest.mark.slow
def test_galr_serve_ray_runs_the_service_until_interrupted(deployment):  # noqa: F811
    pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'galr[ray]')")
    import signal
    import subprocess
    import sys

    port = _free_port()
    command = [sys.executable, "-c", "from galr.console import galr_serve; galr_serve()", "--engine",
               str(deployment["bundle"]), "--index", str(deployment["index"]), "--port", str(port), "--ray",
               "--replicas", "2", "--replica-cpus", "0.5", "--backend", "onnxruntime", "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline, status = time.time() + 120, None
        while time.time() < deadline and process.poll() is None:
            try:
                status, answer = _post(port, {"queries": ["two white planes"], "top_k": 3}, timeout=5)
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        assert status == 200, process.stdout.read() if process.poll() is not None else "no answer in 120 s"
        assert len(answer["results"][0]["hits"]) == 3
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C to galr-serve only; it stops Serve and Ray itself
        try:
            output, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
    assert "stopping: serve.shutdown()" in output, output
    assert process.returncode == 0
