"""galr-bench: the quick run end to end (JSON schema, Markdown, MR equality, ratios vs eager), the
timing harness, and the analytic FLOP formulas against torch's own counter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from galr.bench import harness
from galr.bench.cli import SECTIONS, BenchOptions, main, mr_mismatches
from galr.bench.encoders import (
    BACKENDS,
    ENCODER_NAMES,
    REFERENCE,
    tensorrt_unavailable_reason,
)
from galr.bench.harness import Case, Measurement, Spread, TimingSettings
from galr.bench.rerank import compare_outputs, synthetic_similarity


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    """One ``galr-bench --quick`` run shared by the tests below (about 20-30 s on 2 cores)."""
    import torch

    out = tmp_path_factory.mktemp("bench")
    output, markdown = out / "results.json", out / "BENCH.md"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            patch.setenv(name, "1")  # galr-bench sets them; this restores the originals afterwards
        result = CliRunner().invoke(main, ["--quick", "-o", str(output), "--markdown", str(markdown)])
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return output, markdown, json.loads(output.read_text())


def test_quick_run_writes_every_section(quick_run):
    output, _, data = quick_run
    assert harness.load_results(output) == data
    assert data["mode"] == "quick"
    assert set(data["sections"]) == set(SECTIONS)
    for name in ("encoders", "gallery", "rerank", "limits", "bounds", "serve"):
        assert data["sections"][name]["status"] == "ok", name
    accuracy = data["sections"]["accuracy"]
    assert accuracy["status"] == "not run" and "--checkpoint" in accuracy["reason"]
    machine = data["machine"]
    assert machine["cpu"] and machine["threads"] == 1 and machine["versions"]["numpy"] == np.__version__
    assert data["command"].startswith("galr-bench --quick -o ")


def test_encoder_rows_cover_every_encoder_backend_and_batch(quick_run):
    section = quick_run[2]["sections"]["encoders"]
    ran = [b["name"] for b in section["backends"] if b["status"] == "ok"]
    assert ran[:3] == [REFERENCE, "onnxruntime-fp32", "onnxruntime-int8"]
    batches = [1, *section["settings"]["batch_sizes"]]
    keys = {(r["encoder"], r["backend"], r["batch"]) for r in section["rows"]}
    assert keys == {(e, b, n) for e in ENCODER_NAMES for b in ran for n in batches}
    for row in section["rows"]:
        if row["batch"] == 1:
            latency = row["latency_ms"]
            assert latency["p50"]["min"] <= latency["p50"]["median"] <= latency["p50"]["max"]
            assert latency["p50"]["median"] <= latency["p99"]["median"]
        else:
            assert row["items_per_s"]["min"] <= row["items_per_s"]["median"] <= row["items_per_s"]["max"]


def test_tensorrt_rows_say_why_they_did_not_run(quick_run):
    reason = tensorrt_unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT and a GPU are present: the TensorRT rows ran")
    backends = {b["name"]: b for b in quick_run[2]["sections"]["encoders"]["backends"]}
    assert set(backends) == set(BACKENDS)
    for name in ("tensorrt-fp16", "tensorrt-int8"):
        assert backends[name] == {"name": name, "label": backends[name]["label"], "status": "not run", "reason": reason}
    assert f"not run: {reason}" in quick_run[1].read_text()


def test_speedups_are_against_eager_of_the_same_run(quick_run):
    rows = quick_run[2]["sections"]["encoders"]["rows"]
    eager = {(r["encoder"], r["batch"]): r for r in rows if r["backend"] == REFERENCE}
    checked = 0
    for row in rows:
        reference = eager[(row["encoder"], row["batch"])]
        if row["kind"] == "latency":
            expected = reference["latency_ms"]["p50"]["median"] / row["latency_ms"]["p50"]["median"]
        else:
            expected = row["items_per_s"]["median"] / reference["items_per_s"]["median"]
        assert row["speedup_vs_eager"] == pytest.approx(expected, rel=1e-12)
        checked += row["backend"] != REFERENCE
    assert checked >= 2 * len(ENCODER_NAMES)


def test_mr_matches_the_original_and_reports_its_speedup(quick_run):
    section = quick_run[2]["sections"]["rerank"]
    assert {r["direction"] for r in section["rows"]} == {"i2t", "t2i"}
    for row in section["rows"]:
        assert row["equal"] and row["max_abs_diff"] <= section["tolerance"]
        assert row["speedup"] == pytest.approx(row["reference_s"] / row["batched_s"]["median"])
        assert "goal_met" not in row  # the goal is the whole MR step per size (issue 16's decision)
    assert mr_mismatches(quick_run[2]) == []
    by_size = {}
    for row in section["rows"]:
        by_size.setdefault(row["size"], []).append(row)
    assert [step["size"] for step in section["steps"]] == list(by_size)
    for step in section["steps"]:
        both = by_size[step["size"]]
        assert step["reference_s"] == pytest.approx(sum(r["reference_s"] for r in both))
        assert step["batched_ms"] == pytest.approx(1e3 * sum(r["batched_s"]["median"] for r in both))
        assert step["goal_met"] == (step["speedup"] >= step["speedup_goal"])
    assert "The whole MR step per size" in quick_run[1].read_text()


def test_gallery_and_limits_sections(quick_run):
    sections = quick_run[2]["sections"]
    search = sections["gallery"]["search"]
    assert {(r["size"], r["storage"]) for r in search} == {(10_000, "fp32"), (10_000, "fp16")}
    for row in search:
        assert row["status"] == "ok", row
        assert row["memory"]["embedding_bytes_per_image"] == {"fp32": 2048, "fp16": 1024}[row["storage"]]
    assert [r["status"] for r in sections["gallery"]["build"]] == ["ok", "ok"]
    limits = sections["limits"]
    assert limits["peaks"]["matmul_gflops"]["torch"]["median"] > 0
    assert {f["backend"] for f in limits["fractions"]} == {REFERENCE, "onnxruntime-fp32", "onnxruntime-int8-cpu"}
    # INT8 rows are held to the read rate of their own (smaller) working sets, measured too.
    assert {"int8-cpu:global", "int8-cpu:text", "int8-cpu:end-to-end"} <= set(limits["peaks"]["weight_read_gbs"])
    assert limits["encoders_int8_cpu"]["text"]["weight_bytes"] < limits["encoders"]["text"]["weight_bytes"]
    assert all(f["fraction_of_limit"] > 0 for f in limits["fractions"])


def test_serve_section_loads_a_real_service_on_loopback(quick_run):
    serve = quick_run[2]["sections"]["serve"]
    assert [row["clients"] for row in serve["rows"]] == [1, 4]
    for row in serve["rows"]:
        assert row["errors"] == 0 and row["ok"] == row["requests"] == 5 * row["clients"]
        assert row["p50_ms"] > 0 and row["mean_batch"] >= 1
        runs = row["runs_queries_per_s"]  # three runs; the row is the one of median throughput
        assert len(runs) == 3 and row["queries_per_s"] == sorted(runs)[1]
    assert serve["reference_queries_per_s"] > 0
    spinning = serve["spinning"]  # the same service with ONNX Runtime spinning, fewest and most clients
    assert [row["clients"] for row in spinning["rows"]] == [1, 4] and all(r["errors"] == 0 for r in spinning["rows"])
    text = quick_run[1].read_text()
    assert "## 8. Serving: galr-serve under concurrent clients" in text
    assert "**ONNX Runtime's threads spinning** after their work (`galr-serve --spin`" in text
    assert "| clients | not spinning: queries/s |" in text


def test_bounds_run_each_case_in_its_own_process(quick_run):
    bounds = quick_run[2]["sections"]["bounds"]
    assert [row["queries"] for row in bounds["queries"]] == list(bounds["settings"]["query_counts"])
    assert all(row["status"] == "ok" and row["peak_mb"] > 10 for row in bounds["queries"])
    assert bounds["tiff"]["outcome"].startswith(("accepted", "refused"))
    pngs = bounds["pngs"]
    assert pngs["status"] == "ok" and pngs["peak_mb"] >= pngs["model_peak_mb"] > 10


def test_markdown_is_rendered_from_the_json(quick_run, tmp_path):
    output, markdown, data = quick_run
    text = markdown.read_text()
    for heading in ("## Machine", "## Commands", "## 1. Encoders", "## 2. Gallery", "## 3. MR rerank",
                    "## 4. Accuracy", "## 5. Limits", "## 6. Memory bounds", "Where the gap is"):
        assert heading in text
    assert data["command"] in text and data["machine"]["cpu"] in text
    again = tmp_path / "again.md"
    result = CliRunner().invoke(main, ["--render", str(output), "--markdown", str(again)])
    assert result.exit_code == 0, result.output
    assert again.read_text() == text


def test_render_refuses_a_file_that_is_not_a_result(tmp_path):
    bogus = tmp_path / "bogus.json"
    bogus.write_text(json.dumps({"schema": "something-else"}))
    result = CliRunner().invoke(main, ["--render", str(bogus), "--markdown", str(tmp_path / "x.md")])
    assert result.exit_code == 2 and "not a galr-bench result file" in result.output


# ---------------------------------------------------------------------------------------------
# Harness


def test_spread_and_measurement_statistics():
    assert Spread.of([3.0, 1.0, 2.0]) == Spread(1.0, 2.0, 3.0)
    with pytest.raises(ValueError):
        Spread.of([])
    runs = (tuple([0.001] * 99 + [0.101]), tuple([0.002] * 100))
    measured = Measurement(runs, items=4)
    latency = measured.latency_ms()
    assert latency["p50"] == {"min": 1.0, "median": 1.5, "max": 2.0}
    assert latency["p99"]["max"] == pytest.approx(2.0)
    assert latency["calls_per_run"] == 100 and latency["runs"] == 2
    throughput = measured.throughput()
    assert throughput["min"] == pytest.approx(4 * 100 / (0.099 + 0.101))
    assert throughput["max"] == pytest.approx(4 / 0.002)


def test_run_interleaved_alternates_cases_and_warms_up():
    calls: list[str] = []
    settings = TimingSettings(warmup=2, repeats=3, min_iterations=1, max_iterations=1)
    cases = {name: Case(lambda n=name: calls.append(n)) for name in ("a", "b")}
    measured = harness.run_interleaved(cases, settings)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert all(len(m.runs) == 3 and m.calls_per_run == 1 for m in measured.values())


def test_timing_settings_reject_nonsense():
    with pytest.raises(ValueError, match="repeats"):
        TimingSettings(repeats=0)
    with pytest.raises(ValueError, match="min_iterations"):
        TimingSettings(min_iterations=5, max_iterations=2)


def test_load_results_checks_schema_version(tmp_path):
    document = harness.new_results("quick", {"cpu": "x"}, {}, "galr-bench --quick")
    path = harness.write_results(tmp_path / "r.json", document)
    assert harness.load_results(path)["mode"] == "quick"
    document["schema_version"] = harness.SCHEMA_VERSION + 1
    harness.write_results(path, document)
    with pytest.raises(ValueError, match="schema version"):
        harness.load_results(path)
    with pytest.raises(FileNotFoundError):
        harness.load_results(tmp_path / "missing.json")


def test_plain_makes_numpy_json_safe():
    value = harness.plain({"a": np.float32(1.5), "b": np.arange(2), "c": float("nan"), "d": (np.int64(3),)})
    assert value == {"a": 1.5, "b": [0, 1], "c": None, "d": [3]}
    json.dumps(value, allow_nan=False)


# ---------------------------------------------------------------------------------------------
# CLI options, MR comparison, limits


def test_command_line_reproduces_the_options():
    options = BenchOptions(output=Path("out dir/r.json"), markdown=Path("B.md"), sections=("rerank",), threads=2)
    assert options.command_line() == "galr-bench -o 'out dir/r.json' --markdown B.md --only rerank --threads 2"
    assert BenchOptions(quick=True).resolved_threads == 1
    with pytest.raises(ValueError, match="unknown sections"):
        BenchOptions(sections=("gpu",))


def test_compare_outputs_and_mismatch_listing():
    sim = synthetic_similarity(10, 50, dim=16)
    assert sim.shape == (10, 50) and sim.dtype == np.float32
    changed = sim.copy()
    changed[3, 7] += 1e-3
    assert compare_outputs(sim, sim) == {"max_abs_diff": 0.0, "equal": True, "identical": True}
    result = compare_outputs(sim, changed)
    assert not result["equal"] and result["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert not compare_outputs(sim, sim[:5])["equal"]
    results = {"sections": {"rerank": {"status": "ok", "rows": [
        {"size": "RSITMD test", "direction": "t2i", "equal": False, "max_abs_diff": 0.1}]}}}
    assert mr_mismatches(results) == ["RSITMD test t2i (max abs diff 0.1)"]


@pytest.mark.parametrize("overrides", [{}, {"image_size": 96, "resnet_widths": (4, 8, 12, 16), "gcn_dims": (5, 7, 9),
                                           "vsa_channels": 2, "fusion_ff": 48}])
def test_analytic_flops_equal_torch_flop_counter(overrides):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from galr.bench.limits import encoder_costs
    from galr.config import GaLRConfig
    from galr.export.onnx_export import example_inputs
    from galr.model import GaLR

    config = GaLRConfig.small(**overrides)
    model = GaLR(config).eval()
    feeds = example_inputs(config, batch=1, text_length=9)
    costs = encoder_costs(config, tokens=9, gallery=100)
    stages = {"global": model.encode_global, "local": model.encode_local, "fusion": model.fuse, "text": model.encode_text}
    for name, stage in stages.items():
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            stage(*feeds[name].values())
        assert costs[name].flops_per_item == counter.get_total_flops(), name
    assert costs["end-to-end"].flops_per_item == costs["text"].flops_per_item + 2 * 100 * config.embed_dim
    assert costs["search"].weight_bytes == 100 * config.embed_dim * 4


def test_the_end_to_end_limit_is_the_sum_of_its_stages():
    from galr.bench.limits import encoder_costs, fractions_of_limit, limit_seconds
    from galr.config import GaLRConfig

    costs = encoder_costs(GaLRConfig.small(), tokens=9, gallery=1000)
    # The text weights are read fast (in cache), the gallery slowly: one blended rate would be wrong.
    peaks = {"matmul_gflops": {"numpy": {"max": 100.0}}, "bandwidth_gbs": {"copy": {"max": 10.0}},
             "weight_read_gbs": {"text": {"max": 40.0}, "search": {"max": 5.0}, "end-to-end": {"max": 1.0}}}
    row = {"encoder": "end-to-end", "backend": "onnxruntime-fp32", "batch": 1, "status": "ok", "kind": "latency",
           "latency_ms": {"p50": {"median": 10.0}}}
    [fraction] = fractions_of_limit(costs, peaks, [row])

    def by_hand(cost, weight_rate: float) -> float:
        # The roofline, written out: the slower of compute at 100 GFLOP/s and reading the weights at
        # the stage's own rate plus the I/O at 10 GB/s.
        memory = (cost.weight_bytes + cost.streamed_bytes) / (weight_rate * 1e9) + cost.io_bytes_per_item / 10e9
        return max(cost.flops_per_item / 100e9, memory)

    expected = by_hand(costs["text"], 40.0) + by_hand(costs["search"], 5.0)
    assert fraction["limit_ms_per_item"] == pytest.approx(expected * 1e3)
    # One blended end-to-end rate would give another, wrong answer.
    assert not fraction["limit_ms_per_item"] == pytest.approx(limit_seconds("end-to-end", costs["end-to-end"], 1,
                                                                            peaks)[0] * 1e3)


def test_weight_bytes_match_the_exported_parameters():
    from galr.bench.limits import encoder_costs
    from galr.config import GaLRConfig
    from galr.model import GaLR

    config = GaLRConfig.small()
    model = GaLR(config)
    costs = encoder_costs(config, tokens=9, gallery=10)
    local = sum(p.numel() for p in model.local_feature.parameters())
    assert costs["local"].weight_bytes == 4 * local
    gru = model.text_feature.gru
    assert costs["text"].streamed_bytes == 8 * gru.weight_hh_l0.numel() * 4  # (T - 1) reads of W_hh


def test_approximate_search_benchmark_fits_measures_and_renders(tmp_path):
    pytest.importorskip("faiss", reason="approximate search needs faiss-cpu (pip install 'galr[faiss]')")
    from galr.bench.approximate import ApproximateSettings, markdown, run
    from galr.bench.report import _approximate
    from galr.runtime.index import GalleryIndex, ImageRecord

    rng = np.random.default_rng(0)
    real = rng.standard_normal((300, 16)).astype(np.float32) + 2 * rng.standard_normal((1, 16)).astype(np.float32)
    real /= np.linalg.norm(real, axis=1, keepdims=True)
    index = GalleryIndex("m", 16)
    index.add([ImageRecord(f"{i}.png", f"/{i}.png", 1, 1) for i in range(300)], real)
    settings = ApproximateSettings(size=3000, queries=20, nprobes=(1, 54), efs=(16,), sigmas=(0.2, 0.6),  # nlist 54
                                   kinds=("ivf", "ivfpq", "hnsw"), reranks=(0, 8), dim=24)
    results = run(index.save(tmp_path / "g.gidx"), settings, log=lambda _: None, work_dir=tmp_path)
    assert set(results["models"]) == {"anchored", "gaussian"} and results["fit"]["sigma"] in (0.2, 0.6)
    assert (results["dim"], results["real_dim"]) == (24, 16)
    ivf = results["models"]["gaussian"]["ivf"]["search"]
    assert [row["nprobe"] for row in ivf] == [1, 54]
    assert ivf[1]["recall_at_10"] == 1.0  # every list probed: exact
    assert all(0 <= row["recall_at_10"] <= 1 for model in results["models"].values()
               for kind in model.values() for row in kind["search"])
    pq = {(row["nprobe"], row["rerank"]): row["recall_at_10"] for row in results["models"]["anchored"]["ivfpq"]["search"]}
    assert pq[(54, 8)] > pq[(54, 0)]  # the exact re-rank from the rows on disk pays
    entry = results["models"]["anchored"]["ivfpq"]
    assert entry["disk_bytes_per_vector"] >= 24 * 2 and entry["resident_mb_opened"] > 0  # fp16 rows, a real child
    assert list(tmp_path.iterdir()) == [tmp_path / "g.gidx"]  # the saved searchers are gone
    text = markdown(results)
    assert "| gaussian | ivf |" in text and "top-1 minus top-10" in text and "nprobe 54 rerank 8" in text
    assert "lifted into 24" in text and "Not included" in _approximate(None)


def test_lifted_vectors_keep_every_inner_product():
    from galr.bench.approximate import AnchoredGenerator

    real = np.random.default_rng(1).standard_normal((50, 8)).astype(np.float32)
    real /= np.linalg.norm(real, axis=1, keepdims=True)
    flat, lifted = AnchoredGenerator(real, 0.3), AnchoredGenerator(real, 0.3, dim=32)
    small, large = flat.block(40, (0, 1)), lifted.block(40, (0, 1))
    assert large.shape == (40, 32)
    np.testing.assert_allclose(large @ large.T, small @ small.T, atol=1e-5)
    with pytest.raises(ValueError, match="smaller"):
        AnchoredGenerator(real, 0.3, dim=4)


def test_galr_bench_refuses_an_approximate_file_that_is_not_one(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("[1, 2]", encoding="utf-8")
    result = CliRunner().invoke(main, ["--quick", "--only", "limits", "-o", str(tmp_path / "r.json"),
                                             "--approximate", str(bad)])
    assert result.exit_code == 2 and "not a galr.bench.approximate result" in result.output


def test_the_detector_stand_in_has_the_ultralytics_layout_and_the_stated_cost(tmp_path):
    pytest.importorskip("onnx")
    from galr.bench.detector import DOTA_NAMES, DetectorBenchSettings, build_standin_detector
    from galr.preprocess.obb import ObbModelInfo
    from galr.runtime.backends.onnxruntime import OnnxRuntimeRunner

    path, gflops = build_standin_detector(tmp_path / "d.onnx", DetectorBenchSettings(imgsz=128, width=8))
    runner = OnnxRuntimeRunner(path, device="cpu")
    info = ObbModelInfo.from_metadata(dict(runner.session.get_modelmeta().custom_metadata_map), str(path))
    runner.activate()
    output = runner.infer({"images": np.zeros((1, 3, 128, 128), np.float32)})["output0"]
    runner.close()
    cells = (128 // 8) ** 2 + (128 // 16) ** 2 + (128 // 32) ** 2
    assert info.names == DOTA_NAMES and output.shape == (1, 4 + len(DOTA_NAMES) + 1, cells)
    # conv multiply-adds of the stack at 128 px, counted by hand for width 8: stem 3->4, blocks, heads
    assert 0.001 < gflops < 0.1


def test_cpu_int8_rows_are_measured_against_onnxruntime_fp32_of_the_same_run(quick_run):
    section = quick_run[2]["sections"]["encoders"]
    rows = section["rows"]
    fp32 = {(r["encoder"], r["batch"]): r for r in rows if r["backend"] == "onnxruntime-fp32"}
    cpu = [r for r in rows if r["backend"] == "onnxruntime-int8-cpu"]
    assert {r["encoder"] for r in cpu} == set(ENCODER_NAMES)
    for row in cpu:
        reference = fp32[(row["encoder"], row["batch"])]
        if row["kind"] == "latency":
            expected = reference["latency_ms"]["p50"]["median"] / row["latency_ms"]["p50"]["median"]
        else:
            expected = row["items_per_s"]["median"] / reference["items_per_s"]["median"]
        assert row["speedup_vs_onnxruntime_fp32"] == pytest.approx(expected)


def test_query_profile_and_startup_are_reported(quick_run):
    section = quick_run[2]["sections"]["encoders"]
    profiles = {p["backend"]: p for p in section["query_profile"]}
    assert "onnxruntime-int8-cpu" in profiles and "onnxruntime-fp32" in profiles
    for profile in profiles.values():
        stages = profile["ms"]
        assert all(stages[s] > 0 for s in ("tokenise", "text encoder", "search", "total")) and stages["other"] >= 0
        assert profile["calls"] >= 10
    startup = {entry["precision"]: entry for entry in section["startup"]}
    assert set(startup) == {"auto", "fp32"} and all(e["status"] == "ok" for e in startup.values()), startup
    assert "int8-cpu" in startup["auto"]["info"] and "at fp32" in startup["fp32"]["info"]
    text = quick_run[1].read_text()
    assert "One end-to-end query by stage" in text and "`galr-run` startup" in text


def test_int8_cpu_costs_count_one_byte_per_int8_weight():
    from galr.bench.limits import encoder_costs, int8_cpu_costs
    from galr.config import GaLRConfig

    config = GaLRConfig.small()
    costs = encoder_costs(config, 16, 100)
    int8 = int8_cpu_costs(config, costs)
    h, e = config.gru_hidden, config.word_dim
    assert int8["global"].weight_bytes == costs["global"].weight_bytes / 4
    assert int8["text"].streamed_bytes == costs["text"].streamed_bytes / 4
    assert costs["text"].weight_bytes - int8["text"].weight_bytes == 3 * (3 * h * e + 3 * h * h)
    assert int8["local"] == costs["local"] and int8["search"] == costs["search"]
    assert int8["end-to-end"].flops_per_item == costs["end-to-end"].flops_per_item


def test_the_load_generators_http_client_keeps_alive_and_reads_by_content_length():
    import http.server
    import threading

    from galr.bench.serve import _Connection

    class Echo(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive

        def do_POST(self):  # noqa: N802 - the handler API's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            answer = b"seen:" + body * 3000  # long enough to arrive in several reads
            self.send_response(200 if body != b"bad" else 503)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        connection = _Connection(server.server_address[1], timeout=5)
        first_socket = None
        for body in (b"one", b"two", b"bad"):
            status, answer = connection.post("/x", body)
            assert answer == b"seen:" + body * 3000 and status == (503 if body == b"bad" else 200)
            first_socket = first_socket or connection._socket
            assert connection._socket is first_socket  # one connection for all three
        connection.close()
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(OSError):
        _Connection(server.server_address[1], timeout=1).post("/x", b"gone")


def test_the_serve_benchmark_never_sends_a_query_twice():
    from galr.bench.serve import QueryPool

    # The service remembers recent queries' tokens: a repeated query would flatter the run sending it.
    pool = QueryPool([f"q{n}" for n in range(10)])
    first, second = pool.take(4), pool.take(4)
    assert first == ["q0", "q1", "q2", "q3"] and second == ["q4", "q5", "q6", "q7"]
    with pytest.raises(ValueError, match="used up"):
        pool.take(3)
