"""Approximate search at scale: recall@10 against exact search, latency and memory, on realistic vectors.

    python -m galr.bench.approximate --gallery gallery.gidx --size 1000000 --markdown approx.md

Benchmark vectors must be as hard to search as real gallery embeddings, so they are generated from
a real index (``--gallery``, e.g. the demo's ``gallery.gidx``):

* **Fit.** Each generated vector is a real embedding (an *anchor*, drawn at random) plus Gaussian
  noise shaped like the real embeddings' spread (their principal axes and variances), times a scale
  ``sigma``, normalised. ``sigma`` is chosen so that, at the real gallery's own size, the generated
  vectors' nearest-neighbour structure matches the real one's: the median gap between the top-1 and
  the top-10 similarity of held-out queries. Both distributions are reported side by side.
* **A harder control.** Anchored noise copies the real gallery's clusters; a real archive of 10^6
  tiles is more varied than the 2,150 images it is fitted to, and its neighbourhoods less tidy. So
  every run also measures ``gaussian`` vectors: one Gaussian with the real embeddings' mean and
  spread, no clusters at all (neighbours barely stand out: the hard end). Real archives lie between.
* **Generation.** Vectors are made in blocks, each from its own seed (``seed``, block number), so
  no run holds all of them: ground truth is exact blockwise search over the regenerated blocks.
  Queries come from the same generator under another seed (they are not gallery members).
* **Size of the vectors.** ``--dim`` larger than the real gallery's (the demo model embeds in 256
  dimensions, the full-size GaLR in 512) lifts every generated vector by one fixed random isometry
  into ``dim`` dimensions: every inner product, so the neighbour structure, is unchanged, while
  memory and search cost are those of ``dim``.

Each searcher is built through the :class:`~galr.runtime.index.searchers.Searcher` seam as
``galr-index`` builds it, saved as the ``.gidx`` members it writes, and opened again in a fresh
process the way ``galr-run`` opens an index (``ivfpq``'s exact re-rank rows memory-mapped, so they
stay on disk). That process times batch-1 queries for a grid of search settings (``nprobe`` or
``ef``; for ``ivfpq`` also the re-rank depth, ``0`` = PQ scores only). Reported: build seconds,
bytes per vector (FAISS structure, and the exact rows on disk), the build's resident-memory growth,
the searching process's resident memory once opened and after all its queries, p50/p95 latency and
recall@10. For 10^7 vectors:

    python -m galr.bench.approximate --gallery gallery.gidx --size 10000000 --dim 512 --kinds ivfpq \
        --reranks 0,10,20,50 --work-dir /var/tmp/approx -o approx-10m.json --markdown approx-10m.md
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from galr.bench.harness import peak_bytes, resident_bytes, resident_parts
from galr.clock import utc_now

BLOCK_ROWS = 65536


@dataclass(frozen=True)
class ApproximateSettings:
    """What one run measures (see the module docstring)."""

    size: int = 1_000_000
    queries: int = 300
    top_k: int = 10
    seed: int = 0
    kinds: tuple[str, ...] = ("ivf", "hnsw")
    nprobes: tuple[int, ...] = (8, 16, 32, 64)
    efs: tuple[int, ...] = (32, 64, 128, 256)
    sigmas: tuple[float, ...] = tuple(np.round(np.linspace(0.1, 1.6, 16), 2))
    hnsw_M: int = 32
    dim: int | None = None  # None: the real gallery's
    reranks: tuple[int, ...] = (0, 10)  # ivfpq: exact re-rank depths searched (0 = PQ scores only)
    pq_m: int | None = None  # ivfpq sub-quantisers (None: the searcher's default, D / 8)
    models: tuple[str, ...] = ("anchored", "gaussian")
    rerank_storage: str = "fp16"  # ivfpq: the exact rows kept for re-ranking (on disk once saved)
    extra: dict[str, Any] = field(default_factory=dict)


class AnchoredGenerator:
    """Real embeddings plus shaped Gaussian noise (see the module docstring)."""

    def __init__(self, real: np.ndarray, sigma: float, anchored: bool = True, dim: int | None = None) -> None:
        real = np.ascontiguousarray(real, dtype=np.float32)
        centred = real - real.mean(axis=0)
        _, singular, axes = np.linalg.svd(centred, full_matrices=False)
        self.shape = (axes.T * (singular / np.sqrt(len(real)))).astype(np.float32)  # [D, r]
        self.real = real if anchored else real.mean(axis=0, keepdims=True)  # "gaussian": one anchor, the mean
        self.sigma = float(sigma)
        self.lift = None  # [real D, dim]: orthonormal rows, so inner products are kept
        if dim is not None and dim != real.shape[1]:
            if dim < real.shape[1]:
                raise ValueError(f"--dim {dim} is smaller than the gallery's {real.shape[1]}")
            basis, _ = np.linalg.qr(np.random.default_rng(4242).standard_normal((dim, real.shape[1])))
            self.lift = np.ascontiguousarray(basis.T, dtype=np.float32)
        self.dim = real.shape[1] if self.lift is None else int(dim)

    def block(self, rows: int, seed: Sequence[int]) -> np.ndarray:
        rng = np.random.default_rng(list(seed))
        anchors = self.real[rng.integers(0, len(self.real), rows)]
        noise = rng.standard_normal((rows, self.shape.shape[1]), dtype=np.float32) @ self.shape.T
        vectors = anchors + self.sigma * noise
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors if self.lift is None else vectors @ self.lift

    def blocks(self, size: int, seed: int) -> Iterator[tuple[int, np.ndarray]]:
        for number, start in enumerate(range(0, size, BLOCK_ROWS)):
            yield start, self.block(min(BLOCK_ROWS, size - start), (seed, number))


def neighbour_gaps(gallery: np.ndarray, queries: np.ndarray, k: int, exclude_self: bool) -> dict[str, np.ndarray]:
    """Top-1 similarity and the top-1 minus top-``k`` gap of each query."""
    sims = queries @ gallery.T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    top = -np.sort(-sims, axis=1)[:, :k]
    return {"top1": top[:, 0], "gap": top[:, 0] - top[:, k - 1]}


def _quantiles(values: np.ndarray) -> dict[str, float]:
    return {name: round(float(np.quantile(values, q)), 4) for name, q in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9))}


def fit_sigma(real: np.ndarray, settings: ApproximateSettings) -> tuple[AnchoredGenerator, dict[str, Any]]:
    """The generator whose vectors' neighbour gaps best match the real gallery's (median gap)."""
    k = settings.top_k
    target = neighbour_gaps(real, real, k, exclude_self=True)
    best = None
    for sigma in settings.sigmas:
        generator = AnchoredGenerator(real, sigma)
        fake = generator.block(len(real), (settings.seed, 10**6))
        probes = generator.block(min(len(real), 1000), (settings.seed, 10**6 + 1))
        gaps = neighbour_gaps(fake, probes, k, exclude_self=False)
        error = abs(float(np.median(gaps["gap"])) - float(np.median(target["gap"])))
        if best is None or error < best[0]:
            best = (error, generator, gaps)
    _, generator, gaps = best
    fit = {"sigma": generator.sigma, "real_count": len(real),
           "real": {name: _quantiles(values) for name, values in target.items()},
           "generated": {name: _quantiles(values) for name, values in gaps.items()}}
    return generator, fit


def exact_truth(generator: AnchoredGenerator, queries: np.ndarray, settings: ApproximateSettings) -> np.ndarray:
    """Exact top-k keys (row numbers) by blockwise search over the regenerated gallery."""
    from galr.runtime.index.searchers.exact import merge_top_k, top_k_block

    k = settings.top_k
    best_scores = np.zeros((len(queries), 0), np.float32)
    best_rows = np.zeros((len(queries), 0), np.int64)
    for start, block in generator.blocks(settings.size, settings.seed):
        scores, columns = top_k_block(np, queries @ block.T, k)
        best_scores, best_rows = merge_top_k(np.concatenate([best_scores, scores], axis=1),
                                             np.concatenate([best_rows, columns + start], axis=1), k)
    return best_rows


def _build_params(kind: str, settings: ApproximateSettings) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if kind in ("ivf", "ivfpq"):
        params["nlist"] = max(1, int(np.sqrt(settings.size)))  # given, so training starts early: bounded memory
    if kind == "ivfpq":
        params["rerank"] = max(settings.reranks)
        if settings.pq_m is not None:
            params["m"] = settings.pq_m
    if kind == "hnsw":
        params["M"] = settings.hnsw_M
    return params


def _build(kind: str, generator: AnchoredGenerator, settings: ApproximateSettings, log) -> tuple[Any, float]:
    from galr.runtime.index import create_searcher

    searcher = create_searcher(kind, generator.dim, settings.rerank_storage if kind == "ivfpq" else "fp32",
                               **_build_params(kind, settings))
    began = time.perf_counter()
    blocks = -(-settings.size // BLOCK_ROWS)
    for number, (start, block) in enumerate(generator.blocks(settings.size, settings.seed)):
        searcher.add(np.arange(start, start + len(block), dtype=np.int64), block)
        if blocks > 20 and (number + 1) % (blocks // 10) == 0:
            log(f"  {kind}: {start + len(block):,} of {settings.size:,} added ({time.perf_counter() - began:.0f} s)")
    searcher.search(block[:1], 1)  # finishes training where it waited
    return searcher, time.perf_counter() - began


def _search_grid(kind: str, settings: ApproximateSettings) -> list[dict[str, int]]:
    if kind == "hnsw":
        return [{"ef": ef} for ef in settings.efs]
    if kind == "ivfpq":
        return [{"nprobe": nprobe, "rerank": rerank} for rerank in settings.reranks for nprobe in settings.nprobes]
    return [{"nprobe": nprobe} for nprobe in settings.nprobes]


def _time_searches(searcher: Any, queries: np.ndarray, truth: np.ndarray, grid: Sequence[dict[str, int]],
                   k: int) -> list[dict[str, Any]]:
    rows = []
    for params in grid:
        latencies, found = [], []
        searcher.search(queries[:5], k, **params)  # warm-up
        for query in queries:
            began = time.perf_counter()
            _, keys = searcher.search(query[None, :], k, **params)
            latencies.append((time.perf_counter() - began) * 1e3)
            found.append(keys[0])
        recall = float(np.mean([len(set(f.tolist()) & set(t.tolist())) / k for f, t in zip(found, truth)]))
        rows.append({**params, "recall_at_10": round(recall, 4), "p50_ms": round(float(np.median(latencies)), 3),
                     "p95_ms": round(float(np.quantile(latencies, 0.95)), 3)})
    return rows


def _search_child(spec_path: Path) -> dict[str, Any]:
    """Open a saved searcher as ``galr-run`` would (re-rank rows mapped) and time the grid: the child's side."""
    from galr.container import ContainerReader
    from galr.errors import InputError
    from galr.runtime.index.searchers import searcher_class

    spec = json.loads(spec_path.read_text())
    began, before = time.perf_counter(), resident_bytes()
    with ContainerReader(spec["path"], error=InputError, fix="rerun the benchmark") as reader:
        searcher = searcher_class(spec["kind"]).load(reader, spec["entries"], "images/", dim=spec["dim"],
                                                     storage=spec["storage"], count=spec["count"],
                                                     params=spec["params"])
    opened_s, opened = time.perf_counter() - began, resident_bytes()
    rows = _time_searches(searcher, np.load(spec["queries"]), np.load(spec["truth"]), spec["grid"], spec["k"])
    parts = resident_parts()
    return {"open_s": round(opened_s, 1), "resident_mb_before_open": round(before / 2**20),
            "resident_mb_opened": round(opened / 2**20), "resident_mb_after_searches": round(resident_bytes() / 2**20),
            "anon_mb_after_searches": round((parts["anon"] or 0) / 2**20),
            "file_mb_after_searches": round((parts["file"] or 0) / 2**20),
            "peak_mb": round(peak_bytes() / 2**20), "search": rows}


def run(gallery: Path, settings: ApproximateSettings, log=print, work_dir: Path | None = None) -> dict[str, Any]:
    """Fit, generate, build each kind and measure it (see the module docstring)."""
    import faiss

    from galr.runtime.index import load_index

    real = load_index(gallery).image_vectors()
    anchored, fit = fit_sigma(real, settings)
    anchored = AnchoredGenerator(real, anchored.sigma, dim=settings.dim)
    log(f"fit: sigma {fit['sigma']} (median gap real {fit['real']['gap']['p50']}, "
        f"generated {fit['generated']['gap']['p50']})")
    gaussian = AnchoredGenerator(real, 1.0, anchored=False, dim=settings.dim)
    probes = gaussian.block(min(len(real), 1000), (settings.seed, 10**6 + 1))
    fit["gaussian"] = {name: _quantiles(values) for name, values in neighbour_gaps(
        gaussian.block(len(real), (settings.seed, 10**6)), probes, settings.top_k, exclude_self=False).items()}
    results: dict[str, Any] = {"settings": {**asdict(settings), "sigmas": list(settings.sigmas)}, "fit": fit,
                               "dim": anchored.dim, "real_dim": int(real.shape[1]), "faiss": faiss.__version__,
                               "threads": faiss.omp_get_max_threads(), "models": {}}
    with tempfile.TemporaryDirectory(dir=work_dir) as folder:
        for model, generator in (("anchored", anchored), ("gaussian", gaussian)):
            if model in settings.models:
                results["models"][model] = _measure_model(model, generator, settings, Path(folder), log)
    results["peak_mb"] = round(peak_bytes() / 2**20)
    return results


def _measure_model(model: str, generator: AnchoredGenerator, settings: ApproximateSettings, folder: Path,
                   log) -> dict[str, Any]:
    import gc

    from galr.container import ContainerWriter

    queries = generator.block(settings.queries, (settings.seed + 1, 0))
    began = time.perf_counter()
    truth = exact_truth(generator, queries, settings)
    log(f"{model}: exact ground truth for {settings.queries} queries over {settings.size:,} vectors: "
        f"{time.perf_counter() - began:.1f} s")
    np.save(folder / "queries.npy", queries)
    np.save(folder / "truth.npy", truth)
    kinds: dict[str, Any] = {}
    for kind in settings.kinds:
        before = resident_bytes()
        searcher, seconds = _build(kind, generator, settings, log)
        after = resident_bytes()
        part = folder / f"{model}-{kind}.gidx-part"
        began = time.perf_counter()
        with ContainerWriter(part) as writer:
            saved = searcher.save(writer, "images/")
        save_s = time.perf_counter() - began
        spec = {"path": str(part), "entries": writer.entries, "kind": kind, "dim": generator.dim,
                "storage": searcher.storage, "count": len(searcher), "params": saved, "k": settings.top_k,
                "grid": _search_grid(kind, settings), "queries": str(folder / "queries.npy"),
                "truth": str(folder / "truth.npy")}
        del searcher
        gc.collect()
        (folder / "spec.json").write_text(json.dumps(spec))
        child = subprocess.run([sys.executable, "-m", "galr.bench.approximate", "--search-child",
                                str(folder / "spec.json")], capture_output=True, text=True, check=True)
        searched = json.loads(child.stdout.strip().splitlines()[-1])
        exact_bytes = writer.entries.get("images/exact.npy", {}).get("size", 0)
        kinds[kind] = {"build_s": round(seconds, 1), "save_s": round(save_s, 1),
                       "bytes_per_vector": round(saved["faiss_bytes"] / settings.size, 1),
                       "disk_bytes_per_vector": round(exact_bytes / settings.size, 1),
                       "resident_delta_mb": round((after - before) / 2**20), "settings": saved["settings"],
                       **searched}
        part.unlink()
        log(f"{model} {kind}: built in {seconds:.1f} s, {saved['faiss_bytes'] / settings.size:.0f} B/vector in "
            f"memory, {exact_bytes / settings.size:.0f} on disk; opened in {searched['open_s']} s at "
            f"{searched['resident_mb_opened']} MB resident; " +
            "; ".join(f"{_setting(r)}: recall {r['recall_at_10']} p50 {r['p50_ms']} ms" for r in searched["search"]))
    return kinds


def _setting(row: dict[str, Any]) -> str:
    return " ".join(f"{name} {row[name]}" for name in ("nprobe", "ef", "rerank") if name in row)


def markdown(results: dict[str, Any]) -> str:
    """The results as a BENCHMARKS.md section."""
    settings, fit = results["settings"], results["fit"]
    lines = [f"{settings['size']:,} x {results['dim']} vectors fitted to a real gallery of {fit['real_count']} "
             f"embeddings (sigma {fit['sigma']}), {settings['queries']} queries at batch 1, "
             f"FAISS {results['faiss']} on {results['threads']} threads; recall@10 against exact blockwise search.",
             "", "Neighbour structure at the real gallery's size (quantiles p10 / p50 / p90):", "",
             "| vectors | top-1 similarity | top-1 minus top-10 |", "|---|---|---|"]
    for side in ("real", "generated", "gaussian"):
        top1, gap = fit[side]["top1"], fit[side]["gap"]
        lines.append(f"| {side} | {top1['p10']} / {top1['p50']} / {top1['p90']} | "
                     f"{gap['p10']} / {gap['p50']} / {gap['p90']} |")
    lifted = results.get("real_dim") not in (None, results["dim"])
    if lifted:
        lines += ["", f"The real embeddings have {results['real_dim']} dimensions; every generated vector is lifted "
                  f"into {results['dim']} by one fixed random isometry (inner products, so the table above, "
                  "unchanged; memory and search cost those of the larger size)."]
    opened = any("resident_mb_opened" in entry for kinds in results["models"].values() for entry in kinds.values())
    if opened:
        lines += ["", "Each searcher is saved as its `.gidx` members and opened again in a fresh process (exact "
                  "re-rank rows memory-mapped, so they stay on disk); that process runs the queries. *In memory*: "
                  "the FAISS structure per vector; *on disk*: the exact rows kept for re-ranking (fp16); *RSS "
                  "opened / after*: the searching process's resident memory once the searcher is open and after "
                  "all its queries, the latter split into its own memory and the mapped file pages it touched "
                  "(page cache the kernel drops under pressure; every setting's queries read different rows).", "",
                  "| vectors | searcher | build s | B/vector in memory | B/vector on disk | open s | RSS opened / "
                  "after MB | setting | recall@10 | p50 ms | p95 ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    else:
        lines += ["", "| vectors | searcher | build s | bytes/vector | resident MB | setting | recall@10 | p50 ms | "
                  "p95 ms |", "|---|---|---|---|---|---|---|---|---|"]
    for model, kinds in results["models"].items():
        for kind, entry in kinds.items():
            for row in entry["search"]:
                cells = [model, kind, entry["build_s"], entry["bytes_per_vector"]]
                if opened:
                    after = entry.get("resident_mb_after_searches", "")
                    if "anon_mb_after_searches" in entry:
                        after = f"{after} ({entry['anon_mb_after_searches']} own + {entry['file_mb_after_searches']} " \
                                "mapped)"
                    cells += [entry.get("disk_bytes_per_vector", 0), entry.get("open_s", ""),
                              f"{entry.get('resident_mb_opened', '')} / {after}"]
                else:
                    cells.append(entry["resident_delta_mb"])
                cells += [_setting(row), row["recall_at_10"], row["p50_ms"], row["p95_ms"]]
                lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    if opened:
        lines.append("")
        lines += [f"Build of {model} {kind}: {entry['build_s']} s (generation of the vectors included), the "
                  f"building process grew by {entry['resident_delta_mb']:,} MB; writing its members took "
                  f"{entry.get('save_s', '?')} s; FAISS settings {entry['settings']}."
                  for model, kinds in results["models"].items() for kind, entry in kinds.items()]
    lines.append(f"\nPeak resident memory of the run: {results['peak_mb']} MB" +
                 (" (mapped file pages included: saving streams the re-rank rows, spilled to a temporary file "
                  "while building, through a memory map)." if opened else "."))
    split = results.get("test_split")
    if split:
        lines += ["", f"MR on the approximate short list: mR on a test split of {split['images']} images and "
                  f"{split['captions']} captions (the Retriever's candidate-form MR, recall from each query's top "
                  f"{split['depth']}){': ' + split['command'] if split.get('command') else ''}", "",
                  "| searcher | mR | mR with MR |", "|---|---|---|"]
        lines += [f"| {kind} | {row['mr']} | {row['mr_rerank']} |" for kind, row in split["kinds"].items()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gallery", type=Path, required=True, help="a real .gidx whose embeddings the vectors fit")
    parser.add_argument("--size", type=int, default=ApproximateSettings.size)
    parser.add_argument("--queries", type=int, default=ApproximateSettings.queries)
    parser.add_argument("--kinds", default=",".join(ApproximateSettings.kinds))
    parser.add_argument("--models", default=",".join(ApproximateSettings.models),
                        help="vector models to measure: anchored (fitted), gaussian (the hard control)")
    parser.add_argument("--dim", type=int, default=None, help="lift the vectors to this size (see the docstring)")
    parser.add_argument("--nprobes", default=",".join(map(str, ApproximateSettings.nprobes)))
    parser.add_argument("--reranks", default=",".join(map(str, ApproximateSettings.reranks)),
                        help="ivfpq: exact re-rank depths to search with (0 = PQ scores only)")
    parser.add_argument("--pq-m", type=int, default=None, help="ivfpq: PQ sub-quantisers (default D / 8)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the saved searchers go while measured (default: the temporary folder); "
                             "10^7 ivfpq vectors need about 2 D bytes each there")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="with --dataset: also measure mR with MR per searcher on the dataset's test split")
    parser.add_argument("--dataset", type=Path, default=None, help="a benchmark folder (e.g. galr-demo/benchmark)")
    parser.add_argument("-o", "--output", type=Path, default=None, help="JSON results")
    parser.add_argument("--markdown", type=Path, default=None, help="the results as a Markdown section")
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["--search-child"]:  # the searching process of a run (see _measure_model)
        print(json.dumps(_search_child(Path(arguments[1]))))
        return
    args = parser.parse_args(arguments)
    settings = ApproximateSettings(size=args.size, queries=args.queries, kinds=tuple(args.kinds.split(",")),
                                   models=tuple(args.models.split(",")), dim=args.dim,
                                   nprobes=tuple(int(v) for v in args.nprobes.split(",")),
                                   reranks=tuple(int(v) for v in args.reranks.split(",")), pq_m=args.pq_m)
    started = utc_now()
    results = run(args.gallery, settings, work_dir=args.work_dir)
    if args.bundle is not None and args.dataset is not None:
        results["test_split"] = mr_on_test_split(args.bundle, args.dataset)
    command = ["python", "-m", "galr.bench.approximate", *(sys.argv[1:] if argv is None else argv)]
    results.update({"started": started, "command": shlex.join(command)})
    if args.output is not None:
        from galr.atomic import write_text_atomically

        write_text_atomically(args.output, json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    if args.markdown is not None:
        from galr.atomic import write_text_atomically

        write_text_atomically(args.markdown, text)
    print(text)


if __name__ == "__main__":
    main()


def mr_on_test_split(bundle: Path, dataset: Path, kinds: Sequence[str] = ("exact", "ivf", "hnsw"),
                     depth: int = 10, log=print) -> dict[str, Any]:
    """mR of the Retriever on a dataset's test split, per searcher kind, with and without MR.

    The test images form the gallery (DREA from the dataset's ``detections`` folder when present)
    and the test captions the text bank; text->image and image->text search run through
    :meth:`Retriever.search_embeddings` (MR in its candidate form over the searcher's short list).
    Recall@1/5/10 come from each query's top ``depth``; mR is their mean over both directions.
    """
    import warnings

    from galr.data import load_split
    from galr.retrieval.metrics import RetrievalMetrics
    from galr.runtime.encoders import load_engine
    from galr.runtime.index import GalleryIndex, ImageRecord
    from galr.runtime.retriever import Retriever

    split = load_split(dataset, "test")
    cpi = split.captions_per_image
    names = list(dict.fromkeys(split.image_names))
    detections = Path(dataset) / "detections"
    with load_engine(bundle, backend="onnxruntime", device="cpu", precision="fp32") as encoders, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images = np.concatenate([encoders.encode_images([split.image_dir / n for n in names[i:i + 32]],
                                                        local=detections if detections.is_dir() else None)
                                 for i in range(0, len(names), 32)])
        captions = encoders.encode_text(list(split.captions))
        rows = {}
        for kind in kinds:
            index = GalleryIndex(encoders.model_hash, encoders.embed_dim, searcher=kind)
            index.add([ImageRecord(name, str(split.image_dir / name), 0, 0) for name in names], images)
            index.add_text_bank(list(split.captions), captions)
            retriever = Retriever(encoders, index)
            row = {}
            for rerank in (False, True):
                t2i = retriever.search_embeddings(captions, [str(j) for j in range(len(captions))], target="images",
                                                  top_k=depth, rerank=rerank)
                i2t = retriever.search_embeddings(images, names, target="captions", top_k=depth, rerank=rerank)
                t2i_ranks = np.array([next((r for r, hit in enumerate(result.hits) if hit.id == names[j // cpi]),
                                           depth) for j, result in enumerate(t2i)])
                i2t_ranks = np.array([min([r for r, hit in enumerate(result.hits)
                                           if split.captions.index(hit.id) // cpi == i] or [depth])
                                      for i, result in enumerate(i2t)])
                metrics = RetrievalMetrics.from_ranks(i2t_ranks, t2i_ranks)
                row["mr_rerank" if rerank else "mr"] = round(metrics.mean_recall, 2)
            rows[kind] = row
            log(f"{kind}: mR {row['mr']} (MR {row['mr_rerank']})")
    return {"images": len(names), "captions": len(split.captions), "depth": depth, "kinds": rows}
