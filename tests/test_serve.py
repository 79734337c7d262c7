"""Tests for galr-serve: the HTTP API over a real small bundle, batching, limits, errors, reload."""

from __future__ import annotations

import asyncio
import io
import shutil
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("fastapi", reason="galr-serve needs the serve extra (pip install 'galr[serve]')")
pytest.importorskip("httpx", reason="the FastAPI test client needs httpx")

from fastapi.testclient import TestClient  # noqa: E402

from galr.errors import BusyError, InputError  # noqa: E402
from galr.runtime.cli.serve import main as serve_main  # noqa: E402
from galr.runtime.index import load_index  # noqa: E402
from galr.runtime.retriever import Retriever  # noqa: E402
from galr.runtime.serve import ServeSettings, create_app  # noqa: E402
from galr.runtime.serve.batching import QueryBatcher  # noqa: E402
from tests.test_runtime_cli import deployment  # noqa: E402,F401  (the shared module fixture)

KEY = "k" * 24


def started(app) -> TestClient:
    client = TestClient(app)
    client.__enter__()
    for _ in range(200):
        if client.get("/readyz").status_code == 200:
            return client
        time.sleep(0.02)
    raise AssertionError(client.get("/readyz").json())


@pytest.fixture
def served(deployment, tmp_path):  # noqa: F811
    index = tmp_path / "served.gidx"
    shutil.copy(deployment["index"], index)

    def serve(**limits):
        settings = ServeSettings(bundle=deployment["bundle"], index=index, **limits)
        client = started(create_app(settings, encoders=deployment["engine"]))
        opened.append(client)
        return client

    opened: list[TestClient] = []
    yield serve, index
    for client in opened:
        client.__exit__(None, None, None)


def png_bytes(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def test_health_ready_info_and_the_page(served):
    serve, _ = served
    client = serve()
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").json()["images"] == 12
    info = client.get("/v1/info").json()
    assert info["images"] == 12 and info["text_bank"] == 30 and info["search"] == "exact"
    page = client.get("/").text
    assert 'id="query"' in page and 'id="image"' in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere (offline machines)


def test_text_search_answers_like_the_retriever(served, deployment):  # noqa: F811
    serve, index = served
    client = serve()
    queries = ["two white planes on a runway", "many ships in the harbor"]
    expected = Retriever(deployment["engine"], load_index(index)).search_text(queries, top_k=4)
    for rerank in (True, False):
        answer = client.post("/v1/search/text", json={"queries": queries, "top_k": 4, "rerank": rerank}).json()
        got = answer["results"]
        assert [r["query"] for r in got] == queries and all(r["reranked"] == rerank for r in got)
        assert all("path" not in hit["record"] for result in got for hit in result["hits"])  # no server paths
        if rerank:
            for result, want in zip(got, expected):
                assert [h["id"] for h in result["hits"]] == [h.id for h in want.hits]
                np.testing.assert_allclose([h["rerank_score"] for h in result["hits"]],
                                           [h.rerank_score for h in want.hits], atol=1e-6)
    for setting in ({"nprobe": 4}, {"exact_rerank": 3}):  # approximate-search settings on an exact index
        answer = client.post("/v1/search/text", json={"queries": queries, **setting})
        assert answer.status_code == 400 and "searched exactly" in answer.json()["error"]["message"], answer.text


def test_concurrent_requests_share_encoder_batches_and_get_their_own_top_k(served):
    serve, _ = served
    client = serve(max_wait_ms=300, max_batch_queries=64)
    queries = ["plane", "ship", "runway", "harbor", "green grass", "white ship", "two planes", "water"]

    def ask(number: int):
        return client.post("/v1/search/text", json={"queries": [queries[number]], "top_k": 1 + number % 3}).json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert [len(a["results"][0]["hits"]) for a in answers] == [1 + n % 3 for n in range(8)]
    assert [a["results"][0]["query"] for a in answers] == queries
    metrics = client.get("/metrics").text
    batches = float(next(line.split()[-1] for line in metrics.splitlines()
                         if line.startswith("galr_batch_queries_count")))
    assert batches < 8  # gathered: fewer encoder calls than requests
    assert 'galr_requests_total{route="/v1/search/text",status="200"} 8.0' in metrics


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "JSON"),
    (b'{"queries": "plane"}', 400, "queries"),
    (b'{"queries": []}', 400, "queries is empty"),
    (b'{"queries": ["plane"], "top_k": 0}', 400, "top_k"),
    (b'{"queries": ["plane"], "top_k": 1000}', 400, "at most 100"),
    (b'{"queries": ["?!"]}', 400, "queries[0] has no words"),
    (b'{"queries": ["   "]}', 400, "queries[0] is empty"),
])
def test_bad_text_requests_get_a_status_and_a_json_error(served, body, status, message):
    serve, _ = served
    client = serve()
    response = client.post("/v1/search/text", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]
    assert client.post("/v1/search/text", json={"queries": ["plane"]}).status_code == 200  # still serving


def test_request_size_limits(served):
    serve, _ = served
    client = serve(max_queries=3, max_query_chars=20, max_body_bytes=2000)
    assert "at most 3" in client.post("/v1/search/text", json={"queries": ["plane"] * 4}).json()["error"]["message"]
    long = client.post("/v1/search/text", json={"queries": ["plane " * 10]}).json()["error"]["message"]
    assert "60 characters; at most 20" in long
    big = client.post("/v1/search/text", content=b"{" + b" " * 3000 + b"}", headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and "at most 2000 bytes" in big.json()["error"]["message"]


def test_a_full_queue_answers_503_with_retry_after(served):
    serve, _ = served
    client = serve(max_queued_queries=1)
    response = client.post("/v1/search/text", json={"queries": ["plane", "ship"]})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert "busy" in response.json()["error"]["message"]


def test_image_search_embeddings_and_thumbnails(served, deployment):  # noqa: F811
    serve, _ = served
    client = serve()
    answer = client.post("/v1/search/image", files={"image": ("q.png", png_bytes(), "image/png")},
                         data={"top_k": "3"}).json()
    assert len(answer["captions"]) == 3 and len(answer["images"]) == 3 and answer["reranked"]
    assert all(hit["id"] in deployment["bank"] for hit in answer["captions"])
    vectors = client.post("/v1/embed/text", json={"texts": ["plane", "ship"]}).json()
    assert vectors["dim"] == len(vectors["embeddings"][0])
    np.testing.assert_allclose(np.linalg.norm(vectors["embeddings"], axis=1), 1, atol=1e-5)
    image = client.post("/v1/embed/image", files={"image": ("q.png", png_bytes(), "image/png")}).json()
    assert len(image["embedding"]) == vectors["dim"]
    thumb = client.get("/v1/thumbnail", params={"id": "img_03.png"})
    assert thumb.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(thumb.content)).size == (96, 80)
    assert client.get("/v1/thumbnail", params={"id": "../../etc/passwd"}).status_code == 404


def _bomb() -> bytes:
    """A PNG of a few dozen bytes whose header declares 40000 x 40000 pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("payload, message", [
    (b"not an image at all", "cannot"),
    (b"", "is empty"),
])
def test_bad_uploads_are_refused_and_the_service_keeps_serving(served, payload, message):
    serve, _ = served
    client = serve()
    response = client.post("/v1/search/image", files={"image": ("x.png", payload, "image/png")})
    assert response.status_code == 400 and message in response.json()["error"]["message"].lower()
    assert client.post("/v1/search/text", json={"queries": ["plane"]}).status_code == 200


def test_a_decompression_bomb_upload_is_refused(served):
    serve, _ = served
    client = serve()
    response = client.post("/v1/search/image", files={"image": ("bomb.png", _bomb(), "image/png")})
    assert response.status_code == 400, response.text
    assert "pixels" in response.json()["error"]["message"]


def test_the_api_key_guards_every_v1_route_and_is_needed_off_loopback(deployment, tmp_path):  # noqa: F811
    with pytest.raises(InputError, match="give an API key"):
        ServeSettings(host="0.0.0.0")
    settings = ServeSettings(bundle=deployment["bundle"], index=deployment["index"], host="0.0.0.0", api_key=KEY)
    client = started(create_app(settings, encoders=deployment["engine"]))
    try:
        assert client.post("/v1/search/text", json={"queries": ["plane"]}).status_code == 401
        wrong = {"Authorization": "Bearer " + "x" * 24}
        assert client.get("/v1/info", headers=wrong).status_code == 401
        right = {"Authorization": f"Bearer {KEY}"}
        assert client.post("/v1/search/text", json={"queries": ["plane"]}, headers=right).status_code == 200
        assert client.get("/healthz").status_code == 200  # probes stay open
        assert 'id="api-key"' in client.get("/").text
    finally:
        client.__exit__(None, None, None)


def test_reload_swaps_a_good_index_and_refuses_a_bad_one(deployment, tmp_path):  # noqa: F811
    path = tmp_path / "live.gidx"
    shutil.copy(deployment["index"], path)
    settings = ServeSettings(bundle=deployment["bundle"], index=path, api_key=KEY)
    client = started(create_app(settings, encoders=deployment["engine"]))
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        smaller = load_index(path)
        smaller.remove(["img_00.png", "img_01.png"])
        smaller.save(path)
        reloaded = client.post("/v1/admin/reload", headers=headers)
        assert reloaded.status_code == 200 and reloaded.json()["reloaded"]["images"] == 10
        path.write_bytes(path.read_bytes()[:500])  # a damaged file
        refused = client.post("/v1/admin/reload", headers=headers)
        assert refused.status_code == 400 and "damaged" in refused.json()["error"]["message"]
        assert client.get("/v1/info", headers=headers).json()["images"] == 10  # the old one keeps serving
    finally:
        client.__exit__(None, None, None)
    unkeyed = started(create_app(ServeSettings(bundle=deployment["bundle"], index=deployment["index"]),
                                 encoders=deployment["engine"]))
    try:
        assert unkeyed.post("/v1/admin/reload").status_code == 403
    finally:
        unkeyed.__exit__(None, None, None)


def test_a_service_that_cannot_load_stays_alive_and_says_why(deployment, tmp_path):  # noqa: F811
    settings = ServeSettings(bundle=deployment["bundle"], index=tmp_path / "missing.gidx")
    with TestClient(create_app(settings, encoders=deployment["engine"])) as client:
        for _ in range(100):
            ready = client.get("/readyz")
            if "not found" in ready.text:
                break
            time.sleep(0.02)
        assert ready.status_code == 503 and "index not found" in ready.json()["error"]["message"]
        assert client.get("/healthz").status_code == 200
        assert client.post("/v1/search/text", json={"queries": ["plane"]}).status_code == 503


def test_galr_serve_refuses_bad_settings_with_exit_2(deployment, tmp_path):  # noqa: F811
    runner = CliRunner()
    result = runner.invoke(serve_main, ["--engine", str(deployment["bundle"]), "--index", str(deployment["index"]),
                                        "--host", "0.0.0.0"], env={"GALR_API_KEY": ""})
    assert result.exit_code == 2 and "give an API key" in result.output
    result = runner.invoke(serve_main, ["--engine", str(tmp_path / "none.plan")])
    assert result.exit_code == 2 and "bundle not found" in result.output


def test_galr_serve_hands_its_settings_to_uvicorn_and_the_service(deployment, monkeypatch):  # noqa: F811
    import uvicorn

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.append((app, kwargs)))
    common = ["--engine", str(deployment["bundle"]), "--index", str(deployment["index"])]
    assert CliRunner().invoke(serve_main, common).exit_code == 0
    assert CliRunner().invoke(serve_main, [*common, "--access-log", "--threads", "1", "--spin"]).exit_code == 0
    (quiet_app, quiet), (_, logged) = started
    assert quiet["access_log"] is False and logged["access_log"] is True
    service = quiet_app.state.service.settings
    assert (service.encoder_threads, service.encoder_spinning) == (0, False)  # not spinning unless asked
    assert (started[1][0].state.service.settings.encoder_threads,
            started[1][0].state.service.settings.encoder_spinning) == (1, True)


# ---------------------------------------------------------------------------------------------
# The batcher alone


class _Result:
    def __init__(self, query: str) -> None:
        self.query = query

    def truncated(self, top_k: int) -> "_Result":
        return self


def test_batcher_drops_requests_whose_caller_gave_up_and_bounds_its_queue():
    calls: list[list[str]] = []

    def run(queries, top_k, rerank, search):
        calls.append(list(queries))
        if queries == ["busy"]:
            time.sleep(0.1)  # keeps the worker busy while the next request waits in the queue
        return [_Result(q) for q in queries]

    async def scenario():
        batcher = QueryBatcher(run, max_batch_queries=8, max_wait_ms=100, max_queued_queries=3)
        batcher.start()
        busy = asyncio.ensure_future(batcher.search(["busy"], 5, True, {}))
        await asyncio.sleep(0.02)
        gone = asyncio.ensure_future(batcher.search(["left"], 5, True, {}))
        await asyncio.sleep(0.01)
        gone.cancel()  # a client that disconnected while waiting
        await busy
        kept = await batcher.search(["stay", "here"], 5, True, {})
        with pytest.raises(BusyError):
            await batcher.search(["a", "b", "c", "d"], 5, True, {})
        await batcher.stop()
        return kept

    kept = asyncio.run(scenario())
    assert [r.query for r in kept] == ["stay", "here"]
    assert calls == [["busy"], ["stay", "here"]]  # the abandoned query was never computed


def test_clients_answered_by_one_batch_join_the_next_one_instead_of_halving_it():
    """Closed-loop clients (each sends again when answered): two cohorts must merge into full batches."""
    sizes: list[int] = []

    def run(queries, top_k, rerank, search):
        sizes.append(len(queries))
        time.sleep(0.02)  # the encoder: 20 ms a batch
        return [_Result(q) for q in queries]

    async def client(batcher, number: int, rounds: int) -> None:
        if number % 2:
            await asyncio.sleep(0.01)  # the second cohort arrives while the first batch computes
        for _ in range(rounds):
            await batcher.search([f"q{number}"], 1, False, {})
            await asyncio.sleep(0.001)  # the HTTP round trip before the next request

    async def scenario():
        batcher = QueryBatcher(run, max_batch_queries=8, max_wait_ms=5, max_queued_queries=64)
        batcher.start()
        await asyncio.gather(*(client(batcher, n, 6) for n in range(8)))
        await batcher.stop()

    asyncio.run(scenario())
    assert sizes[0] == 4 and sum(sizes) == 48
    assert set(sizes[1:-1]) == {8}, sizes  # steady state: every client in each batch (the last: a straggler cohort)


# ---------------------------------------------------------------------------------------------
# The page, in a real headless browser


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_the_search_page_in_a_headless_browser(deployment, tmp_path):  # noqa: F811
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no Chromium installed (apt-get install chromium) to drive the search page")
    playwright = pytest.importorskip("playwright.sync_api", reason="the page test drives Chromium with playwright")
    import socket
    import threading

    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = ServeSettings(bundle=deployment["bundle"], index=deployment["index"], port=port)
    server = uvicorn.Server(uvicorn.Config(create_app(settings, encoders=deployment["engine"]), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.02)
        upload = tmp_path / "query.png"
        upload.write_bytes(png_bytes(seed=5))
        with playwright.sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.fill("#query", "two white planes on a runway")
            page.click("#search")
            page.wait_for_selector(".hit img[src^='blob:']", timeout=20_000)
            assert page.locator(".hit").count() == 12  # top-k 12 of a 12-image gallery
            assert "MR on" in page.inner_text("#status")
            page.screenshot(path=str(tmp_path / "text-search.png"), full_page=True)
            page.set_input_files("#image", str(upload))
            page.click("#upload")
            page.wait_for_selector(".caption", timeout=20_000)
            assert page.locator(".caption").count() == 12
            assert all(text.split(". ", 1)[1].rsplit(" (", 1)[0] in deployment["bank"]
                       for text in page.locator(".caption").all_inner_texts())
            page.fill("#query", "?!")
            page.click("#search")
            page.wait_for_selector("#status .error", timeout=20_000)
            assert "no words" in page.inner_text("#status")
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_each_result_carries_its_own_notices(served):
    serve, _ = served
    client = serve(max_wait_ms=200, max_batch_queries=64)
    queries = ["two white planes", "zzzz qqqq", "many ships"]
    with ThreadPoolExecutor(3) as pool:  # batched together: the notices must still reach the right query
        answers = list(pool.map(lambda q: client.post("/v1/search/text", json={"queries": [q]}).json(), queries))
    notices = [answer["results"][0]["notices"] for answer in answers]
    assert notices[0] == [] and notices[2] == []
    assert len(notices[1]) == 1 and notices[1][0].startswith("query ('zzzz qqqq')") and "vocabulary" in notices[1][0]


def test_encoder_threads_and_spinning_reach_onnx_runtime_and_ray_replicas_take_their_cpus(
        deployment, monkeypatch, tmp_path):  # noqa: F811
    import galr.runtime.encoders as encoders_module
    from galr.runtime.serve.ray import RaySettings, replica_settings

    asked = []

    def load_engine(bundle, **kwargs):
        asked.append(kwargs["options"][0])
        return deployment["engine"]

    monkeypatch.setattr(encoders_module, "load_engine", load_engine)
    index = tmp_path / "served.gidx"
    shutil.copy(deployment["index"], index)
    settings = ServeSettings(bundle=deployment["bundle"], index=index, encoder_threads=1, encoder_spinning=False)
    client = started(create_app(settings))
    try:
        assert client.post("/v1/search/text", json={"queries": ["plane"]}).status_code == 200
    finally:
        client.__exit__(None, None, None)
    assert (asked[0].intra_op_threads, asked[0].allow_spinning) == (1, False)
    for cpus, threads in ((0.5, 1), (1.0, 1), (4.0, 4)):
        replica = replica_settings(settings, RaySettings(cpus_per_replica=cpus))
        assert (replica.encoder_threads, replica.encoder_spinning) == (threads, False)


def test_ray_replicas_get_their_cpus_and_galrs_process_defaults_in_their_environment(monkeypatch):
    from galr.runtime.serve.ray import RaySettings, replica_actor_options

    # A replica on another machine does not inherit this process's environment: numpy's OpenBLAS
    # threads would spin after each search through the next encoder batch.
    monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    options = replica_actor_options(RaySettings(cpus_per_replica=0.5))
    assert options == {"num_cpus": 0.5, "runtime_env": {"env_vars": {"OPENBLAS_THREAD_TIMEOUT": "4"}}}
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "1000")  # the user's own choice travels instead
    assert replica_actor_options(RaySettings())["runtime_env"]["env_vars"] == {"OPENBLAS_THREAD_TIMEOUT": "1000"}
    with pytest.raises(InputError, match="encoder_threads"):
        ServeSettings(encoder_threads=-1)
