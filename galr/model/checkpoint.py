"""Checkpoint I/O: the authors' ``.pth.tar`` files and galr's own self-describing format.

Authors' files (``R:train.py``) hold ``{'model': state_dict, 'epoch', 'best_rsum', 'options', ...}``;
the state dict uses their module names, which :class:`~galr.model.galr.GaLR` keeps, except the
skip-thought GRU (``text_feature.seq2vec.rnn.gru_cell.weight_{ir,ii,in,hr,hi,hn}``), which is
mapped onto ``nn.GRU``. Model dimensions are read from the weights, not from the options.

galr's own format adds everything a deployment needs to reproduce the preprocessing: the config,
the vocabulary and the :class:`~galr.preprocess.spec.PreprocessSpec` (image preprocessing, DREA
settings, token cap). Both formats come back as a :class:`LoadedCheckpoint` whose spec is resolved
here, once; an authors' checkpoint gets the original preprocessing at its model's sizes.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from galr.atomic import atomic_output
from galr.config import GaLRConfig
from galr.errors import InputError
from galr.model.galr import GaLR
from galr.preprocess.spec import DREA_KEY, IMAGE_KEY, TEXT_KEY, PreprocessSpec
from galr.preprocess.text import Vocabulary

FORMAT_NAME = "galr-checkpoint"
FORMAT_VERSION = 1

_ORIGINAL_GRU = "text_feature.seq2vec.rnn.gru_cell."
_ORIGINAL_EMBEDDING = "text_feature.seq2vec.embedding.weight"
_GATES_INPUT = ("weight_ir", "weight_ii", "weight_in")  # r, z ("ii" is the update gate), n
_GATES_HIDDEN = ("weight_hr", "weight_hi", "weight_hn")


class CheckpointError(InputError):
    """A checkpoint cannot be read or does not fit the model/vocabulary it is used with."""


@dataclass
class LoadedCheckpoint:
    """A model with everything that travelled with it.

    Attributes:
        model: the GaLR model in eval mode on the CPU.
        vocab: the vocabulary (given by the caller for authors' checkpoints).
        source_format: ``"galr"`` or ``"original"``.
        spec: the preprocessing that goes with these weights; ``None`` resolves the model's defaults
            (:meth:`PreprocessSpec.for_model`).
        metadata: free-form provenance (epoch, training data, metrics...).
    """

    model: GaLR
    vocab: Vocabulary
    source_format: str
    spec: PreprocessSpec = None  # type: ignore[assignment]  # resolved in __post_init__
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.spec is None:
            self.spec = PreprocessSpec.for_model(self.model.config)


def _read(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # weights_only: never execute pickled code from a downloaded file; map_location: files
        # saved from CUDA tensors (all of the authors') load on CPU-only machines.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types (UnpicklingError, RuntimeError, EOFError)
        raise CheckpointError(f"{path}: cannot be read as a galr or GaLR checkpoint: {_load_failure(exc)}") from None


def _load_failure(exc: BaseException) -> str:
    """What torch's refusal means, in one sentence (its own text advises turning the safety off)."""
    message = str(exc)
    blocked = re.search(r"GLOBAL (\S+)", message)
    if blocked:
        return (f"it asks to run code ({blocked.group(1).rstrip('.,;')}), which galr never does; only tensors and "
                "plain Python values are loaded. Do not load this file with weights_only=False unless you trust "
                "its source")
    if "Weights only load failed" in message:  # torch's preamble; the unpickler's own words follow
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\n", message)
        return (f"the pickle inside is not one galr can read ({detail.group(1).strip() if detail else 'refused'}); "
                "is it a complete checkpoint file?")
    first = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
    return f"{type(exc).__name__}: {first}; is it a complete checkpoint file?"


def _shape(state: Mapping[str, torch.Tensor], key: str, path: Path) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{path}: key '{key}' is missing; this is not a GaLR checkpoint")
    return tuple(state[key].shape)


def config_from_original_state(state: Mapping[str, torch.Tensor], path: Path, options: Mapping | None = None) -> GaLRConfig:
    """Model dimensions read from an authors' state dict (GRU keys in their original names)."""
    embedding_rows, word_dim = _shape(state, _ORIGINAL_EMBEDDING, path)
    gru_hidden = _shape(state, _ORIGINAL_GRU + "weight_ir.weight", path)[0]
    embed_dim = _shape(state, "text_feature.to_out.weight", path)[0]
    widths = tuple(_shape(state, f"extract_feature.resnet.layer{i}.0.conv1.weight", path)[0] for i in range(1, 5))
    fc1_out, object_dim = _shape(state, "local_feature.fc1.weight", path)
    fc2_out = _shape(state, "local_feature.fc2.weight", path)[0]
    fc3_out = _shape(state, "local_feature.fc3.weight", path)[0]
    readout_in = _shape(state, "local_feature.out.weight", path)[1]
    positions = _shape(state, "mvsa.solo_attention.weight", path)[1]
    side = math.isqrt(positions)
    if side * side != positions or readout_in % fc3_out:
        raise CheckpointError(f"{path}: inconsistent VSA/GCN shapes ({positions} positions, read-out {readout_in})")
    heads = 8  # not recoverable from weights; the authors' YAML fixes 8 (irrelevant at inference: length-1 attention)
    if options:
        heads = int(options.get("fusion", {}).get("mca_MULTI_HEAD", heads))
    return GaLRConfig(
        vocab_size=embedding_rows - 1, embed_dim=embed_dim, word_dim=word_dim, gru_hidden=gru_hidden,
        num_objects=readout_in // fc3_out, object_dim=object_dim, gcn_dims=(fc1_out, fc2_out, fc3_out),
        image_size=side * 16, resnet_widths=widths,  # type: ignore[arg-type]
        vsa_channels=_shape(state, "mvsa.LF_conv.weight", path)[0], fusion_heads=heads,
        fusion_ff=_shape(state, "fusion.g2g_SA.ffn.mlp.fc.linear.weight", path)[0],
        fusion_dynamic_dim=_shape(state, "fusion.dynamic_weight.0.weight", path)[0],
    )


def convert_original_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the skip-thought GRU cell onto ``nn.GRU``; every other key is unchanged."""
    converted = {k: v for k, v in state.items() if not k.startswith("text_feature.seq2vec.")}
    converted["text_feature.embedding.weight"] = state[_ORIGINAL_EMBEDDING]
    converted["text_feature.gru.weight_ih_l0"] = torch.cat([state[f"{_ORIGINAL_GRU}{g}.weight"] for g in _GATES_INPUT])
    converted["text_feature.gru.bias_ih_l0"] = torch.cat([state[f"{_ORIGINAL_GRU}{g}.bias"] for g in _GATES_INPUT])
    weight_hh = torch.cat([state[f"{_ORIGINAL_GRU}{g}.weight"] for g in _GATES_HIDDEN])
    converted["text_feature.gru.weight_hh_l0"] = weight_hh
    # BayesianGRUCell has no hidden biases; nn.GRU's are fixed at zero.
    converted["text_feature.gru.bias_hh_l0"] = torch.zeros(weight_hh.shape[0], dtype=weight_hh.dtype)
    return converted


def check_vocabulary(config: GaLRConfig, vocab: Vocabulary, source: str) -> None:
    """Raise if the vocabulary's ids do not index this model's word embedding."""
    if vocab.max_id != config.vocab_size:
        raise CheckpointError(
            f"{source}: the word embedding has {config.vocab_size + 1} rows ({config.vocab_size} words + padding) "
            f"but the vocabulary has ids up to {vocab.max_id} ({len(vocab)} words). A checkpoint only works "
            "with the vocabulary it was trained with: pass that vocab.json (e.g. rsitmd vs rsicd)."
        )


def _model_from_state(config: GaLRConfig, state: Mapping[str, torch.Tensor], source: str) -> GaLR:
    model = GaLR(config)
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match GaLR: missing {sorted(missing)[:6]}, unexpected {sorted(unexpected)[:6]}"
        )
    return model.eval()


def load_checkpoint(path: str | os.PathLike, vocab: Vocabulary | str | os.PathLike | None = None) -> LoadedCheckpoint:
    """Load a galr checkpoint or an authors' ``.pth.tar`` (``{'model': state_dict, ...}``).

    Args:
        path: the checkpoint file.
        vocab: required for authors' checkpoints (a :class:`Vocabulary` or the path of their
            ``*_splits_vocab.json``); for galr checkpoints it overrides the stored vocabulary.

    Raises:
        CheckpointError: unreadable file, unknown layout, shape mismatch, or wrong vocabulary size.
    """
    path = Path(path)
    payload = _read(path)
    if isinstance(vocab, (str, os.PathLike)):
        vocab = Vocabulary.load(vocab)
    if isinstance(payload, dict) and payload.get("format") == FORMAT_NAME:
        version = payload.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{path}: galr checkpoint format {version} is not supported (expected {FORMAT_VERSION})")
        config = GaLRConfig.from_dict(payload["config"])
        vocab = vocab or Vocabulary.from_json_dict(payload["vocab"], source=str(path))
        check_vocabulary(config, vocab, str(path))
        model = _model_from_state(config, payload["state_dict"], str(path))
        text = payload.get(TEXT_KEY) or {}
        try:
            spec = PreprocessSpec.for_model(config, payload.get(IMAGE_KEY), payload.get(DREA_KEY),
                                            text.get("max_length") if isinstance(text, dict) else None)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: its stored preprocessing is invalid ({exc})") from None
        return LoadedCheckpoint(model, vocab, "galr", spec, dict(payload.get("metadata") or {}))

    state = payload.get("model", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: neither a galr checkpoint nor an authors' checkpoint with a 'model' state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from nn.DataParallel
    if vocab is None:
        raise CheckpointError(
            f"{path}: an authors' checkpoint does not contain its vocabulary; pass vocab= (their "
            "vocab/rsitmd_splits_vocab.json or rsicd_splits_vocab.json)"
        )
    options = payload.get("options") if isinstance(payload.get("options"), dict) else None
    config = config_from_original_state(state, path, options)
    check_vocabulary(config, vocab, str(path))
    model = _model_from_state(config, convert_original_state(state), str(path))
    metadata = {k: payload[k] for k in ("epoch", "best_rsum", "arch") if k in payload}
    return LoadedCheckpoint(model, vocab, "original", metadata=metadata)


def save_checkpoint(
    path: str | os.PathLike,
    model: GaLR,
    vocab: Vocabulary,
    spec: PreprocessSpec | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write galr's self-describing checkpoint atomically (a crash never leaves a partial file).

    Args:
        path: the file to write.
        model: the model.
        vocab: its vocabulary.
        spec: its preprocessing; ``None`` stores the model's defaults (:meth:`PreprocessSpec.for_model`).
        metadata: free-form provenance.
    """
    path = Path(path)
    check_vocabulary(model.config, vocab, "save_checkpoint")
    spec = spec or PreprocessSpec.for_model(model.config)
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "vocab": vocab.to_json_dict(),
        **spec.to_dict(),
        "metadata": dict(metadata or {}),
    }
    with atomic_output(path) as handle:
        torch.save(payload, handle)
    return path
