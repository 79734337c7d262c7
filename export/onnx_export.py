"""PyTorch GaLR -> four ONNX graphs (global, local GCN, MIDF fusion, text), see :mod:`galr.graphs`.

The legacy TorchScript exporter (``dynamo=False``) is used: it needs no ``onnxscript``, keeps opset
17, and writes ``nn.GRU`` as one ONNX ``GRU`` node that TensorRT's parser supports.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import onnx
import torch
from torch import nn

import galr
from galr import graphs
from galr.errors import InputError
from galr.model import GaLR

DEFAULT_OPSET = 17


class _GlobalGraph(nn.Module):
    def __init__(self, model: GaLR) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.encode_global(image)


class _LocalGraph(nn.Module):
    def __init__(self, model: GaLR) -> None:
        super().__init__()
        self.model = model

    def forward(self, local_rep: torch.Tensor, local_adj: torch.Tensor) -> torch.Tensor:
        return self.model.encode_local(local_rep, local_adj)


class _FusionGraph(nn.Module):
    def __init__(self, model: GaLR) -> None:
        super().__init__()
        self.model = model

    def forward(self, global_feature: torch.Tensor, local_feature: torch.Tensor) -> torch.Tensor:
        return self.model.fuse(global_feature, local_feature)


class _TextGraph(nn.Module):
    def __init__(self, model: GaLR) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


_WRAPPERS = {graphs.GLOBAL: _GlobalGraph, graphs.LOCAL: _LocalGraph, graphs.FUSION: _FusionGraph, graphs.TEXT: _TextGraph}


def example_inputs(config, batch: int = 2, text_length: int = 7, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Deterministic example feeds per graph, used for tracing and for quick parity checks."""
    g = torch.Generator().manual_seed(seed)
    n, f, d, s = config.num_objects, config.object_dim, config.embed_dim, config.image_size
    tokens = torch.randint(1, config.vocab_size + 1, (batch, text_length), generator=g)
    tokens[0, text_length // 2:] = 0  # one padded row so the last-step gather is traced with real lengths
    unit = lambda t: t / t.norm(dim=1, keepdim=True)  # noqa: E731
    return {
        graphs.GLOBAL: {graphs.IMAGE: torch.randn(batch, 3, s, s, generator=g)},
        graphs.LOCAL: {graphs.LOCAL_REP: torch.rand(batch, n, f, generator=g),
                       graphs.LOCAL_ADJ: torch.rand(batch, n, n, generator=g) / n},
        graphs.FUSION: {graphs.GLOBAL_FEATURE: unit(torch.randn(batch, d, generator=g)),
                        graphs.LOCAL_FEATURE: unit(torch.randn(batch, d, generator=g))},
        graphs.TEXT: {graphs.TOKENS: tokens},
    }


@dataclass(frozen=True)
class ExportOptions:
    """How graphs are written.

    Attributes:
        opset: ONNX opset (>= 17).
        simplify: run onnxslim (constant folding, shape-chain cleanup) when it is installed.
    """

    opset: int = DEFAULT_OPSET
    simplify: bool = True


def _dynamic_axes(spec: graphs.GraphIO) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for name, _, shape in spec.inputs + spec.outputs:
        named = {i: dim for i, dim in enumerate(shape) if isinstance(dim, str)}
        if named:
            axes[name] = named
    return axes


def _simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        import onnxslim
    except ImportError:
        return model
    return onnxslim.slim(model)


def export_graph(model: GaLR, name: str, options: ExportOptions = ExportOptions()) -> onnx.ModelProto:
    """Export one of the four graphs of ``model`` (in eval mode) to an ONNX model proto."""
    if options.opset < 17:
        raise InputError(f"opset {options.opset} is too old: GaLR export needs opset >= 17")
    spec = graphs.graph_io(model.config)[name]
    wrapper = _WRAPPERS[name](model).eval()
    feeds = example_inputs(model.config)[name]
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The exporter warns about the GRU's batch_first layout and constant folding; both are fine.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, tuple(feeds[n] for n in spec.input_names), buffer, input_names=spec.input_names,
            output_names=spec.output_names, dynamic_axes=_dynamic_axes(spec), opset_version=options.opset,
            do_constant_folding=True, dynamo=False,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    if options.simplify:
        proto = _simplify(proto)
    proto.producer_name, proto.producer_version = "galr", galr.__version__
    graphs.stamp_metadata(proto, {graphs.META_GRAPH: name, "galr.embed_dim": str(model.config.embed_dim),
                                  graphs.META_PRECISION: "fp32",
                                  "galr.l2_normalised": str(name in (graphs.FUSION, graphs.TEXT))})
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_all(model: GaLR, options: ExportOptions = ExportOptions()) -> dict[str, onnx.ModelProto]:
    """Export all four graphs of an eval-mode model."""
    model = model.eval()
    return {name: export_graph(model, name, options) for name in graphs.GRAPH_NAMES}
