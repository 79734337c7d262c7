"""What the hardware allows: analytic FLOPs and bytes per encoder, measured machine peaks, and each
measured time as a fraction of its limit.

**FLOPs** (:func:`encoder_costs`) count ``2 x`` the multiply-accumulates of convolutions and matrix
products, the way ``torch.utils.flop_counter`` does (the tests check the two agree); element-wise
work (BatchNorm, ReLU, sigmoid, LayerNorm, the GRU's gate arithmetic, L2 norms) is left out, it is
well under 1% of every encoder. With ``S`` the image side, ``w0..w3`` the ResNet widths, ``D`` the
embedding size, ``conv(cin, cout, k, hw) = 2 cin k^2 cout hw^2``:

* global: ResNet-18 = ``conv(3, w0, 7, S/2)``, then per stage ``i`` at side ``r_i = S/2^(i+2)``:
  ``conv(c_in, w_i, 3, r_i) + 3 conv(w_i, w_i, 3, r_i)`` plus a 1x1 ``conv(c_in, w_i, 1, r_i)``
  shortcut where the width or stride changes; the pooled read-out ``2 w3 D``; MVSA:
  ``conv(w0+w1, c, 3, r_LF)`` with ``r_LF = (S/4 - 3) // 4 + 1``, ``conv(w2+w3, c, 1, S/16)``,
  two ``conv(2c, 1, 1, S/16)`` and the ``2 P D`` attention linear (``P = (S/16)^2``).
* local (``N`` objects of ``F`` features, GCN sizes ``g0, g1, g2``): three ``adj @ X`` products
  ``2 N^2 (F + g0 + g1)``, the three linears ``2 N (F g0 + g0 g1 + g1 g2)`` and ``2 N g2 D``.
* fusion (MIDF, hidden ``D``, feed-forward ``f``, dynamic ``d``): at inference the sequences have
  length 1, so each of the 6 attention blocks is ``linear_merge(linear_v(v))`` = ``4 D^2``; 4
  feed-forwards ``4 D f``; the dynamic weight ``2 D d + 4 d``.
* text (``T`` tokens, word size ``E``, GRU hidden ``H``): ``T (6 H E + 6 H H) + 2 H D``.
* search: the exact search, ``2 n D`` per query over ``n`` gallery rows, which it reads once per call.
* end-to-end: text plus search. Its limit is the sum of the two stages' limits (:data:`STAGES`): they
  run one after the other on different working sets.

**Bytes** (fp32): ``weights`` are the parameters a call reads once (BatchNorm folded into the
convolutions as ONNX Runtime and TensorRT do; the ResNet's unused classifier and MIDF's unused
query/key projections are not read; of the word embedding only the ``T`` rows used). The *minimum*
bytes per item at batch ``B`` are ``weights / B`` plus the item's inputs and outputs. The GRU adds a
second term: each of the ``T`` steps needs the previous one, so its recurrent matrix ``W_hh`` (3H x H,
69 MB at H=2400) is read once per step and batch, ``(T - 1) x W_hh / B`` more bytes per item, unless
it stays in the core's private cache (it does not at full size).

**Limits.** Measured here (:func:`measure_peaks`): the float32 matrix-multiply rate with numpy and
torch, a STREAM-like copy and triad bandwidth over arrays larger than the last-level cache (DRAM), the
matrix-vector rate over a matrix the shape of ``W_hh`` (one GRU step), and for each encoder the
*weight-read rate*: a matrix-vector product over a matrix of that encoder's weight bytes, read again
and again as the encoder's weights are from call to call -- so weights that stay in a cache are
credited with the cache's speed, not DRAM's (every encoder here is smaller than this machine's L3).
An encoder's limit per item at batch ``B`` is the larger of

* compute: FLOPs / peak matmul rate;
* memory: ``(weights + re-read weights) / B`` at its weight-read rate, plus inputs and outputs at the
  STREAM bandwidth;

and the larger one is reported as the bound. The ``int8-cpu`` rows (ONNX Runtime's CPU INT8 set) use
their own cost (:func:`int8_cpu_costs`: INT8 weights are one byte, so the global encoder's weights
and the GRU's ``W_ih`` / ``W_hh`` count a quarter of their FP32 bytes; the local and fusion graphs,
the word embedding and the text output layer stay FP32) and their own compute peak, the u8 x s8 -> s32
matrix-multiply rate of ONNX Runtime's ``MatMulInteger`` (the MLAS kernel the integer ops use),
measured here like the float one. A measured time's *fraction of its limit* is
``limit / measured`` (100% = at the limit). The limits are measurements on this machine, not
datasheet maxima, so a kernel that beats the micro-benchmark can show slightly over 100%.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from galr.bench.harness import (
    STATUS_OK,
    Log,
    Spread,
    TimingSettings,
    cache_bytes,
    measure,
    stopwatch,
)
from galr.config import GaLRConfig

FLOAT_BYTES = 4


@dataclass(frozen=True)
class EncoderCost:
    """Analytic cost of one encoder.

    Attributes:
        flops_per_item: FLOPs of one item (batch independent).
        weight_bytes: parameter bytes one call reads once (fp32).
        io_bytes_per_item: input plus output bytes of one item.
        streamed_bytes: extra parameter bytes one call re-reads (the GRU's ``W_hh`` at steps 2..T).
    """

    flops_per_item: float
    weight_bytes: float
    io_bytes_per_item: float
    streamed_bytes: float = 0.0

    def bytes_per_item(self, batch: int) -> float:
        """Minimum bytes moved per item at ``batch`` (weights shared by the batch)."""
        return (self.weight_bytes + self.streamed_bytes) / batch + self.io_bytes_per_item

    def to_dict(self, batches: tuple[int, ...]) -> dict[str, Any]:
        return {"flops_per_item": self.flops_per_item, "weight_bytes": self.weight_bytes,
                "io_bytes_per_item": self.io_bytes_per_item, "streamed_bytes": self.streamed_bytes,
                "bytes_per_item": {str(b): self.bytes_per_item(b) for b in batches},
                "flops_per_byte": {str(b): self.flops_per_item / self.bytes_per_item(b) for b in batches}}


def _conv(cin: int, cout: int, kernel: int, side: int) -> tuple[float, float]:
    """(FLOPs, weight+bias parameters) of a square convolution with a ``side`` x ``side`` output."""
    return 2.0 * cin * kernel * kernel * cout * side * side, float(cin * kernel * kernel * cout + cout)


def _linear(inputs: int, outputs: int, bias: bool = True) -> tuple[float, float]:
    return 2.0 * inputs * outputs, float(inputs * outputs + (outputs if bias else 0))


def _total(parts: list[tuple[float, float]]) -> tuple[float, float]:
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def global_cost(config: GaLRConfig) -> EncoderCost:
    """ResNet-18 trunk + MVSA (see the module docstring)."""
    s, widths, d, c = config.image_size, config.resnet_widths, config.embed_dim, config.vsa_channels
    parts = [_conv(3, widths[0], 7, s // 2)]
    channels = widths[0]
    for stage, width in enumerate(widths):
        side = s // 2 ** (stage + 2)
        parts += [_conv(channels, width, 3, side)] + [_conv(width, width, 3, side)] * 3
        if stage > 0 or channels != width:
            parts.append(_conv(channels, width, 1, side))
        channels = width
    high_side = s // 16
    low_side = (s // 4 - 3) // 4 + 1
    parts += [_linear(widths[3], d), _conv(widths[0] + widths[1], c, 3, low_side),
              _conv(widths[2] + widths[3], c, 1, high_side), _conv(2 * c, 1, 1, high_side), _conv(2 * c, 1, 1, high_side),
              _linear(config.attention_positions, d)]
    flops, params = _total(parts)
    return EncoderCost(flops, params * FLOAT_BYTES, (3 * s * s + d) * FLOAT_BYTES)


def local_cost(config: GaLRConfig) -> EncoderCost:
    """The DREA GCN."""
    n, f, (g0, g1, g2), d = config.num_objects, config.object_dim, config.gcn_dims, config.embed_dim
    products = 2.0 * n * n * (f + g0 + g1)
    parts = [_linear(f, g0, bias=False), _linear(g0, g1, bias=False), _linear(g1, g2, bias=False)]
    layer_flops = n * sum(p[0] for p in parts)
    out_flops, out_params = _linear(n * g2, d)
    params = sum(p[1] for p in parts) + out_params
    return EncoderCost(products + layer_flops + out_flops, params * FLOAT_BYTES, (n * f + n * n + d) * FLOAT_BYTES)


def fusion_cost(config: GaLRConfig) -> EncoderCost:
    """MIDF at inference (length-1 sequences: attention blocks reduce to two linears)."""
    d, ff, dyn = config.embed_dim, config.fusion_ff, config.fusion_dynamic_dim
    attention = [_linear(d, d), _linear(d, d)] * 6
    feed_forward = [_linear(d, ff), _linear(ff, d)] * 4
    flops, params = _total(attention + feed_forward + [_linear(d, dyn), _linear(dyn, 2)])
    layer_norms = 10 * 2 * d  # 2 SA x 2 + 2 SGA x 3 LayerNorms, gain and bias each
    return EncoderCost(flops, (params + layer_norms) * FLOAT_BYTES, 3 * d * FLOAT_BYTES)


def text_cost(config: GaLRConfig, tokens: int) -> EncoderCost:
    """Skip-thought GRU over ``tokens`` steps plus the output linear."""
    e, h, d = config.word_dim, config.gru_hidden, config.embed_dim
    recurrent = 3.0 * h * h
    flops = tokens * (6.0 * h * e + 6.0 * h * h) + 2.0 * h * d
    params = tokens * e + (3 * h * e + 3 * h) + (recurrent + 3 * h) + (h * d + d)
    io_bytes = tokens * 8 + d * FLOAT_BYTES  # int64 token ids in, float32 embedding out
    return EncoderCost(flops, params * FLOAT_BYTES, io_bytes, (tokens - 1) * recurrent * FLOAT_BYTES)


def search_cost(config: GaLRConfig, gallery: int) -> EncoderCost:
    """An exact search over ``gallery`` fp32 rows: ``2 n D`` FLOPs, every row read once per call."""
    d = config.embed_dim
    return EncoderCost(2.0 * gallery * d, gallery * d * FLOAT_BYTES, 0.0)


def end_to_end_cost(config: GaLRConfig, tokens: int, gallery: int) -> EncoderCost:
    """Text encoder plus an exact search over ``gallery`` fp32 rows."""
    text, search = text_cost(config, tokens), search_cost(config, gallery)
    return EncoderCost(text.flops_per_item + search.flops_per_item, text.weight_bytes + search.weight_bytes,
                       text.io_bytes_per_item, text.streamed_bytes)


#: Pipelines whose limit is the sum of their stages' limits: the stages run one after the other, each
#: on its own working set (the GRU's weights are re-read at the text encoder's rate, not the search's).
STAGES = {"end-to-end": ("text", "search")}


def encoder_costs(config: GaLRConfig, tokens: int, gallery: int) -> dict[str, EncoderCost]:
    """Costs of every encoder of :data:`galr.bench.encoders.ENCODER_NAMES`, and of the search stage."""
    return {"global": global_cost(config), "local": local_cost(config), "fusion": fusion_cost(config),
            "text": text_cost(config, tokens), "search": search_cost(config, gallery),
            "end-to-end": end_to_end_cost(config, tokens, gallery)}


# ---------------------------------------------------------------------------------------------
# Measured peaks


@dataclass(frozen=True)
class PeakSettings:
    """Sizes of the peak measurements.

    Attributes:
        matmul_size: side of the square float32 matrices multiplied.
        stream_bytes: bytes per STREAM array; ``None`` = 4 x the last-level cache, at least 256 MiB.
        gemv_shape: rows and columns of the matrix-vector product (the GRU's ``W_hh``).
        timing: repeats of each measurement.
    """

    matmul_size: int = 2048
    stream_bytes: int | None = None
    gemv_shape: tuple[int, int] = (7200, 2400)
    timing: TimingSettings = TimingSettings(warmup=1, repeats=5, min_iterations=1, max_iterations=20, target_seconds=0.5)

    def to_dict(self) -> dict[str, Any]:
        return {"matmul_size": self.matmul_size, "stream_bytes": self.stream_bytes,
                "gemv_shape": list(self.gemv_shape), "timing": self.timing.to_dict()}


def _rates(call, work: float, timing: TimingSettings) -> dict[str, float]:
    """``work`` units per call -> units/s per run as min/median/max (each run's best call rate)."""
    runs = measure(call, timing).runs
    return Spread.of([work / min(run) for run in runs]).to_dict()


def _matrix_vector_rate(rows: int, columns: int, timing: TimingSettings) -> dict[str, float]:
    """GB/s of ``torch.mv`` over a ``rows x columns`` float32 matrix (bytes of the matrix per call)."""
    import torch

    matrix, vector = torch.randn(rows, columns), torch.randn(columns)
    return _rates(lambda: torch.mv(matrix, vector), rows * columns * FLOAT_BYTES / 1e9, timing)


def _read_rate(size_bytes: float, timing: TimingSettings) -> dict[str, float]:
    """The weight-read rate at a working set of ``size_bytes`` (a matrix-vector product, 1024 columns)."""
    columns = 1024
    return _matrix_vector_rate(max(1, int(round(size_bytes / FLOAT_BYTES / columns))), columns, timing)


def _int8_matmul_rate(n: int, timing: TimingSettings) -> dict[str, float] | None:
    """Giga-ops/s of ONNX Runtime's ``MatMulInteger`` (u8 x s8 -> s32, n x n x n) on the CPU provider;
    ``None`` without ONNX Runtime. Threads: torch's, as the float peaks."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.integers(-127, 128, (n, n), dtype=np.int8), "b")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "int8_peak",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    import torch

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the threads the float peaks ran with
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    a = rng.integers(0, 256, (n, n), dtype=np.uint8)
    return _rates(lambda: session.run(None, {"a": a}), 2.0 * n ** 3 / 1e9, timing)


def _matmul_rates(n: int, timing: TimingSettings) -> dict[str, dict[str, float]]:
    import torch

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    gigaflops = 2.0 * n ** 3 / 1e9
    return {"numpy": _rates(lambda: a @ b, gigaflops, timing), "torch": _rates(lambda: ta @ tb, gigaflops, timing)}


def _stream_rates(array_bytes: int, timing: TimingSettings) -> dict[str, dict[str, float]]:
    import torch

    elements = array_bytes // FLOAT_BYTES
    x, y, z = torch.ones(elements), torch.full((elements,), 2.0), torch.empty(elements)
    xn, zn = x.numpy(), z.numpy()
    gigabytes = array_bytes / 1e9
    return {
        "copy": _rates(lambda: z.copy_(x), 2 * gigabytes, timing),
        "triad": _rates(lambda: torch.add(x, y, alpha=3.0, out=z), 3 * gigabytes, timing),
        "numpy_copy_1_thread": _rates(lambda: np.copyto(zn, xn), 2 * gigabytes, timing),
    }


def measure_peaks(settings: PeakSettings, log: Log, working_sets: dict[str, float] | None = None) -> dict[str, Any]:
    """Peak float32 matmul GFLOP/s (numpy, torch), STREAM copy/triad GB/s, the W_hh matrix-vector GB/s,
    and the weight-read rate at each of ``working_sets`` (name -> bytes).

    The STREAM figures use torch (multi-threaded, a fused ``a = b + s c`` for the triad); numpy's
    single-threaded copy is reported next to them. Bytes follow STREAM: copy moves 2 x the array,
    triad 3 x (write-allocate traffic not counted).
    """
    import torch

    n = settings.matmul_size
    log(f"peak matmul: {n}x{n} float32, numpy and torch; u8 x s8 with ONNX Runtime's MatMulInteger")
    matmul = _matmul_rates(n, settings.timing)
    int8_matmul = _int8_matmul_rate(n, settings.timing)
    llc = cache_bytes("L3") or cache_bytes("L2") or 0
    array_bytes = settings.stream_bytes or max(4 * llc, 256 * 2**20)
    log(f"STREAM copy/triad: 3 arrays of {array_bytes / 2**20:.0f} MiB")
    bandwidth = _stream_rates(array_bytes, settings.timing)
    rows, columns = settings.gemv_shape
    log(f"matrix-vector: {rows}x{columns} float32 ({rows * columns * FLOAT_BYTES / 2**20:.0f} MiB)")
    gemv = _matrix_vector_rate(rows, columns, settings.timing)
    log(f"weight-read rates at {len(working_sets or {})} working-set sizes")
    reads = {name: _read_rate(size, settings.timing) for name, size in (working_sets or {}).items()}
    return {
        "matmul_gflops": matmul, "int8_matmul_gops": int8_matmul, "bandwidth_gbs": bandwidth, "gemv_gbs": gemv, "weight_read_gbs": reads,
        "stream_array_bytes": array_bytes, "last_level_cache_bytes": llc or None,
        "torch_threads": torch.get_num_threads(), "settings": settings.to_dict(),
    }


# ---------------------------------------------------------------------------------------------
# Limits and fractions


def limit_seconds(name: str, cost: EncoderCost, batch: int, peaks: dict[str, Any], int8: bool = False
                  ) -> tuple[float, str]:
    """The shortest time per item the peaks allow at ``batch``, and the bound (``compute``/``memory``).

    Args:
        name: the encoder (its weight-read rate is looked up by it).
        cost: its analytic cost.
        batch: items per call.
        peaks: :func:`measure_peaks`.
        int8: an INT8 row: its compute runs at the measured u8 x s8 rate (when measured).
    """
    flops_rate = max(v["max"] for v in peaks["matmul_gflops"].values()) * 1e9
    if int8 and peaks.get("int8_matmul_gops"):
        flops_rate = peaks["int8_matmul_gops"]["max"] * 1e9
    stream = max(v["max"] for v in peaks["bandwidth_gbs"].values()) * 1e9  # the best measured DRAM rate
    reads = peaks["weight_read_gbs"]
    # An INT8 row reads fewer bytes, so its weights may sit in a faster cache: its own working set's rate.
    read = reads.get(f"{INT8_PREFIX}{name}") if int8 else None
    weight_rate = (read or reads.get(name, {})).get("max", stream / 1e9) * 1e9
    terms = {
        "compute": cost.flops_per_item / flops_rate,
        "memory": (cost.weight_bytes + cost.streamed_bytes) / batch / weight_rate + cost.io_bytes_per_item / stream,
    }
    bound = max(terms, key=terms.get)
    return terms[bound], bound


def _pipeline_limit(name: str, costs: dict[str, EncoderCost], batch: int, peaks: dict[str, Any],
                    int8: bool = False) -> tuple[float, str]:
    """:func:`limit_seconds` of an encoder, or the sum over the stages of a pipeline (:data:`STAGES`);
    a pipeline's bound is that of its slowest stage."""
    if name not in STAGES:
        return limit_seconds(name, costs[name], batch, peaks, int8)
    limits = [limit_seconds(stage, costs[stage], batch, peaks, int8 and stage != "search") for stage in STAGES[name]]
    return sum(seconds for seconds, _ in limits), max(limits)[1]


def _measured_seconds_per_item(row: dict[str, Any]) -> float | None:
    if row.get("kind") == "latency":
        return row["latency_ms"]["p50"]["median"] / 1e3
    if row.get("kind") == "throughput":
        return 1.0 / row["items_per_s"]["median"]
    return None


INT8_CPU_BACKEND = "onnxruntime-int8-cpu"
#: Key prefix of the INT8 working sets in ``peaks["weight_read_gbs"]``.
INT8_PREFIX = "int8-cpu:"
FRACTION_BACKENDS = ("pytorch-eager", "onnxruntime-fp32", INT8_CPU_BACKEND)


def int8_cpu_costs(config: GaLRConfig, costs: dict[str, EncoderCost]) -> dict[str, EncoderCost]:
    """The costs of the ``int8-cpu`` set: the same FLOPs, fewer bytes (see the module docstring)."""
    e, h = config.word_dim, config.gru_hidden
    text = costs["text"]
    gru_saved = (3 * h * e + 3 * h * h) * (FLOAT_BYTES - 1)  # W_ih and W_hh: 1 byte instead of 4
    out = dict(costs)
    out["global"] = EncoderCost(costs["global"].flops_per_item, costs["global"].weight_bytes / FLOAT_BYTES,
                                costs["global"].io_bytes_per_item)
    out["text"] = EncoderCost(text.flops_per_item, text.weight_bytes - gru_saved, text.io_bytes_per_item,
                              text.streamed_bytes / FLOAT_BYTES)
    search = costs["search"]
    out["end-to-end"] = EncoderCost(out["text"].flops_per_item + search.flops_per_item,
                                    out["text"].weight_bytes + search.weight_bytes, text.io_bytes_per_item,
                                    out["text"].streamed_bytes)
    return out


#: Encoders whose int8-cpu weights differ from FP32 (their read rate is measured at the INT8 size).
INT8_WORKING_SETS = ("global", "text", "end-to-end")


def fractions_of_limit(costs: dict[str, EncoderCost], peaks: dict[str, Any], encoder_rows: list[dict[str, Any]],
                       int8_costs: dict[str, EncoderCost] | None = None) -> list[dict[str, Any]]:
    """For each FP32 row, and each ``int8-cpu`` row, of the encoder section: its limit, the binding term
    and ``limit / measured``.

    The ``int8-cpu`` rows use ``int8_costs`` (:func:`int8_cpu_costs`) and the INT8 compute peak; they
    are left out when ``int8_costs`` is not given. The TensorRT-layout INT8 and FP16 rows are left
    out: their peak rates were not measured here.
    """
    out = []
    for row in encoder_rows:
        if row.get("backend") not in FRACTION_BACKENDS or row.get("status") != STATUS_OK:
            continue
        int8 = row["backend"] == INT8_CPU_BACKEND
        if int8 and int8_costs is None:
            continue
        row_costs = int8_costs if int8 else costs
        measured = _measured_seconds_per_item(row)
        cost = row_costs.get(row["encoder"])
        if measured is None or cost is None:
            continue
        limit, bound = _pipeline_limit(row["encoder"], row_costs, row["batch"], peaks, int8)
        out.append({"encoder": row["encoder"], "backend": row["backend"], "batch": row["batch"],
                    "measured_ms_per_item": measured * 1e3, "limit_ms_per_item": limit * 1e3, "bound": bound,
                    "fraction_of_limit": limit / measured,
                    "achieved_gflops": cost.flops_per_item / measured / 1e9,
                    "achieved_gbs": cost.bytes_per_item(row["batch"]) / measured / 1e9})
    return out


def run_limits(config: GaLRConfig, tokens: int, gallery: int, batches: tuple[int, ...], settings: PeakSettings,
               log: Log) -> dict[str, Any]:
    """The ``limits`` section without fractions (they need the encoder rows: :func:`attach_fractions`)."""
    elapsed = stopwatch()
    costs = encoder_costs(config, tokens, gallery)
    int8 = int8_cpu_costs(config, costs)
    return {
        "status": STATUS_OK, "config": config.to_dict(), "text_tokens": tokens, "e2e_gallery": gallery,
        "batches": list(batches),
        "encoders": {name: cost.to_dict(batches) for name, cost in costs.items()},
        "encoders_int8_cpu": {name: int8[name].to_dict(batches) for name in INT8_WORKING_SETS},
        "peaks": measure_peaks(settings, log, {**{name: cost.weight_bytes for name, cost in costs.items()},
                                               **{f"{INT8_PREFIX}{name}": int8[name].weight_bytes
                                                  for name in INT8_WORKING_SETS}}),
        "fractions": [],
        "seconds": round(elapsed(), 1),
    }


def attach_fractions(limits: dict[str, Any], encoders: dict[str, Any]) -> None:
    """Fill ``limits["fractions"]`` from the encoder section of the same run (in place)."""
    if limits.get("status") != STATUS_OK or encoders.get("status") != STATUS_OK:
        return
    config = GaLRConfig.from_dict(limits["config"])
    costs = encoder_costs(config, limits["text_tokens"], limits["e2e_gallery"])
    limits["fractions"] = fractions_of_limit(costs, limits["peaks"], encoders["rows"], int8_cpu_costs(config, costs))


__all__ = [
    "EncoderCost",
    "PeakSettings",
    "attach_fractions",
    "STAGES",
    "encoder_costs",
    "end_to_end_cost",
    "fractions_of_limit",
    "fusion_cost",
    "int8_cpu_costs",
    "global_cost",
    "limit_seconds",
    "local_cost",
    "measure_peaks",
    "run_limits",
    "search_cost",
    "text_cost",
]
