"""TensorRT engine sets in a bundle: what each is tied to, and which one fits this machine.

A TensorRT plan only loads on the TensorRT version and GPU architecture that built it, and it is
only correct for the graphs it was built from. A bundle can carry engine sets for several machines;
each set is one plan per graph under ``engines/<key>/`` and one :class:`EngineEntry` in the
manifest, identified by an :class:`EngineKey`. The runtime picks the entry that fits
(:func:`select_engine_entry`) or refuses with the command that builds one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from galr.bundle.format import ENGINE_PRECISIONS, engine_member
from galr.errors import InputError, UnavailableError
from galr.graphs import GRAPH_NAMES

if TYPE_CHECKING:
    from galr.bundle.archive import Bundle

REBUILD_COMMAND = "galr-build {bundle}"


class EngineMismatchError(UnavailableError):
    """No engine in the bundle fits this GPU, TensorRT version or the bundle's current graphs."""


def graphs_sha256(bundle: "Bundle", precision: str) -> str:
    """SHA-256 of the four ONNX graphs of ``precision``, concatenated in ``GRAPH_NAMES`` order.

    One hash for the set, since an engine set is built from all four; it changes when any graph does.
    """
    digest = hashlib.sha256()
    for name in GRAPH_NAMES:
        digest.update(bundle.onnx_bytes(name, precision))
    return digest.hexdigest()


@dataclass(frozen=True)
class EngineKey:
    """What an engine set is tied to.

    Attributes:
        compute_capability: GPU architecture, ``"sm_90"``.
        tensorrt_version: the TensorRT version that built it, ``"10.16.1"``.
        precision: ``"fp32" | "fp16" | "int8"``.
        graphs_sha256: :func:`graphs_sha256` of the graphs it was built from.
    """

    compute_capability: str
    tensorrt_version: str
    precision: str
    graphs_sha256: str

    def __post_init__(self) -> None:
        if self.precision not in ENGINE_PRECISIONS:
            raise InputError(f"EngineKey.precision must be one of {list(ENGINE_PRECISIONS)}, got {self.precision!r} "
                             "(int8-cpu is for ONNX Runtime's CPU provider; TensorRT builds from the int8 set)")
        if not self.compute_capability.startswith("sm_"):
            raise InputError(f"EngineKey.compute_capability must look like 'sm_90', got {self.compute_capability!r}")

    def as_string(self) -> str:
        """Short, path-safe form, e.g. ``sm_90-trt10.16.1-fp16-0123456789ab``."""
        return f"{self.compute_capability}-trt{self.tensorrt_version}-{self.precision}-{self.graphs_sha256[:12]}"

    def to_dict(self) -> dict[str, str]:
        return {"compute_capability": self.compute_capability, "tensorrt_version": self.tensorrt_version,
                "precision": self.precision, "graphs_sha256": self.graphs_sha256}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EngineKey":
        return cls(str(data["compute_capability"]), str(data["tensorrt_version"]), str(data["precision"]),
                   str(data["graphs_sha256"]))


def engine_key(bundle: "Bundle", precision: str, compute_capability: str, tensorrt_version: str) -> EngineKey:
    """The key of an engine set built from ``bundle``'s ``precision`` graphs on this GPU and TensorRT."""
    return EngineKey(compute_capability, tensorrt_version, precision, graphs_sha256(bundle, precision))


@dataclass(frozen=True)
class EngineEntry:
    """One engine set as the manifest lists it.

    Attributes:
        key: what the set is tied to.
        gpu: the GPU's name when it was built (for people; the key decides).
        built: ISO time of the build.
        members: graph name -> member holding its plan.
        profiles: graph name -> input name -> ``[min, opt, max]`` shapes it was built for.
        version_compatible: built with TensorRT's ``VERSION_COMPATIBLE`` (newer runtimes may load it).
    """

    key: EngineKey
    gpu: str
    built: str
    members: dict[str, str]
    profiles: dict[str, Any] = field(default_factory=dict)
    version_compatible: bool = False

    @property
    def key_string(self) -> str:
        return self.key.as_string()

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key.to_dict(), "key_string": self.key_string, "gpu": self.gpu, "built": self.built,
                "members": dict(self.members), "profiles": dict(self.profiles),
                "version_compatible": self.version_compatible}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EngineEntry":
        """Parse a manifest entry.

        Raises:
            ValueError: a field is missing or malformed, or a member is not where the key says.
        """
        if not isinstance(data, Mapping):
            raise InputError(f"an engine entry must be an object, got {type(data).__name__}")
        try:
            key = EngineKey.from_dict(data["key"])
            members = {str(graph): str(member) for graph, member in dict(data["members"]).items()}
            entry = cls(key, str(data.get("gpu", "")), str(data.get("built", "")), members,
                        dict(data.get("profiles") or {}), bool(data.get("version_compatible", False)))
        except (KeyError, TypeError) as exc:
            raise InputError(f"malformed engine entry ({type(exc).__name__}: {exc})") from None
        expected = {name: engine_member(key.as_string(), name) for name in GRAPH_NAMES}
        if members != expected:
            raise InputError(f"engine entry {key.as_string()} must list the members {expected}")
        return entry


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def check_engine_compatible(entry: EngineEntry, compute_capability: str, tensorrt_version: str, *,
                            current_graphs_sha256: str | None = None, bundle: str = "<bundle>") -> None:
    """Refuse an engine set that will not load (or would run stale graphs) here.

    Args:
        entry: the manifest's entry.
        compute_capability: this machine's GPU architecture (``"sm_none"`` without a GPU).
        tensorrt_version: the installed TensorRT version (``"none"`` without one).
        current_graphs_sha256: :func:`graphs_sha256` of the bundle's graphs now; checked when given.
        bundle: bundle path shown in the rebuild command.

    Raises:
        EngineMismatchError: listing every difference and the ``galr-build`` command that fixes it.
    """
    recorded = entry.key
    differences = []
    if recorded.compute_capability != compute_capability:
        differences.append(f"GPU architecture: engine {recorded.compute_capability}, this GPU {compute_capability}")
    newer_runtime_ok = entry.version_compatible and _version_tuple(tensorrt_version) >= _version_tuple(
        recorded.tensorrt_version)
    if recorded.tensorrt_version != tensorrt_version and not newer_runtime_ok:
        differences.append(f"TensorRT: engine built with {recorded.tensorrt_version}, installed {tensorrt_version}")
    if current_graphs_sha256 is not None and recorded.graphs_sha256 != current_graphs_sha256:
        differences.append(f"ONNX graphs: engine from {recorded.graphs_sha256[:12]}, "
                           f"bundle has {current_graphs_sha256[:12]}")
    if differences:
        raise EngineMismatchError(
            f"engine {recorded.as_string()} does not match this machine ({'; '.join(differences)}). "
            f"Rebuild it here with `{REBUILD_COMMAND.format(bundle=bundle)}`, or use the onnxruntime backend."
        )


def select_engine_entry(bundle: "Bundle", precision: str, compute_capability: str,
                        tensorrt_version: str) -> EngineEntry:
    """The bundle's engine set built for this GPU, TensorRT version and the bundle's current graphs.

    Raises:
        EngineMismatchError: none fits; the message lists what differs and the rebuild command.
    """
    candidates = [entry for entry in bundle.engine_entries if entry.key.precision == precision]
    if not candidates:
        raise EngineMismatchError(f"{bundle.path} has no TensorRT {precision} engines; build them here with "
                                  f"`galr-build {bundle.path} --precision {precision}` or use --backend onnxruntime")
    current = graphs_sha256(bundle, precision)
    problems = []
    for entry in candidates:
        try:
            check_engine_compatible(entry, compute_capability, tensorrt_version, current_graphs_sha256=current,
                                    bundle=str(bundle.path))
            return entry
        except EngineMismatchError as exc:
            problems.append(str(exc))
    raise EngineMismatchError(" | ".join(problems))


__all__ = [
    "REBUILD_COMMAND",
    "EngineEntry",
    "EngineKey",
    "EngineMismatchError",
    "check_engine_compatible",
    "engine_key",
    "graphs_sha256",
    "select_engine_entry",
]
