"""GaLR building blocks: VSA global attention, the DREA GCN and the MIDF fusion blocks.

Parameter names follow the authors' code (``R:layers/GaLR_utils.py``) so their state dicts load
without renaming. Numeric quirks of the original are kept on purpose; each is marked ``QUIRK``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

L2_EPS = 1e-8


def l2norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``x / (||x|| + 1e-8)``: QUIRK, the original adds eps to the norm rather than clamping it."""
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + L2_EPS)


class ExtractFeature(nn.Module):
    """ResNet-18 trunk plus the multi-level feature maps and the pooled "solo" feature."""

    def __init__(self, widths: tuple[int, int, int, int], embed_dim: int) -> None:
        super().__init__()
        from galr.model.resnet import ResNet18

        self.resnet = ResNet18(widths)
        self.linear = nn.Linear(widths[3], embed_dim)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f1, f2, f3, f4 = self.resnet(image)
        lower = torch.cat([f1, F.interpolate(f2, scale_factor=2.0, mode="nearest")], dim=1)
        higher = torch.cat([f3, F.interpolate(f4, scale_factor=2.0, mode="nearest")], dim=1)
        solo = self.linear(f4.flatten(2).mean(dim=-1))  # no activation, as in the original
        return lower, higher, solo


class VSAModule(nn.Module):
    """The multi-level visual self-attention ("MVSA") that turns the maps into the global feature."""

    def __init__(self, lower_channels: int, higher_channels: int, channels: int, positions: int, embed_dim: int) -> None:
        super().__init__()
        self.LF_conv = nn.Conv2d(lower_channels, channels, kernel_size=3, stride=4, padding=0)
        self.HF_conv = nn.Conv2d(higher_channels, channels, kernel_size=1)
        self.conv1x1_1 = nn.Conv2d(2 * channels, 1, kernel_size=1)
        self.conv1x1_2 = nn.Conv2d(2 * channels, 1, kernel_size=1)
        self.solo_attention = nn.Linear(positions, embed_dim)

    def forward(self, lower: torch.Tensor, higher: torch.Tensor, solo: torch.Tensor) -> torch.Tensor:
        low = self.LF_conv(lower)
        high = self.HF_conv(higher)
        concat = torch.cat([low, high], dim=1)
        # The mean of the high-level channels is broadcast onto all channels (a residual).
        concat = concat + high.mean(dim=1, keepdim=True)
        main = self.conv1x1_1(concat)
        attention = torch.sigmoid(self.conv1x1_2(concat))
        attended = (main * attention).flatten(1)
        return l2norm(solo * torch.sigmoid(self.solo_attention(attended)))


class GCN(nn.Module):
    """Three graph convolutions ``relu(fc(A @ X))`` over the DREA matrices, then a linear read-out.

    QUIRK: the adjacency is used raw (no self-loops, no D^-1/2 normalisation), as the original.
    """

    def __init__(self, num_objects: int, object_dim: int, dims: tuple[int, int, int], embed_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(object_dim, dims[0], bias=False)
        self.fc2 = nn.Linear(dims[0], dims[1], bias=False)
        self.fc3 = nn.Linear(dims[1], dims[2], bias=False)
        self.out = nn.Linear(num_objects * dims[2], embed_dim)

    def forward(self, rep: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(torch.bmm(adj, rep)))
        x = torch.relu(self.fc2(torch.bmm(adj, x)))
        x = torch.relu(self.fc3(torch.bmm(adj, x)))
        return l2norm(self.out(x.flatten(1)))


class LayerNorm(nn.Module):
    """MCAN's LayerNorm. QUIRK: unbiased std (N-1) with eps added to the std, unlike nn.LayerNorm."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.a_2 = nn.Parameter(torch.ones(size))
        self.b_2 = nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)  # torch's default is the unbiased estimate, as the original
        return self.a_2 * (x - mean) / (std + self.eps) + self.b_2


class FC(nn.Module):
    def __init__(self, in_size: int, out_size: int, dropout: float) -> None:
        super().__init__()
        self.linear = nn.Linear(in_size, out_size)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.relu(self.linear(x)))


class MLP(nn.Module):
    def __init__(self, in_size: int, mid_size: int, out_size: int, dropout: float) -> None:
        super().__init__()
        self.fc = FC(in_size, mid_size, dropout)
        self.linear = nn.Linear(mid_size, out_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.fc(x))


class FFN(nn.Module):
    def __init__(self, hidden: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.mlp = MLP(hidden, ff, hidden, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class MHAtt(nn.Module):
    """Multi-head attention ``MHAtt(v, k, q)`` of MCAN."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.linear_v = nn.Linear(hidden, hidden)
        self.linear_k = nn.Linear(hidden, hidden)
        self.linear_q = nn.Linear(hidden, hidden)
        self.linear_merge = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, v: torch.Tensor, k: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        if not self.training and k.shape[1] == 1:
            # QUIRK: GaLR attends over length-1 sequences; softmax over one key is exactly 1,
            # so at inference the block is linear_merge(linear_v(v)) and q/k have no effect.
            return self.linear_merge(self.linear_v(v))
        batch, hidden = q.shape[0], q.shape[-1]
        head_dim = hidden // self.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, self.heads, head_dim).transpose(1, 2)

        value, key, query = split(self.linear_v(v)), split(self.linear_k(k)), split(self.linear_q(q))
        scores = query @ key.transpose(-2, -1) / math.sqrt(head_dim)
        attention = self.dropout(torch.softmax(scores, dim=-1))
        merged = (attention @ value).transpose(1, 2).reshape(batch, -1, hidden)
        return self.linear_merge(merged)


class SA(nn.Module):
    """Self-attention block: ``x = LN1(x + MHAtt(x,x,x)); x = LN2(x + FFN(x))``."""

    def __init__(self, hidden: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.mhatt = MHAtt(hidden, heads, dropout)
        self.ffn = FFN(hidden, ff, dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = LayerNorm(hidden)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout1(self.mhatt(x, x, x)))
        return self.norm2(x + self.dropout2(self.ffn(x)))


class SGA(nn.Module):
    """Self-guided attention: self-attention on ``x``, then attention from ``x`` to the guide ``y``."""

    def __init__(self, hidden: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.mhatt1 = MHAtt(hidden, heads, dropout)
        self.mhatt2 = MHAtt(hidden, heads, dropout)
        self.ffn = FFN(hidden, ff, dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = LayerNorm(hidden)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = LayerNorm(hidden)
        self.dropout3 = nn.Dropout(dropout)
        self.norm3 = LayerNorm(hidden)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout1(self.mhatt1(x, x, x)))
        x = self.norm2(x + self.dropout2(self.mhatt2(y, y, x)))
        return self.norm3(x + self.dropout3(self.ffn(x)))


class FusionMIDF(nn.Module):
    """MIDF: refine the global and local features against each other, then a gated sum."""

    def __init__(self, hidden: int, heads: int, ff: int, dynamic_dim: int, dropout: float = 0.1,
                 dynamic_dropout: float = 0.2) -> None:
        super().__init__()
        self.l2l_SA = SA(hidden, heads, ff, dropout)
        self.g2g_SA = SA(hidden, heads, ff, dropout)
        self.g2l_SGA = SGA(hidden, heads, ff, dropout)
        self.l2g_SGA = SGA(hidden, heads, ff, dropout)
        self.dynamic_weight = nn.Sequential(
            nn.Linear(hidden, dynamic_dim), nn.Sigmoid(), nn.Dropout(dynamic_dropout),
            nn.Linear(dynamic_dim, 2), nn.Softmax(dim=1),
        )

    def forward(self, global_feature: torch.Tensor, local_feature: torch.Tensor) -> torch.Tensor:
        g = self.g2g_SA(global_feature.unsqueeze(1))
        l = self.l2l_SA(local_feature.unsqueeze(1))  # noqa: E741 - the paper's name
        l = self.g2l_SGA(l, g)  # noqa: E741
        # QUIRK: sequential, the global supplement is guided by the *already corrected* local feature.
        g = self.l2g_SGA(g, l)
        g, l = g.squeeze(1), l.squeeze(1)  # noqa: E741
        corrected_global = torch.sigmoid(l) * g
        supplemented_local = g + l
        weight = self.dynamic_weight(corrected_global + supplemented_local)
        # QUIRK: the original uses weight[:, 0] for both terms (R:layers/GaLR.py:72,75); the
        # per-sample scalar then cancels under the cosine. Kept so trained checkpoints give the same numbers.
        return weight[:, :1] * corrected_global + weight[:, :1] * supplemented_local


class TextEncoder(nn.Module):
    """Skip-thought text encoder: word embedding, uni-directional GRU, last real step, Linear + ReLU.

    The authors' ``BayesianUniSkip`` GRU cell has no hidden-to-hidden biases; ``nn.GRU`` with
    ``bias_hh`` fixed at zero computes exactly the same cell (gate order r, z, n).
    """

    def __init__(self, vocab_size: int, word_dim: int, hidden: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size + 1, word_dim, padding_idx=0)
        self.gru = nn.GRU(word_dim, hidden, batch_first=True)
        nn.init.zeros_(self.gru.bias_hh_l0)
        self.gru.bias_hh_l0.requires_grad_(False)
        self.to_out = nn.Linear(hidden, embed_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        outputs, _ = self.gru(self.embedding(tokens))
        # QUIRK: the length is recomputed as the count of non-zero ids (the original ignores the
        # lengths it is given); a 0-length row selects the last step, as index -1 does there.
        lengths = (tokens != 0).sum(dim=1)
        last = torch.where(lengths > 0, lengths - 1, torch.full_like(lengths, tokens.shape[1] - 1))
        index = last.view(-1, 1, 1).expand(-1, 1, outputs.shape[-1])
        hidden_last = outputs.gather(1, index).squeeze(1)
        return torch.relu(self.to_out(hidden_last))
