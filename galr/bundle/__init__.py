"""The ``galr.plan`` bundle, torch-free: format and schema (:mod:`.format`), reading and writing
(:mod:`.archive`), TensorRT engine sets and their keys (:mod:`.engines`).

Export writes bundles with it, the runtime reads them with it; nothing else knows the format.
"""

from galr.bundle.archive import (
    Bundle,
    build_bundle,
    read_bundle,
    update_bundle,
    write_bundle,
)
from galr.bundle.engines import (
    REBUILD_COMMAND,
    EngineEntry,
    EngineKey,
    EngineMismatchError,
    check_engine_compatible,
    engine_key,
    graphs_sha256,
    select_engine_entry,
)
from galr.bundle.format import (
    CPU_ONLY_PRECISIONS,
    DETECTOR_MEMBER,
    ENGINE_PRECISIONS,
    FORMAT_VERSION,
    MANIFEST,
    PRECISIONS,
    BundleError,
    engine_member,
    model_hash,
    onnx_member,
    validate_manifest,
)

__all__ = [
    "DETECTOR_MEMBER",
    "CPU_ONLY_PRECISIONS",
    "ENGINE_PRECISIONS",
    "FORMAT_VERSION",
    "MANIFEST",
    "PRECISIONS",
    "REBUILD_COMMAND",
    "Bundle",
    "BundleError",
    "EngineEntry",
    "EngineKey",
    "EngineMismatchError",
    "build_bundle",
    "check_engine_compatible",
    "engine_key",
    "engine_member",
    "graphs_sha256",
    "model_hash",
    "onnx_member",
    "read_bundle",
    "select_engine_entry",
    "update_bundle",
    "validate_manifest",
    "write_bundle",
]
