"""The preprocessing facts of one model, resolved once and carried by every artifact.

A model is only correct with the preprocessing it was trained with: input size and normalisation,
the DREA settings that turn detections into its local input, and the longest caption the tokenizer
keeps. :class:`PreprocessSpec` holds all three. It is resolved when a checkpoint is loaded
(:meth:`PreprocessSpec.for_model` fills what an older or an authors' checkpoint does not say from
the model's own dimensions), stored in the checkpoint and in the bundle's manifest, and read back
from there by every consumer: training, evaluation, export, calibration, the runtime. Nobody
re-derives a default.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Mapping

from galr.errors import InputError
from galr.preprocess.drea import DREAConfig
from galr.preprocess.image import ImagePreprocessConfig
from galr.preprocess.text import (
    DEFAULT_MAX_TEXT_LENGTH,
    PAD_ID,
    PUNCTUATION,
    Tokenizer,
    Vocabulary,
)

if TYPE_CHECKING:
    from galr.config import GaLRConfig

# Manifest / checkpoint keys of the three parts.
IMAGE_KEY, DREA_KEY, TEXT_KEY = "preprocess", "drea", "tokenizer"


@dataclass(frozen=True)
class PreprocessSpec:
    """How raw inputs become graph inputs for one model.

    Attributes:
        image: decode, resize and normalisation of images.
        drea: how detections become the local branch's ``local_rep`` / ``local_adj``.
        max_text_length: longest caption, in tokens; longer ones keep their first tokens (warned).
    """

    image: ImagePreprocessConfig = field(default_factory=ImagePreprocessConfig)
    drea: DREAConfig = field(default_factory=DREAConfig)
    max_text_length: int = DEFAULT_MAX_TEXT_LENGTH

    def __post_init__(self) -> None:
        if isinstance(self.max_text_length, bool) or not isinstance(self.max_text_length, int) \
                or self.max_text_length < 1:
            raise InputError(f"max_text_length must be a positive integer, got {self.max_text_length!r}")

    @classmethod
    def for_model(cls, config: "GaLRConfig", image: Mapping[str, Any] | None = None,
                  drea: Mapping[str, Any] | None = None, max_text_length: int | None = None) -> "PreprocessSpec":
        """The spec of a model, from what its checkpoint stored; missing parts follow the model.

        Args:
            config: the model's dimensions (image size, DREA objects per image).
            image: stored ``ImagePreprocessConfig.to_dict()``, or ``None``: the original transform at
                the model's input size.
            drea: stored ``DREAConfig.to_dict()``, or ``None``: galr's DREA defaults with the model's
                number of objects.
            max_text_length: stored token cap, or ``None``: :data:`DEFAULT_MAX_TEXT_LENGTH`.

        Raises:
            ValueError: a stored part is malformed, or resizes to another size than the model takes.
        """
        image_config = ImagePreprocessConfig.from_dict(dict(image)) if image else \
            ImagePreprocessConfig(size=config.image_size)
        if image_config.size != config.image_size:
            raise InputError(f"the preprocessing resizes to {image_config.size} px but the model takes "
                             f"{config.image_size} px")
        drea_config = DREAConfig.from_dict(dict(drea)) if drea else DREAConfig(num_objects=config.num_objects)
        return cls(image_config, drea_config, DEFAULT_MAX_TEXT_LENGTH if max_text_length is None else max_text_length)

    def with_max_text_length(self, max_text_length: int | None) -> "PreprocessSpec":
        """This spec with another token cap (``None`` keeps the current one)."""
        return self if max_text_length is None else replace(self, max_text_length=max_text_length)

    def tokenizer(self, vocab: Vocabulary) -> Tokenizer:
        """The tokenizer of this spec over ``vocab``."""
        return Tokenizer(vocab, max_length=self.max_text_length)

    def to_dict(self) -> dict[str, Any]:
        """The three parts under their manifest/checkpoint keys (the tokenizer part self-describing)."""
        return {
            IMAGE_KEY: self.image.to_dict(),
            DREA_KEY: self.drea.to_dict(),
            TEXT_KEY: {"max_length": self.max_text_length, "lowercase": True,
                       "sentence_split": "punkt (untrained parameters)", "word_tokenizer": "NLTKWordTokenizer",
                       "punctuation_removed": list(PUNCTUATION), "pad_id": PAD_ID,
                       "truncation": "keep the first max_length tokens"},
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "PreprocessSpec":
        """Inverse of :meth:`to_dict` (other keys of ``values`` are ignored: a manifest has many).

        Raises:
            ValueError: a part is missing or malformed.
        """
        missing = [key for key in (IMAGE_KEY, DREA_KEY, TEXT_KEY) if not isinstance(values.get(key), Mapping)]
        if missing:
            raise InputError(f"the preprocessing parts {missing} are missing or not objects")
        max_length = values[TEXT_KEY].get("max_length")
        try:
            return cls(ImagePreprocessConfig.from_dict(dict(values[IMAGE_KEY])),
                       DREAConfig.from_dict(dict(values[DREA_KEY])), max_length)
        except TypeError as exc:  # a wrong type inside a part
            raise InputError(str(exc)) from None


__all__ = ["DREA_KEY", "IMAGE_KEY", "TEXT_KEY", "PreprocessSpec"]
