"""Render ``BENCHMARKS.md`` from a ``galr-bench`` result document (JSON in, Markdown out, no measuring).

Every figure in the Markdown comes from the JSON; sections that did not run show their reason.
Latency cells read ``median [min-max]`` over the repeated runs; speed-ups are against PyTorch eager
of the same run (``x2.0`` = twice as fast as eager).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

from galr.bench.harness import STATUS_OK

Row = Sequence[str]


def _table(header: Row, rows: Iterable[Row]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _number(value: float | None, digits: int = 3) -> str:
    """A number with ``digits`` significant digits (thousands kept whole), or a dash."""
    if value is None:
        return "-"
    if abs(value) >= 10 ** digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _spread(spread: Mapping[str, float] | None, scale: float = 1.0) -> str:
    if not spread:
        return "-"
    return (f"{_number(spread['median'] * scale)} [{_number(spread['min'] * scale)}-"
            f"{_number(spread['max'] * scale)}]")


def _speedup(value: float | None) -> str:
    return "-" if value is None else f"x{value:.2f}"


def _not_run(section: Mapping[str, Any]) -> str:
    return f"_Not run: {section.get('reason', 'unknown reason')}._"


def _mib(value: float | None) -> str:
    return "-" if value is None else _number(value / 2**20)


# ---------------------------------------------------------------------------------------------


def _machine(results: Mapping[str, Any]) -> str:
    machine = results["machine"]
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items() if version)
    caches = ", ".join(f"{level} {size}" for level, size in machine.get("caches", {}).items()) or "-"
    gpu = machine.get("gpu")
    rows = [
        ("CPU", machine["cpu"]),
        ("cores", f"{machine['usable_cpus']} usable ({machine['logical_cpus']} logical)"),
        ("memory", f"{machine['memory_gib']} GiB"),
        ("caches (per cpu0)", caches),
        ("OS / Python", f"{machine['os']} / {machine['python']}"),
        ("versions", versions),
        ("threads", f"{machine['threads']} (torch intra-op, ONNX Runtime intra-op); numpy BLAS: "
                    f"{results['settings'].get('blas_threads', '-')}"),
        ("GPU", gpu["name"] if gpu else "none"),
        ("TensorRT", machine.get("tensorrt") or "not installed"),
        ("load average (1/5/15 min) at start / end",
         f"{machine.get('load_average_start')} / {machine.get('load_average_end')}"),
    ]
    text = _table(("", ""), rows)
    if results.get("note"):
        text += f"\n\nNote from the person who ran it: {results['note']}"
    start = machine.get("load_average_start") or [0.0]
    if start[0] > (machine.get("usable_cpus") or 1):
        text += (f"\n\n**The machine was shared during this run** (1-minute load {start[0]} on "
                 f"{machine['usable_cpus']} cores at the start): other processes competed for the cores, so "
                 "absolute times are pessimistic and the spread is wide; the ratios are measured interleaved "
                 "(see Method) and are the figures to compare.")
    return text


def _commands(results: Mapping[str, Any]) -> str:
    commands = [results["command"]]
    if results.get("markdown_command"):
        commands.append(results["markdown_command"])
    return "```bash\n" + "\n".join(commands) + "\n```"


def _backend_status(section: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {entry["name"]: entry for entry in section.get("backends", [])}


def _encoders(section: Mapping[str, Any]) -> str:
    if section.get("status") != STATUS_OK:
        return _not_run(section)
    settings = section["settings"]
    backends = _backend_status(section)
    labels = {name: entry["label"] for name, entry in backends.items()}
    config = settings["config"]
    parts = [
        f"Model: GaLR with embed {config['embed_dim']}, image {config['image_size']} px, GRU hidden "
        f"{config['gru_hidden']}, {section['model']}. Text: {settings['text_length']} tokens. End to end: "
        f"{section['e2e']}. Setup (export, INT8 calibration, bundle): {section['setup_seconds']} s.",
        "ONNX Runtime INT8 runs the global, local and fusion graphs as Q/DQ INT8 (TensorRT's set); that set keeps the "
        "text graph in FP32 (no Q/DQ tool quantises GRU internals, see `calibration/int8/`), so its text and "
        "end-to-end rows run the FP32 text graph. ONNX Runtime INT8-CPU is the `int8-cpu` set made for the CPU "
        "provider (`calibration/int8/cpu.py`): the global graph as u8/s8 QDQ fused into integer kernels, the GRU as a "
        "loop over INT8 weights (MatMulNBits), local and fusion in FP32; `galr-run` picks it on the CPU by itself. "
        "\"vs ORT FP32\" is each row against the ONNX Runtime FP32 row of the same run.",
    ]
    rows = section["rows"]
    encoders = list(dict.fromkeys(row["encoder"] for row in rows))
    latency_rows = []
    for encoder in encoders:
        for name, entry in backends.items():
            if entry["status"] != STATUS_OK:
                latency_rows.append((encoder, labels[name], f"not run: {entry['reason']}", "", "", "", ""))
                continue
            row = next(r for r in rows if r["encoder"] == encoder and r["backend"] == name and r["batch"] == 1)
            latency = row["latency_ms"]
            latency_rows.append((encoder, labels[name], _spread(latency["p50"]), _spread(latency["p95"]),
                                 _spread(latency["p99"]), f"{latency['runs']} x {latency['calls_per_run']}",
                                 _speedup(row["speedup_vs_eager"]), _speedup(row.get("speedup_vs_onnxruntime_fp32"))))
    parts.append("**Latency at batch 1** (ms per call; median [min-max] over runs):")
    parts.append(_table(("encoder", "backend", "p50", "p95", "p99", "runs x calls", "speed-up vs eager (p50)",
                         "vs ORT FP32 (p50)"), latency_rows))
    batches = settings["batch_sizes"]
    throughput_rows = []
    for encoder in encoders:
        for name, entry in backends.items():
            if entry["status"] != STATUS_OK:
                throughput_rows.append((encoder, labels[name], *[f"not run: {entry['reason']}"] + [""] * (len(batches) - 1)))
                continue
            cells = []
            for batch in batches:
                row = next(r for r in rows if r["encoder"] == encoder and r["backend"] == name and r["batch"] == batch)
                versus = row.get("speedup_vs_onnxruntime_fp32")
                cells.append(f"{_spread(row['items_per_s'])} ({_speedup(row['speedup_vs_eager'])}"
                             + (f"; {_speedup(versus)} vs ORT FP32)" if versus is not None else ")"))
            throughput_rows.append((encoder, labels[name], *cells))
    parts.append("**Throughput** (items/s; median [min-max] over runs; speed-up vs eager, and vs ONNX Runtime FP32, "
                 "of the same batch):")
    parts.append(_table(("encoder", "backend", *[f"batch {b}" for b in batches]), throughput_rows))
    parts.extend(_query_profile(section, labels))
    return "\n\n".join(parts)


def _query_profile(section: Mapping[str, Any], labels: Mapping[str, str]) -> list[str]:
    """The per-stage table of one end-to-end query and the galr-run startup times (when measured)."""
    parts = []
    profiles = section.get("query_profile") or []
    if profiles:
        stages = ("tokenise", "text encoder", "search", "other", "total")
        rows = [(labels.get(p["backend"], p["backend"]), *[_number(p["ms"].get(s)) for s in stages],
                 str(p["calls"])) for p in profiles]
        parts.append("**One end-to-end query by stage** (batch 1; ms, median over the calls; `other` = the whole "
                     "`search_text` call minus its three stages):")
        parts.append(_table(("backend", *stages, "calls"), rows))
    startup = section.get("startup") or []
    if startup:
        rows = []
        for entry in startup:
            if entry.get("status") != STATUS_OK:
                rows.append((entry["precision"], f"failed: {entry.get('reason', '?')}", "", ""))
                continue
            rows.append((entry["precision"], _number(entry["median_s"]),
                         ", ".join(_number(s) for s in entry["seconds"]), entry.get("info", "")))
        parts.append("**`galr-run` startup** (one whole process answering one query from the benchmark bundle and a "
                     "saved copy of the end-to-end gallery, `--no-rerank`; seconds):")
        parts.append(_table(("--precision", "median s", "every run", "what ran"), rows))
    return parts


def _gallery(section: Mapping[str, Any]) -> str:
    if section.get("status") != STATUS_OK:
        return _not_run(section)
    settings = section["settings"]
    build_rows = []
    for row in section["build"]:
        if row.get("status") != STATUS_OK:
            build_rows.append((row["backend"], f"not run: {row['reason']}", "", ""))
            continue
        build_rows.append((row["backend"], row["images"], row["batch"], _spread(row["images_per_s"])))
    search_rows = []
    for row in section["search"]:
        if row.get("status") != STATUS_OK:
            search_rows.append((f"{row['size']:,}", row["storage"], f"not run: {row['reason']}", *[""] * 7))
            continue
        latency, memory = row["latency_ms_one_query"], row["memory"]
        search_rows.append((
            f"{row['size']:,}", row["storage"], _number(row["insert_per_s"]), _spread(latency["p50"]),
            _number(latency["p95"]["median"]), _number(latency["p99"]["median"]), _spread(row["queries_per_s_batched"]),
            memory["embedding_bytes_per_image"], _number(memory["resident_bytes_per_image"]),
            _number(memory["peak_bytes_per_image"]),
        ))
    return "\n\n".join([
        f"**Index build** with the real encoder (`build_index` over {settings['build_images']} synthetic PNGs: decode, "
        "preprocess, the three image graphs, insert; no detection files, so DREA uses its all-zero fallback):",
        _table(("backend", "images", "batch", "images/s"), build_rows),
        _ray_indexing(section.get("ray")),
        f"**Search** over random unit embeddings (exact top-{settings['top_k']}, one process per row so memory is "
        f"its own; filled in blocks of {settings['block_rows']:,} with `GalleryIndex.add`):",
        _table(("images", "storage", "insert/s", "1 query p50 ms", "p95", "p99",
                f"queries/s (batches of {settings['query_batch']})", "embedding B/image", "resident B/image",
                "peak B/image"), search_rows),
        "Resident B/image: the process's resident-set growth after filling (embeddings, records, id map, and "
        "freed temporaries the allocator keeps) divided by the images; most meaningful at the largest size. "
        "Peak B/image: the growth of its peak, which includes the buffer copies made when the index grows and "
        "`add`'s validation temporaries (a float32 square of each block); 0 means the fill stayed below the "
        "peak the process had already reached while importing. fp16 rows are scanned by FAISS's fp16 scalar-"
        "quantiser loop where FAISS is installed (it was in this run: the `faiss` extra), by numpy blocks "
        "otherwise.",
    ])


def _ray_indexing(ray: Mapping[str, Any] | None) -> str:
    if not ray:
        return "**Ray Data indexing**: not measured in this run (older result file)."
    if ray.get("status") != STATUS_OK:
        return f"**Ray Data indexing**: {_not_run(ray)}"
    share = ray["ray_images_per_s_per_cpu"] / ray["single_images_per_s_per_cpu"]
    share_start = ray["ray_with_start_images_per_s_per_cpu"] / ray["single_images_per_s_per_cpu"]
    return (f"**Ray Data indexing** (`galr-index --ray`: {ray['cpus']} encoder actors of 1 CPU on a local Ray, "
            f"against one process with {ray['cpus']} ONNX Runtime threads; FP32, {ray['images']} synthetic PNGs, "
            f"engine loading included on both sides, one run each): one process "
            f"{_number(ray['single_images_per_s_per_cpu'])} images/s per CPU ({_number(ray['single_s'])} s); Ray "
            f"{_number(ray['ray_images_per_s_per_cpu'])} images/s per CPU ({_number(ray['ray_s'])} s), "
            f"**{100 * share:.0f} %** of one process; with Ray's own start-up ({_number(ray['ray_start_s'])} s) "
            f"{_number(ray['ray_with_start_images_per_s_per_cpu'])} ({100 * share_start:.0f} %). Largest difference "
            f"between the two indexes' embeddings: {ray['max_abs_difference']:.2g}.")


def _bounds(section: Mapping[str, Any]) -> str:
    if section.get("status") != STATUS_OK:
        return _not_run(section)
    queries = section["queries"]
    ok = [row for row in queries if row.get("status") == STATUS_OK]
    query_rows = [(f"{row['queries']:,}", f"{row['text_bank']:,}", _number(row.get("peak_mb")),
                   _number(row["peak_mb"] / ok[0]["peak_mb"]) if row in ok and ok else "", _number(row["seconds"]))
                  if row.get("status") == STATUS_OK else (f"{row['queries']:,}", "", f"not run: {row['reason']}", "", "")
                  for row in queries]
    tiff, pngs = section["tiff"], section["pngs"]
    parts = [
        "Each case runs in a fresh process; peak = its resident high-water mark (VmHWM), interpreter, numpy and "
        "ONNX Runtime included.",
        f"**Many queries**: `galr-run` with MR over N queries, a gallery of {section['settings']['gallery']:,} and a "
        "text bank (MR's reverse-search bank). The retriever answers in blocks whose bank scores stay under "
        "64 MiB, so the peak must not grow with N:",
        _table(("queries", "text bank", "peak MiB", "x the first row", "seconds"), query_rows),
    ]
    if tiff.get("status") == STATUS_OK:
        parts.append(
            f"**A TIFF bomb**: {tiff['side']}x{tiff['side']}, {tiff['bands']} bands of 16 bits: {_number(tiff['file_mb'])} "
            f"MiB on disk, {_number(tiff['decoded_mb'])} MiB decoded. `load_image` peak {_number(tiff['peak_mb'])} MiB; "
            f"outcome: {tiff['outcome']}")
    else:
        parts.append(f"**A TIFF bomb**: {_not_run(tiff)}")
    if pngs.get("status") == STATUS_OK:
        extra = pngs["peak_mb"] - pngs["model_peak_mb"]
        parts.append(
            f"**Large images in one batch**: {pngs['count']} PNGs of {pngs['side']}x{pngs['side']} "
            f"({_number(pngs['decoded_mb_each'])} MiB each decoded) through `encode_images` at once: peak "
            f"{_number(pngs['peak_mb'])} MiB against {_number(pngs['model_peak_mb'])} MiB for the model alone, i.e. "
            f"{_number(extra)} MiB above it: about one decoded image (the bound), not {pngs['count']}.")
    else:
        parts.append(f"**Large images in one batch**: not run: {pngs.get('error') or pngs.get('reason')}")
    return "\n\n".join(parts)


def _rerank(section: Mapping[str, Any]) -> str:
    if section.get("status") != STATUS_OK:
        return _not_run(section)
    rows = [(f"{row['size']} ({row['images']}x{row['captions']})", row["direction"], row["queries"],
             _spread(row["reference_runs_s"]) if "reference_runs_s" in row else _number(row["reference_s"]),
             _spread(row["batched_s"], 1e3), f"x{row['speedup']:.0f}",
             _number(row["max_abs_diff"]), "yes" if row["identical"] else "no")
            for row in section["rows"]]
    verdict = ("All outputs equal the original's within {tol:g}." if all(r["equal"] for r in section["rows"])
               else "**Some outputs differ from the original beyond {tol:g}.**").format(tol=section["tolerance"])
    parts = [
        "The batched `galr.retrieval.rerank` against the loop transcription of the original "
        "(`bench/mr_reference.py`), on synthetic similarity matrices of the test sets' sizes. Both are timed over "
        "repeated runs (median [min-max]); speed-ups are median over median.",
        _table(("size", "direction", "queries", "original loop s", "batched ms", "speed-up",
                "max abs diff", "bit-identical"), rows),
        verdict,
    ]
    # The goal is the whole MR step per size (below); per direction, say why i2t gains less.
    t2i = {row["size"]: row["speedup"] for row in section["rows"] if row["direction"] == "t2i"}
    slower_i2t = [row for row in section["rows"] if row["direction"] == "i2t" and row["speedup"] < t2i.get(row["size"], 0)]
    if slower_i2t:
        loops = ", ".join(f"{_number(row['reference_s'])} s at {row['images']}x{row['captions']}" for row in slower_i2t)
        parts.append(
            "Why i2t is the hard direction: the original's loop costs queries x K x column length, and with the "
            f"images as the queries a column holds only as many values as there are images, so its loop is short "
            f"({loops}). The batched version's time is mostly whole passes over the matrix (the pairwise column "
            "sums, the scan for candidates, the dense float32 output) and sorting the candidates, which shrink "
            "far less with the query count."
        )
    steps = section.get("steps") or []
    if steps:
        parts += [
            "The whole MR step per size, both directions one after the other as the authors' evaluation runs "
            "them (sums of the rows above):",
            _table(("size", "original loop s", "batched ms", "speed-up", "goal met"),
                   [(f"{step['size']} ({step['images']}x{step['captions']})", _number(step["reference_s"]),
                     _number(step["batched_ms"]), f"x{step['speedup']:.0f}",
                     "yes" if step["goal_met"] else f"**no** (goal x{step['speedup_goal']:.0f})")
                    for step in steps]),
        ]
    return "\n\n".join(parts)


_METRIC_COLUMNS = (("mean_recall", "mR"), ("i2t_r1", "i2t R@1"), ("i2t_r5", "R@5"), ("i2t_r10", "R@10"),
                   ("t2i_r1", "t2i R@1"), ("t2i_r5", "R@5"), ("t2i_r10", "R@10"))


def _accuracy(section: Mapping[str, Any]) -> str:
    if section.get("status") != STATUS_OK:
        return _not_run(section)
    rows = []
    for row in section["rows"]:
        if row.get("status") != STATUS_OK:
            rows.append((row["model"], "", f"not run: {row['reason']}", *[""] * (len(_METRIC_COLUMNS) - 1)))
            continue
        for label, metrics in (("no", row["metrics"]), ("yes", row.get("metrics_rerank"))):
            if metrics:
                rows.append((row["model"], label, *[f"{metrics[key]:.2f}" for key, _ in _METRIC_COLUMNS]))
    parts = [
        f"Trained model `{section['checkpoint']}` on `{section['dataset']}` [{section['split']}]; ONNX rows from a "
        f"real `export_bundle` (INT8 calibrated with `{section['calibration_method']}` on the train split).",
        _table(("model", "MR", *[title for _, title in _METRIC_COLUMNS]), rows),
    ]
    drea = [(row["model"], f"{row['metrics']['mean_recall']:.2f}", f"{row['metrics_rerank']['mean_recall']:.2f}")
            for row in section.get("drea_inputs", []) if row.get("status") == STATUS_OK]
    if drea:
        parts += ["**What detections are worth** (the same model, PyTorch FP32, DREA input from each source; the "
                  "model was trained with the noisy detector's boxes):",
                  _table(("DREA input", "mR", "mR with MR"), drea)]
    return "\n\n".join(parts)


def _closeness(share: float) -> str:
    if share >= 0.95:
        return "at the limit"
    if share >= 0.7:
        return "close to the limit"
    if share >= 0.4:
        return f"within {1 / share:.1f}x of the limit"
    return f"{1 / share:.0f}x from the limit"


def _why(fraction: Mapping[str, Any], cost: Mapping[str, Any], read_rate: Mapping[str, float] | None) -> str:
    """Why an encoder's time sits where it does, from the bound and how close it is to it."""
    encoder, bound, share = fraction["encoder"], fraction["bound"], fraction["fraction_of_limit"]
    rates = (f"{_number(fraction['achieved_gbs'])} GB/s, where one matrix-vector product of the same size reads "
             f"{_number(read_rate['max']) if read_rate else '-'} GB/s")
    recurrent = cost["streamed_bytes"] > cost["weight_bytes"]
    if share >= 0.95:
        return ("nothing is left on this machine at FP32; only fewer FLOPs/bytes or lower-precision kernels "
                "(INT8, FP16 on a GPU) can go faster")
    if fraction["limit_ms_per_item"] * fraction["batch"] < 0.05:
        return (f"a call is tiny ({_number(cost['flops_per_item'] * fraction['batch'] / 1e6)} MFLOP), so per-call "
                "overhead (framework dispatch, thread hand-offs, allocations) is most of the time")
    if bound == "memory" and recurrent:
        return ("each GRU step must read the whole recurrent matrix W_hh and the steps depend on each other; the "
                f"kernel streams the weights at {rates}, so the gap is in the GRU kernel (and its per-step gate "
                "work), not the memory system; batching shares the reads")
    if bound == "memory":
        return (f"every call reads all {_mib(cost['weight_bytes'])} MiB of weights for few items, at {rates} "
                "(the weights are spread over many small layers, one kernel each); larger batches share the read")
    if encoder == "global":
        return ("the convolutions at these shapes (3-channel 7x7 stem, small late-stage maps, strided and 1x1 "
                "layers) run below the large-square-GEMM rate the limit assumes")
    if recurrent:
        return ("the GRU runs its steps one after another as [B, H] x [H, 3H] products plus gate arithmetic the FLOP "
                "count leaves out; those mid-sized products run below the square-GEMM rate")
    return ("the matrix products are small and LayerNorm/element-wise work the FLOP count leaves out takes a share")


def _gap_sentence(fraction: Mapping[str, Any], cost: Mapping[str, Any], read_rate: Mapping[str, float] | None) -> str:
    """Where the time goes for one row, from which limit binds and how far the measurement is from it."""
    share = fraction["fraction_of_limit"]
    return (f"- {fraction['encoder']} at batch {fraction['batch']} ({fraction['backend']}): "
            f"{_number(fraction['measured_ms_per_item'])} ms/item, {fraction['bound']} limit "
            f"{_number(fraction['limit_ms_per_item'])} ms/item: {share * 100:.0f}% of it, {_closeness(share)}; "
            f"{_why(fraction, cost, read_rate)}.")


def _limits(section: Mapping[str, Any]) -> str:
    if section.get("status") != STATUS_OK:
        return _not_run(section)
    peaks = section["peaks"]
    peak_rows = [
        ("float32 matmul, numpy", f"{_spread(peaks['matmul_gflops']['numpy'])} GFLOP/s"),
        ("float32 matmul, torch", f"{_spread(peaks['matmul_gflops']['torch'])} GFLOP/s"),
        ("u8 x s8 matmul, ONNX Runtime MatMulInteger", f"{_spread(peaks.get('int8_matmul_gops'))} GOP/s"),
        ("STREAM copy (torch)", f"{_spread(peaks['bandwidth_gbs']['copy'])} GB/s"),
        ("STREAM triad (torch, fused)", f"{_spread(peaks['bandwidth_gbs']['triad'])} GB/s"),
        ("copy, numpy 1 thread", f"{_spread(peaks['bandwidth_gbs']['numpy_copy_1_thread'])} GB/s"),
        (f"matrix-vector {peaks['settings']['gemv_shape'][0]}x{peaks['settings']['gemv_shape'][1]} (GRU W_hh)",
         f"{_spread(peaks['gemv_gbs'])} GB/s"),
    ]
    batches = section["batches"]
    first, last = 1, max(batches)
    reads = peaks.get("weight_read_gbs", {})
    cost_rows = []
    int8_costs = {f"{name} (int8-cpu)": (cost, f"int8-cpu:{name}")
                  for name, cost in (section.get("encoders_int8_cpu") or {}).items()}
    all_costs = {**{name: (cost, name) for name, cost in section["encoders"].items()}, **int8_costs}
    for name, (cost, read_key) in all_costs.items():
        cost_rows.append((name, _number(cost["flops_per_item"] / 1e9), _mib(cost["weight_bytes"]),
                          _mib(cost["streamed_bytes"]), _mib(cost["bytes_per_item"][str(first)]),
                          _mib(cost["bytes_per_item"][str(last)]), _number(cost["flops_per_byte"][str(first)]),
                          _number(cost["flops_per_byte"][str(last)]), _spread(reads.get(read_key))))
    parts = [
        f"Machine peaks (STREAM arrays of {_mib(peaks['stream_array_bytes'])} MiB each; median [min-max] over runs; "
        f"torch threads {peaks['torch_threads']}):",
        _table(("measurement", "rate"), peak_rows),
        f"Analytic cost per item (formulas in `bench/limits.py`; text {section['text_tokens']} tokens; end-to-end "
        f"search over {section['e2e_gallery']:,} rows), and the measured rate of reading that many bytes of weights "
        "over and over (a matrix-vector product of the same size):",
        _table(("encoder", "GFLOP/item", "weights MiB", "re-read MiB (GRU)", f"min MiB/item @{first}",
                f"min MiB/item @{last}", f"FLOP/B @{first}", f"FLOP/B @{last}", "weight-read GB/s"), cost_rows),
    ]
    fractions = section.get("fractions") or []
    if not fractions:
        parts.append("_Fractions of the limits need the encoder section of the same run; it did not run._")
        return "\n\n".join(parts)
    fraction_rows = [(f["encoder"], f["backend"], f["batch"], _number(f["measured_ms_per_item"]),
                      _number(f["limit_ms_per_item"]), f["bound"], f"{f['fraction_of_limit'] * 100:.1f}%",
                      _number(f["achieved_gflops"]), _number(f["achieved_gbs"])) for f in fractions]
    parts.append("Each FP32 measurement, and each ONNX Runtime INT8-CPU one, against its limit (the larger of FLOPs / "
                 "peak matmul and weight bytes / weight-read rate + I/O bytes / STREAM; INT8-CPU rows count one byte per "
                 "INT8 weight and use the u8 x s8 peak; see `bench/limits.py`):")
    parts.append(_table(("encoder", "backend", "batch", "measured ms/item", "limit ms/item", "bound", "of limit",
                         "GFLOP/s", "GB/s"), fraction_rows))
    best: dict[tuple[str, int], Mapping[str, Any]] = {}
    for fraction in fractions:
        if fraction["backend"] == "onnxruntime-int8-cpu":  # its costs differ from the FP32 table's
            continue
        key = (fraction["encoder"], fraction["batch"])
        if key not in best or fraction["fraction_of_limit"] > best[key]["fraction_of_limit"]:
            best[key] = fraction
    chosen = [f for (_, batch), f in best.items() if batch in (first, last)]
    parts.append("**Where the gap is** (best FP32 backend per encoder, at batch 1 and the largest batch):")
    parts.append("\n".join(_gap_sentence(f, section["encoders"][f["encoder"]], reads.get(f["encoder"]))
                           for f in chosen))
    return "\n\n".join(parts)


def _headlines(results: Mapping[str, Any]) -> str:
    lines = []
    encoders = results["sections"]["encoders"]
    if encoders.get("status") == STATUS_OK:
        for row in encoders["rows"]:
            if row["encoder"] == "end-to-end" and row["batch"] == 1 and row["backend"] != "pytorch-eager":
                lines.append(f"- End-to-end query latency (p50, batch 1), {row['backend']}: "
                             f"{_number(row['latency_ms']['p50']['median'])} ms "
                             f"({_speedup(row['speedup_vs_eager'])} vs eager).")
    rerank = results["sections"]["rerank"]
    if rerank.get("status") == STATUS_OK:
        for row in rerank["rows"]:
            lines.append(f"- MR {row['direction']} {row['images']}x{row['captions']}: x{row['speedup']:.0f} faster than "
                         f"the original, outputs {'equal' if row['equal'] else 'DIFFERENT'} "
                         f"(max abs diff {_number(row['max_abs_diff'])}).")
        for step in rerank.get("steps") or []:
            lines.append(f"- MR step (both directions) {step['images']}x{step['captions']}: x{step['speedup']:.0f} "
                         f"faster than the original ({'meets' if step['goal_met'] else 'misses'} the "
                         f"x{step['speedup_goal']:.0f} goal).")
    gallery = results["sections"]["gallery"]
    if gallery.get("status") == STATUS_OK:
        for row in gallery["search"]:
            if row.get("status") == STATUS_OK and row["size"] == max(r["size"] for r in gallery["search"]):
                lines.append(f"- Search over {row['size']:,} {row['storage']} embeddings: "
                             f"{_number(row['latency_ms_one_query']['p50']['median'])} ms per query (p50).")
    return "\n".join(lines) or "_No section ran._"


_METHOD = """\
- Every figure is measured in one run of `galr-bench`; ratios compare rows of that run only.
- Each case is warmed up, then timed in repeated runs of several calls; the backends of one encoder and batch
  are measured interleaved (run 1 of each, then run 2 of each, ...), so load changes hit them alike.
  Latency cells: p50/p95/p99 per run, shown as median [min-max] over runs. Throughput: items/s per run, same.
- PyTorch eager is the reference implementation (FP32, CPU, `torch.no_grad`). Speed-ups: eager p50 / backend p50
  at batch 1, backend items/s / eager items/s at larger batches.
- TensorRT rows run only where TensorRT and a GPU exist (engines are built into the benchmark bundle and served
  through `load_engine(..., backend="tensorrt")`); elsewhere they are marked not run, never estimated.
- The model has random weights (speed does not depend on them); accuracy uses the trained demo model."""


def _serve(section: Mapping[str, Any]) -> str:
    if section.get("status") != STATUS_OK:
        return _not_run(section)
    settings = section["settings"]
    reference = section["reference_queries_per_s"]
    rows = [(row["clients"], row["requests"], _number(row["queries_per_s"]),
             f"{100 * row['queries_per_s'] / reference:.0f} %" if row["queries_per_s"] else "-", _runs(row, reference),
             _number(row["p50_ms"]), _number(row["p95_ms"]), _number(row["p99_ms"]),
             _number(row["p99_over_p50"]), _number(row["mean_batch"]), row["errors"])
            for row in section["rows"]]
    parts = [_serve_intro(settings, reference, section.get("reference_before_after")), _table(
        ("clients", "requests", "queries/s", "of the encoder alone", "every run: of the encoder alone", "p50 ms",
         "p95 ms", "p99 ms", "p99/p50", "mean batch", "errors"), rows)]
    spinning = section.get("spinning") or {}
    if spinning.get("status") == STATUS_OK:
        parts.append(_spinning(spinning["rows"], section["rows"], reference))
    elif spinning:
        parts.append(f"ONNX Runtime spinning: {_not_run(spinning)}")
    ray = section.get("ray") or {}
    if ray.get("status") == STATUS_OK:
        row = ray["row"]
        alone = next((r for r in section["rows"] if r["clients"] == row["clients"]), None)
        ratio = (f" = **x{row['queries_per_s'] / alone['queries_per_s']:.2f}** of galr-serve alone"
                 if alone and alone["queries_per_s"] and row["queries_per_s"] else "")
        parts.append(f"**Ray Serve** (`galr-serve --ray`, {ray['replicas']} replicas on this one 2-core machine, "
                     f"Ray's proxy and `@serve.batch`): {row['clients']} clients, {_number(row['queries_per_s'])} "
                     f"queries/s{ratio}, p50 {_number(row['p50_ms'])} ms, p99 {_number(row['p99_ms'])} ms, "
                     f"{row['errors']} errors. On one machine the replicas share the same two cores and Ray adds "
                     "its proxy hop; Ray is for more machines, not for more speed on one.")
    elif ray:
        parts.append(f"Ray Serve: {_not_run(ray)}")
    soak = section.get("soak") or {}
    if soak.get("status") == STATUS_OK:
        slope = soak["slope_mib_per_min"]
        parts.append(
            f"**Soak** ({_number(soak['minutes'])} minutes, {soak['clients']} clients searching back to back): "
            f"{soak['requests']:,} requests, {soak['errors']} errors, {_number(soak['queries_per_s'])} queries/s, "
            f"p50 {_number(soak['p50_ms'])} ms, p99 {_number(soak['p99_ms'])} ms. Server resident memory: "
            f"{_mib(soak['rss_start_bytes'])} MiB at the start, {_mib(soak['rss_after_warmup_bytes'])} after the "
            f"first minute, {_mib(soak['rss_end_bytes'])} at the end (max {_mib(soak['rss_max_bytes'])}); fitted "
            f"slope after warm-up {_number(slope)} MiB/min.")
    elif soak:
        parts.append(f"Soak: {_not_run(soak)}")
    return "\n\n".join(parts)


def _runs(row: Mapping[str, Any], reference: float) -> str:
    """Each repeated run's share of the encoder alone (the table shows the median run)."""
    runs = row.get("runs_queries_per_s") or [row["queries_per_s"]]
    return " / ".join(f"{100 * value / reference:.0f} %" if value else "-" for value in runs)


def _spinning(rows: list[Mapping[str, Any]], default_rows: list[Mapping[str, Any]], reference: float) -> str:
    """The ``--spin`` runs beside the same client counts of the table (galr-serve's default, not spinning)."""
    default = {row["clients"]: row for row in default_rows}

    def cells(row: Mapping[str, Any] | None) -> tuple[str, str, str]:
        if row is None or not row["queries_per_s"]:
            return "-", "-", "-"
        return (_number(row["queries_per_s"]), f"{100 * row['queries_per_s'] / reference:.0f} %",
                _number(row["p50_ms"]))

    table = _table(("clients", "not spinning: queries/s", "of the encoder alone", "p50 ms", "spinning: queries/s",
                    "of the encoder alone", "p50 ms", "errors (spinning)"),
                   [(row["clients"], *cells(default.get(row["clients"])), *cells(row), row["errors"]) for row in rows])
    return ("**ONNX Runtime's threads spinning** after their work (`galr-serve --spin`, ONNX Runtime's own default) "
            "against galr-serve's default (`--no-spin`, the table above), run right after it:\n\n" + table)


def _serve_intro(settings: Mapping[str, Any], reference: float, before_after: list[float] | None) -> str:
    when = (f"the mean of {_number(before_after[0])} before the server started and {_number(before_after[1])} "
            "after it stopped" if before_after else "same process, before the server started")
    return "".join([
        "`galr-serve` on 127.0.0.1 (its defaults; ONNX Runtime FP32, the benchmark model) over "
        f"{settings['gallery']:,} "
        f"embeddings (exact search, MR {'on' if settings['rerank'] else 'off'}, top 10); each client sends "
        f"{settings['requests_per_client']} one-query searches in turn on a kept-alive connection, never a query "
        f"sent before; each step runs {settings.get('repeats', 1)} times in a row and the table shows the run of "
        "median throughput. Reference: "
        f"the text encoder alone at batch {settings['reference_batch']}, {_number(reference)} queries/s "
        f"({when}). Client and server share the machine's cores.",
    ])


def _geo(section: Mapping[str, Any]) -> str:
    if section.get("status") != STATUS_OK:
        return _not_run(section)
    settings, throughput, located, filtered = (section["settings"], section["throughput"], section["locate"],
                                               section["filter"])
    memory_rows = [(f"{row['side']:,} x {row['side']:,}", _mib(row["index_peak_bytes"]), _number(row["index_s"]),
                    _mib(row["locate_peak_bytes"]), _number(row["locate_s"])) for row in section["memory"]]
    peaks = [row["index_peak_bytes"] for row in section["memory"] if row["index_peak_bytes"]]
    spread = f" (largest / smallest index peak: x{max(peaks) / min(peaks):.2f})" if len(peaks) > 1 else ""
    scales = ", ".join(map(str, settings["memory_locate_scales"]))
    return "\n\n".join([
        "Synthetic UTM scenes (`galr-synth --geo-scenes`), the benchmark's random-weight model on ONNX Runtime "
        "FP32 (CPU).",
        f"**Indexing throughput** ({throughput['tiles']} tiles of {settings['tile']} px from a "
        f"{settings['throughput_side']:,} px scene, batch {settings['batch']}, best of two): scene indexing "
        f"{_number(throughput['indexing_tiles_per_s'])} tiles/s, the encoder alone on the same tiles already in "
        f"memory {_number(throughput['encoder_tiles_per_s'])} tiles/s: **{100 * throughput['share']:.0f} %** "
        "(goal: at least 90 %).",
        f"**Peak memory against scene size** (fresh processes; `galr-index --tile {settings['tile']}`, "
        f"`galr-locate --scales {scales} --cell 32`){spread}:",
        _table(("scene", "galr-index peak MiB", "s", "galr-locate peak MiB", "s"), memory_rows),
        f"**galr-locate on a {settings['locate_side']:,} px scene** (scales "
        f"{', '.join(map(str, settings['locate_scales']))}; {located['windows']:,} windows): first query "
        f"{_number(located['first_query_s'])} s (window embeddings at {_number(located['windows_per_s'])} windows/s, "
        f"then the map), each further query {_number(1e3 * located['further_query_s_p50'])} ms p50 "
        "(embeddings from the cache, one matrix-vector product and the map).",
        f"**Place and date filter** over {filtered['records']:,} tiles with footprints and dates (bbox and --since "
        f"matching {filtered['matching']:,}): exact top-10 at batch 1 {_number(filtered['filtered_search_ms_p50'])} "
        f"ms p50 with the filter applied inside the scan, {_number(filtered['search_ms_p50'])} ms without; the "
        f"place arrays are built once per index edit ({_number(filtered['places_build_s'])} s).",
    ])


def _detector(section: Mapping[str, Any]) -> str:
    if section.get("status") != STATUS_OK:
        return _not_run(section)
    settings, indexing = section["settings"], section["indexing"]
    cpu = section["backends"]["onnxruntime-cpu"]
    share = indexing["with_ms"] / indexing["explained_ms"]
    return "\n\n".join([
        f"A stand-in for YOLO11n-OBB (no real weights can be downloaded here): a YOLO-like convolution stack "
        f"with random weights, {_number(section['gflops'])} GFLOPs per {settings['imgsz']} px input (YOLO11n-OBB: "
        f"17.2), exported with Ultralytics' input, output and metadata; {_number(section['boxes_per_image'])} boxes "
        "per image pass the confidence threshold.",
        _table(("backend", "256 px image ms", "1024 px tile ms"),
               [("ONNX Runtime CPU", _number(cpu["image_256_ms"]), _number(cpu["tile_1024_ms"])),
                ("TensorRT", section["backends"]["tensorrt"], "")]),
        f"**Indexing** {indexing['images']} images of 256 px (the benchmark model, ONNX Runtime FP32): "
        f"{_number(indexing['images_per_s_without'])} images/s without a detector, "
        f"{_number(indexing['images_per_s_with'])} with it. With the detector a batch took "
        f"{_number(indexing['with_ms'])} ms against {_number(indexing['explained_ms'])} ms for encoding without it "
        f"plus the detector alone on the same images (x{share:.2f}): "
        + ("detection adds its own time and nothing more." if share <= 1.1 else
           "more than the detector's own time explains."),
    ])


def _approximate(data: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None) -> str:
    """One part per included run (older result files hold a single run, not a list)."""
    if not data:
        return ("_Not included in this run: make it with `python -m galr.bench.approximate --gallery gallery.gidx "
                "-o bench/results/approximate.json` and pass it with `galr-bench --approximate FILE`._")
    from galr.bench.approximate import markdown

    parts = []
    for run in [data] if isinstance(data, Mapping) else data:
        command = run.get("command")
        title = f"### {run['settings']['size']:,} vectors\n\n" if not isinstance(data, Mapping) else ""
        head = f"Measured on {run.get('started', '?')} with `{command}`.\n\n" if command else ""
        parts.append(title + head + markdown(run).rstrip())
    return "\n\n".join(parts)


def _separate_run(section: Mapping[str, Any]) -> str:
    """A note for a section measured apart from the rest (its ``separate_run``: command, start, why)."""
    separate = section.get("separate_run")
    if not separate:
        return ""
    return (f"*Measured in a run of its own*, `{separate['command']}`, started {separate['started']}: "
            f"{separate['why']}.\n\n")


def render_markdown(results: Mapping[str, Any]) -> str:
    """The whole ``BENCHMARKS.md`` for a result document."""
    sections = results["sections"]
    mode_note = ("" if results["mode"] == "full" else
                 "\n\n**Quick mode**: a tiny model and small sizes, to check the benchmark runs (CI). "
                 "Do not read these numbers as performance.")
    render: list[tuple[str, Callable[[Mapping[str, Any]], str]]] = [
        ("1. Encoders: latency and throughput per backend and precision", _encoders),
        ("2. Gallery: index build, search and memory", _gallery),
        ("3. MR rerank: batched vs the original algorithm", _rerank),
        ("4. Accuracy on the synthetic benchmark", _accuracy),
        ("5. Limits: how close to what the hardware allows", _limits),
        ("6. Memory bounds: many queries, large and hostile images", _bounds),
        ("8. Serving: galr-serve under concurrent clients", _serve),
        ("9. Scenes: tiling, memory, semantic localisation, place filters", _geo),
        ("10. Detector: latency and what it costs an index build", _detector),
    ]
    names = ("encoders", "gallery", "rerank", "accuracy", "limits", "bounds", "serve", "geo", "detector")
    body = [f"## {title}\n\n{_separate_run(sections[name])}{renderer(sections[name])}"
            for (title, renderer), name in zip(render, names, strict=True)]
    body.insert(6, f"## 7. Approximate search at scale\n\n{_approximate(results.get('approximate'))}")
    return "\n\n".join([
        "# Benchmarks",
        f"Generated by `galr-bench` ({results['mode']} mode) on {results['started']} in "
        f"{_number(results.get('seconds'))} s. Raw numbers: the JSON written next to this file.{mode_note}",
        "## Headlines", _headlines(results),
        "## Machine", _machine(results),
        "## Commands", _commands(results),
        "## Method", _METHOD,
        *body,
    ]) + "\n"


__all__ = ["render_markdown"]
