"""The GaLR model: an image tower (global VSA + local GCN fused by MIDF) and a text tower."""

from __future__ import annotations

import torch
from torch import nn

from galr.config import GaLRConfig
from galr.errors import InputError
from galr.model.layers import (
    GCN,
    ExtractFeature,
    FusionMIDF,
    TextEncoder,
    VSAModule,
    l2norm,
)


class GaLR(nn.Module):
    """GaLR dual encoder (Yuan et al., IEEE TGRS 2022), numerically equal to the authors' code.

    Sub-module names match the authors' ``BaseModel`` (``extract_feature``, ``mvsa``,
    ``local_feature``, ``fusion``, ``text_feature``), so their checkpoints load with only the
    GRU renamed (see :mod:`galr.model.checkpoint`).

    Both towers return L2-normalised embeddings, so ``encode_image(...) @ encode_text(...).T``
    is the original cosine similarity matrix.
    """

    def __init__(self, config: GaLRConfig = GaLRConfig()) -> None:
        super().__init__()
        self.config = config
        w = config.resnet_widths
        self.extract_feature = ExtractFeature(w, config.embed_dim)
        self.mvsa = VSAModule(w[0] + w[1], w[2] + w[3], config.vsa_channels, config.attention_positions, config.embed_dim)
        self.local_feature = GCN(config.num_objects, config.object_dim, config.gcn_dims, config.embed_dim)
        self.text_feature = TextEncoder(config.vocab_size, config.word_dim, config.gru_hidden, config.embed_dim)
        self.fusion = FusionMIDF(config.embed_dim, config.fusion_heads, config.fusion_ff, config.fusion_dynamic_dim)

    # The three image-side stages are separate methods because they are exported as separate graphs.
    def encode_global(self, image: torch.Tensor) -> torch.Tensor:
        """Global feature [B, D] (unit norm) of normalised images [B, 3, S, S]."""
        lower, higher, solo = self.extract_feature(image)
        return self.mvsa(lower, higher, solo)

    def encode_local(self, local_rep: torch.Tensor, local_adj: torch.Tensor) -> torch.Tensor:
        """Local feature [B, D] (unit norm) of DREA matrices [B, N, F] and [B, N, N]."""
        return self.local_feature(local_rep, local_adj)

    def fuse(self, global_feature: torch.Tensor, local_feature: torch.Tensor) -> torch.Tensor:
        """MIDF fusion of the two features into the L2-normalised image embedding [B, D]."""
        return l2norm(self.fusion(global_feature, local_feature))

    def encode_image(self, image: torch.Tensor, local_rep: torch.Tensor, local_adj: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [B, D]."""
        return self.fuse(self.encode_global(image), self.encode_local(local_rep, local_adj))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised caption embeddings [B, D] of right-padded token ids [B, T] (0 = padding)."""
        return l2norm(self.text_feature(tokens))

    def forward(self, image: torch.Tensor, local_rep: torch.Tensor, local_adj: torch.Tensor,
                tokens: torch.Tensor) -> torch.Tensor:
        """Cosine similarity matrix [B_img, B_txt], as the original ``BaseModel.forward``."""
        return self.encode_image(image, local_rep, local_adj) @ self.encode_text(tokens).t()

    def load_backbone_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load an ImageNet ResNet-18 state dict (torchvision key names) into the image trunk.

        Raises:
            ValueError: when keys or shapes do not match ResNet-18 at this model's widths.
        """
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
        resnet = self.extract_feature.resnet
        own = resnet.state_dict()
        missing = sorted(set(own) - set(state_dict))
        if missing:
            raise InputError(f"backbone weights are not a ResNet-18 state dict: missing {missing[:5]}...")
        for key, value in own.items():
            if state_dict[key].shape != value.shape:
                raise InputError(
                    f"backbone weight '{key}' has shape {tuple(state_dict[key].shape)}, the model needs "
                    f"{tuple(value.shape)} (resnet_widths={self.config.resnet_widths})"
                )
        resnet.load_state_dict({k: state_dict[k] for k in own})

