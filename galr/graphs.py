"""Names and shapes of the exported graphs: the one place export and runtime agree on I/O.

GaLR is exported as four ONNX graphs so each can be compiled, quantised and swapped alone:

==========  ===================================================  ==========================
graph       inputs                                               output
==========  ===================================================  ==========================
global      image float32 [B, 3, S, S]                           global_feature [B, D]
local       local_rep float32 [B, N, F], local_adj [B, N, N]     local_feature [B, D]
fusion      global_feature [B, D], local_feature [B, D]          image_embedding [B, D]
text        tokens int64 [B, T] (0 = padding)                    text_embedding [B, D]
==========  ===================================================  ==========================

``image_embedding`` and ``text_embedding`` are L2-normalised, so their dot product is the
original cosine similarity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from galr.config import GaLRConfig

GLOBAL, LOCAL, FUSION, TEXT = "global", "local", "fusion", "text"
GRAPH_NAMES: tuple[str, ...] = (GLOBAL, LOCAL, FUSION, TEXT)

IMAGE = "image"
LOCAL_REP = "local_rep"
LOCAL_ADJ = "local_adj"
GLOBAL_FEATURE = "global_feature"
LOCAL_FEATURE = "local_feature"
IMAGE_EMBEDDING = "image_embedding"
TOKENS = "tokens"
TEXT_EMBEDDING = "text_embedding"

BATCH_AXIS = "batch"
TEXT_AXIS = "length"

#: ``metadata_props`` keys stamped into every exported graph, so a stray ``.onnx`` says what it is.
META_GRAPH = "galr.graph"
META_PRECISION = "galr.precision"


@dataclass(frozen=True)
class GraphIO:
    """Input and output tensor descriptions of one graph: (name, dtype, shape) triples."""

    inputs: tuple[tuple[str, str, tuple], ...]
    outputs: tuple[tuple[str, str, tuple], ...]

    @property
    def input_names(self) -> list[str]:
        return [name for name, _, _ in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [name for name, _, _ in self.outputs]


def graph_io(config: GaLRConfig) -> dict[str, GraphIO]:
    """The I/O of every graph for a model configuration (dynamic axes are named strings)."""
    b, d, s = BATCH_AXIS, config.embed_dim, config.image_size
    n, f = config.num_objects, config.object_dim
    return {
        GLOBAL: GraphIO(((IMAGE, "float32", (b, 3, s, s)),), ((GLOBAL_FEATURE, "float32", (b, d)),)),
        LOCAL: GraphIO(
            ((LOCAL_REP, "float32", (b, n, f)), (LOCAL_ADJ, "float32", (b, n, n))),
            ((LOCAL_FEATURE, "float32", (b, d)),),
        ),
        FUSION: GraphIO(
            ((GLOBAL_FEATURE, "float32", (b, d)), (LOCAL_FEATURE, "float32", (b, d))),
            ((IMAGE_EMBEDDING, "float32", (b, d)),),
        ),
        TEXT: GraphIO(((TOKENS, "int64", (b, TEXT_AXIS)),), ((TEXT_EMBEDDING, "float32", (b, d)),)),
    }


def stamp_metadata(proto: Any, values: Mapping[str, str]) -> None:
    """Set ``metadata_props`` of an ONNX ``ModelProto`` (added or overwritten, key by key).

    The manifest is the source of truth; the stamps only make a graph copied out of a bundle
    self-describing.
    """
    existing = {prop.key: prop for prop in proto.metadata_props}
    for key, value in values.items():
        if key in existing:
            existing[key].value = str(value)
        else:
            proto.metadata_props.add(key=key, value=str(value))
