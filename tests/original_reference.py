"""An independent re-computation of the authors' GaLR forward pass, for parity tests only.

Written straight from the formulas in galr-reference.md §4 on a state dict in the *authors'* key
layout (skip-thought GRU cell names), with plain functional ops: an explicit GRU cell loop, full
multi-head attention with its softmax, the MCAN LayerNorm formula, and ``dynamic_weight[:, 0]``
used for both fusion terms. It shares no code with ``galr.model``.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

P_RESNET = "extract_feature.resnet."


def original_layout_state(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the documented key names and shapes (galr-reference.md §5)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=None):
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
        return torch.randn(*shape, generator=g) * (scale if scale is not None else 1.0 / math.sqrt(fan_in))

    state: dict[str, torch.Tensor] = {}

    def bn(prefix, c):
        state[prefix + "weight"] = 1.0 + 0.1 * torch.randn(c, generator=g)
        state[prefix + "bias"] = 0.1 * torch.randn(c, generator=g)
        state[prefix + "running_mean"] = 0.1 * torch.randn(c, generator=g)
        state[prefix + "running_var"] = 0.5 + torch.rand(c, generator=g)
        state[prefix + "num_batches_tracked"] = torch.tensor(7)

    w = config.resnet_widths
    state[P_RESNET + "conv1.weight"] = rand(w[0], 3, 7, 7)
    bn(P_RESNET + "bn1.", w[0])
    cin = w[0]
    for layer, c in enumerate(w, start=1):
        for block in range(2):
            p = f"{P_RESNET}layer{layer}.{block}."
            state[p + "conv1.weight"] = rand(c, cin if block == 0 else c, 3, 3)
            bn(p + "bn1.", c)
            state[p + "conv2.weight"] = rand(c, c, 3, 3)
            bn(p + "bn2.", c)
            if block == 0 and layer > 1:
                state[p + "downsample.0.weight"] = rand(c, cin, 1, 1)
                bn(p + "downsample.1.", c)
        cin = c
    state[P_RESNET + "fc.weight"] = rand(1000, w[3])
    state[P_RESNET + "fc.bias"] = rand(1000, scale=0.1)
    d = config.embed_dim
    state["extract_feature.linear.weight"] = rand(d, w[3])
    state["extract_feature.linear.bias"] = rand(d, scale=0.1)
    ch = config.vsa_channels
    state["mvsa.LF_conv.weight"] = rand(ch, w[0] + w[1], 3, 3)
    state["mvsa.LF_conv.bias"] = rand(ch, scale=0.1)
    state["mvsa.HF_conv.weight"] = rand(ch, w[2] + w[3], 1, 1)
    state["mvsa.HF_conv.bias"] = rand(ch, scale=0.1)
    for name in ("conv1x1_1", "conv1x1_2"):
        state[f"mvsa.{name}.weight"] = rand(1, 2 * ch, 1, 1)
        state[f"mvsa.{name}.bias"] = rand(1, scale=0.1)
    state["mvsa.solo_attention.weight"] = rand(d, config.attention_positions)
    state["mvsa.solo_attention.bias"] = rand(d, scale=0.1)
    g1, g2, g3 = config.gcn_dims
    state["local_feature.fc1.weight"] = rand(g1, config.object_dim)
    state["local_feature.fc2.weight"] = rand(g2, g1)
    state["local_feature.fc3.weight"] = rand(g3, g2)
    state["local_feature.out.weight"] = rand(d, config.num_objects * g3)
    state["local_feature.out.bias"] = rand(d, scale=0.1)
    v, e, h = config.vocab_size, config.word_dim, config.gru_hidden
    emb = rand(v + 1, e, scale=0.5)
    emb[0] = 0.0
    state["text_feature.seq2vec.embedding.weight"] = emb
    cell = "text_feature.seq2vec.rnn.gru_cell."
    for gate in ("ir", "ii", "in"):
        state[f"{cell}weight_{gate}.weight"] = rand(h, e)
        state[f"{cell}weight_{gate}.bias"] = rand(h, scale=0.1)
    for gate in ("hr", "hi", "hn"):
        state[f"{cell}weight_{gate}.weight"] = rand(h, h)
    state["text_feature.to_out.weight"] = rand(d, h)
    state["text_feature.to_out.bias"] = rand(d, scale=0.1)

    def linear(prefix, out, inp):
        state[prefix + "weight"] = rand(out, inp)
        state[prefix + "bias"] = rand(out, scale=0.1)

    def mhatt(prefix):
        for name in ("linear_v", "linear_k", "linear_q", "linear_merge"):
            linear(f"{prefix}{name}.", d, d)

    def norm(prefix):
        state[prefix + "a_2"] = 1.0 + 0.1 * torch.randn(d, generator=g)
        state[prefix + "b_2"] = 0.1 * torch.randn(d, generator=g)

    def ffn(prefix):
        linear(prefix + "ffn.mlp.fc.linear.", config.fusion_ff, d)
        linear(prefix + "ffn.mlp.linear.", d, config.fusion_ff)

    for sa in ("l2l_SA", "g2g_SA"):
        mhatt(f"fusion.{sa}.mhatt.")
        ffn(f"fusion.{sa}.")
        norm(f"fusion.{sa}.norm1.")
        norm(f"fusion.{sa}.norm2.")
    for sga in ("g2l_SGA", "l2g_SGA"):
        mhatt(f"fusion.{sga}.mhatt1.")
        mhatt(f"fusion.{sga}.mhatt2.")
        ffn(f"fusion.{sga}.")
        for i in (1, 2, 3):
            norm(f"fusion.{sga}.norm{i}.")
    linear("fusion.dynamic_weight.0.", config.fusion_dynamic_dim, d)
    linear("fusion.dynamic_weight.3.", 2, config.fusion_dynamic_dim)
    return state


def _l2norm(x):
    return x / (x.pow(2).sum(-1, keepdim=True).sqrt() + 1e-8)


def _bn(x, s, p):
    return F.batch_norm(x, s[p + "running_mean"], s[p + "running_var"], s[p + "weight"], s[p + "bias"], False, 0.0, 1e-5)


def _resnet(x, s):
    x = F.relu(_bn(F.conv2d(x, s[P_RESNET + "conv1.weight"], stride=2, padding=3), s, P_RESNET + "bn1."))
    x = F.max_pool2d(x, 3, 2, 1)
    feats = []
    for layer in range(1, 5):
        for block in range(2):
            p = f"{P_RESNET}layer{layer}.{block}."
            stride = 2 if (block == 0 and layer > 1) else 1
            out = F.relu(_bn(F.conv2d(x, s[p + "conv1.weight"], stride=stride, padding=1), s, p + "bn1."))
            out = _bn(F.conv2d(out, s[p + "conv2.weight"], padding=1), s, p + "bn2.")
            short = x
            if p + "downsample.0.weight" in s:
                short = _bn(F.conv2d(x, s[p + "downsample.0.weight"], stride=stride), s, p + "downsample.1.")
            x = F.relu(out + short)
        feats.append(x)
    return feats


def reference_global(image, s):
    f1, f2, f3, f4 = _resnet(image, s)
    up = lambda t: t.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest x2
    lower, higher = torch.cat([f1, up(f2)], 1), torch.cat([f3, up(f4)], 1)
    solo = F.linear(f4.reshape(f4.shape[0], f4.shape[1], -1).mean(-1), s["extract_feature.linear.weight"], s["extract_feature.linear.bias"])
    lf = F.conv2d(lower, s["mvsa.LF_conv.weight"], s["mvsa.LF_conv.bias"], stride=4)
    hf = F.conv2d(higher, s["mvsa.HF_conv.weight"], s["mvsa.HF_conv.bias"])
    c = torch.cat([lf, hf], 1)
    c = hf.mean(1, keepdim=True).expand_as(c) + c
    main = F.conv2d(c, s["mvsa.conv1x1_1.weight"], s["mvsa.conv1x1_1.bias"])
    att = torch.sigmoid(F.conv2d(c, s["mvsa.conv1x1_2.weight"], s["mvsa.conv1x1_2.bias"]))
    a = (main * att).reshape(image.shape[0], -1)
    return _l2norm(solo * torch.sigmoid(F.linear(a, s["mvsa.solo_attention.weight"], s["mvsa.solo_attention.bias"])))


def reference_local(rep, adj, s):
    x = F.relu(torch.bmm(adj, rep) @ s["local_feature.fc1.weight"].t())
    x = F.relu(torch.bmm(adj, x) @ s["local_feature.fc2.weight"].t())
    x = F.relu(torch.bmm(adj, x) @ s["local_feature.fc3.weight"].t())
    return _l2norm(F.linear(x.reshape(x.shape[0], -1), s["local_feature.out.weight"], s["local_feature.out.bias"]))


def _lin(x, s, p):
    return F.linear(x, s[p + "weight"], s[p + "bias"])


def _layernorm(x, s, p):
    mean = x.mean(-1, keepdim=True)
    std = torch.sqrt(((x - mean) ** 2).sum(-1, keepdim=True) / (x.shape[-1] - 1))
    return s[p + "a_2"] * (x - mean) / (std + 1e-6) + s[p + "b_2"]


def _mhatt(v, k, q, s, p, heads):
    b, d = q.shape[0], q.shape[-1]
    hd = d // heads
    split = lambda t: t.reshape(b, -1, heads, hd).transpose(1, 2)
    vv, kk, qq = split(_lin(v, s, p + "linear_v.")), split(_lin(k, s, p + "linear_k.")), split(_lin(q, s, p + "linear_q."))
    att = torch.softmax(qq @ kk.transpose(-2, -1) / math.sqrt(hd), dim=-1)
    return _lin((att @ vv).transpose(1, 2).reshape(b, -1, d), s, p + "linear_merge.")


def _ffn(x, s, p):
    return _lin(F.relu(_lin(x, s, p + "ffn.mlp.fc.linear.")), s, p + "ffn.mlp.linear.")


def _sa(x, s, p, heads):
    x = _layernorm(x + _mhatt(x, x, x, s, p + "mhatt.", heads), s, p + "norm1.")
    return _layernorm(x + _ffn(x, s, p), s, p + "norm2.")


def _sga(x, y, s, p, heads):
    x = _layernorm(x + _mhatt(x, x, x, s, p + "mhatt1.", heads), s, p + "norm1.")
    x = _layernorm(x + _mhatt(y, y, x, s, p + "mhatt2.", heads), s, p + "norm2.")
    return _layernorm(x + _ffn(x, s, p), s, p + "norm3.")


def reference_fusion(g, l, s, heads):
    G, L = g.unsqueeze(1), l.unsqueeze(1)
    G = _sa(G, s, "fusion.g2g_SA.", heads)
    L = _sa(L, s, "fusion.l2l_SA.", heads)
    L = _sga(L, G, s, "fusion.g2l_SGA.", heads)
    G = _sga(G, L, s, "fusion.l2g_SGA.", heads)
    G, L = G.squeeze(1), L.squeeze(1)
    vg = torch.sigmoid(L) * G
    vl = G + L
    w = torch.softmax(_lin(torch.sigmoid(_lin(vg + vl, s, "fusion.dynamic_weight.0.")), s, "fusion.dynamic_weight.3."), dim=1)
    return w[:, 0:1] * vg + w[:, 0:1] * vl  # the original's [:, 0] for both weights


def reference_image(image, rep, adj, s, heads=8):
    return _l2norm(reference_fusion(reference_global(image, s), reference_local(rep, adj, s), s, heads))


def reference_text(tokens, s):
    cell = "text_feature.seq2vec.rnn.gru_cell."
    x = F.embedding(tokens, s["text_feature.seq2vec.embedding.weight"])
    lengths = [int(tokens.shape[1] - (row == 0).sum()) for row in tokens]
    h = torch.zeros(tokens.shape[0], s[cell + "weight_hr.weight"].shape[0])
    outputs = []
    for t in range(max(lengths)):
        xt = x[:, t]
        r = torch.sigmoid(_lin(xt, s, cell + "weight_ir.") + h @ s[cell + "weight_hr.weight"].t())
        z = torch.sigmoid(_lin(xt, s, cell + "weight_ii.") + h @ s[cell + "weight_hi.weight"].t())
        n = torch.tanh(_lin(xt, s, cell + "weight_in.") + r * (h @ s[cell + "weight_hn.weight"].t()))
        h = (1 - z) * n + z * h
        outputs.append(h)
    out = torch.stack(outputs, 1)
    last = torch.stack([out[i, lengths[i] - 1] for i in range(len(lengths))])
    return _l2norm(F.relu(_lin(last, s, "text_feature.to_out.")))
