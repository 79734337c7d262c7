"""The runner interface every backend implements: named numpy arrays in, named numpy arrays out.

Building a session or an engine is a loader's job (see each backend module); a runner owns the
built object's lifecycle and validates inputs before the backend sees them, so a bad feed fails
here with a readable message instead of deep inside ONNX Runtime or TensorRT.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from galr.errors import InputError, UnavailableError


class RunnerError(InputError):
    """A runner was fed inputs it cannot take, or its backend failed on a graph (e.g. a corrupt one)."""


class BackendUnavailableError(UnavailableError):
    """A requested backend or device cannot run here; the message says what is missing and how to fix it."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one graph input or output; ``None`` or a string marks a dynamic axis."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "TensorSpec":
        return cls(str(data["name"]), str(data["dtype"]), tuple(data["shape"]))

    def check(self, array: np.ndarray) -> None:
        """Raise :class:`RunnerError` if ``array`` cannot be fed as this tensor."""
        if np.dtype(array.dtype) != np.dtype(self.dtype):
            raise RunnerError(f"input '{self.name}' must be {self.dtype}, got {array.dtype}")
        if array.ndim != len(self.shape):
            raise RunnerError(
                f"input '{self.name}' must have {len(self.shape)} dimensions {list(self.shape)}, "
                f"got shape {list(array.shape)}"
            )
        for axis, (want, got) in enumerate(zip(self.shape, array.shape)):
            if isinstance(want, int) and want != got:
                raise RunnerError(
                    f"input '{self.name}' axis {axis} must be {want}, got shape {list(array.shape)}"
                )


class Runner(ABC):
    """Runs one graph. Use as a context manager, or call :meth:`activate` and :meth:`close`.

    Subclasses implement ``_activate``, ``_infer`` and ``_close``; the public methods check state
    and inputs. ``last_inference_time`` holds the seconds spent in the latest ``_infer`` call.

    Attributes:
        name: the backend's name.
        thread_safe: whether ``infer`` may run from several threads at once (callers serialise it
            otherwise).
    """

    name = "runner"
    thread_safe = True

    @property
    def max_batch_size(self) -> int | None:
        """Largest batch one ``infer`` call accepts, or ``None`` for no limit (callers split larger batches)."""
        return None

    def __init__(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
        self.inputs = {spec.name: spec for spec in inputs}
        self.outputs = {spec.name: spec for spec in outputs}
        self.is_active = False
        self.last_inference_time: float | None = None

    def activate(self) -> "Runner":
        if not self.is_active:
            self._activate()
            self.is_active = True
        return self

    def close(self) -> None:
        if self.is_active:
            self._close()
            self.is_active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on ``feeds`` (input name -> array) and return output name -> array."""
        if not self.is_active:
            raise RunnerError(f"{self.name} runner is not active; call activate() or use 'with'")
        missing = sorted(set(self.inputs) - set(feeds))
        extra = sorted(set(feeds) - set(self.inputs))
        if missing or extra:
            raise RunnerError(
                f"{self.name} runner expects inputs {sorted(self.inputs)}; missing {missing}, unexpected {extra}"
            )
        arrays = {}
        for name, value in feeds.items():
            array = np.ascontiguousarray(value)
            self.inputs[name].check(array)
            arrays[name] = array
        start = time.perf_counter()
        outputs = self._infer(arrays)
        self.last_inference_time = time.perf_counter() - start
        return outputs

    @abstractmethod
    def _activate(self) -> None: ...

    @abstractmethod
    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def _close(self) -> None:
        """Release backend resources (default: nothing to release)."""
