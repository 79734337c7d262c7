"""GaLR in PyTorch against an independent re-computation of the authors' formulas."""

from __future__ import annotations

import pytest
import torch

from galr.config import GaLRConfig
from galr.model import GaLR
from galr.model.checkpoint import convert_original_state
from galr.model.layers import LayerNorm, MHAtt, l2norm
from tests.original_reference import (
    original_layout_state,
    reference_image,
    reference_text,
)

torch.set_grad_enabled(False)


def _model_and_state(config: GaLRConfig, seed: int = 0):
    state = original_layout_state(config, seed)
    model = GaLR(config)
    model.load_state_dict(convert_original_state(state))
    return model.eval(), state


def _inputs(config: GaLRConfig, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, config.image_size, config.image_size, generator=g)
    rep = torch.rand(batch, config.num_objects, config.object_dim, generator=g)
    adj = torch.rand(batch, config.num_objects, config.num_objects, generator=g) / config.num_objects
    tokens = torch.tensor([[4, 9, 2, 7, 1], [3, 3, 0, 0, 0], [config.vocab_size, 5, 6, 0, 0]])[:batch]
    return image, rep, adj, tokens


def test_small_model_matches_reference_formulas():
    config = GaLRConfig.small()
    model, state = _model_and_state(config)
    image, rep, adj, tokens = _inputs(config)
    torch.testing.assert_close(model.encode_image(image, rep, adj), reference_image(image, rep, adj, state, config.fusion_heads), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.encode_text(tokens), reference_text(tokens, state), atol=1e-5, rtol=0)


def test_full_size_model_matches_reference_formulas():
    config = GaLRConfig()
    model, state = _model_and_state(config, seed=3)
    image, rep, adj, tokens = _inputs(config, batch=2)
    torch.testing.assert_close(model.encode_image(image, rep, adj), reference_image(image, rep, adj, state), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.encode_text(tokens), reference_text(tokens, state), atol=1e-5, rtol=0)
    sims = model(image, rep, adj, tokens)
    assert sims.shape == (2, 2)
    assert torch.all(sims.abs() <= 1 + 1e-6)


def test_embeddings_are_unit_norm_and_similarity_is_their_product():
    config = GaLRConfig.small()
    model, _ = _model_and_state(config)
    image, rep, adj, tokens = _inputs(config)
    img, txt = model.encode_image(image, rep, adj), model.encode_text(tokens)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(txt.norm(dim=1), torch.ones(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(model(image, rep, adj, tokens), img @ txt.T)


# --- quirks of the original, pinned so nobody "fixes" them silently -------------------------------


def test_quirk_length_one_attention_ignores_query_and_key():
    att = MHAtt(16, 4, 0.1).eval()
    x, y = torch.randn(2, 1, 16), torch.randn(2, 1, 16)
    before = att(y, y, x)
    torch.nn.init.normal_(att.linear_q.weight)
    torch.nn.init.normal_(att.linear_k.weight)
    torch.testing.assert_close(att(y, y, x), before)
    torch.testing.assert_close(before, att.linear_merge(att.linear_v(y)))


def test_quirk_dynamic_weight_column_zero_scales_both_terms_and_cancels():
    torch.manual_seed(0)  # its own draws: the outcome must not depend on which tests ran before
    config = GaLRConfig.small()
    model, _ = _model_and_state(config)
    g, l = l2norm(torch.randn(2, config.embed_dim)), l2norm(torch.randn(2, config.embed_dim))
    fused = model.fusion(g, l)
    # Changing the dynamic-weight MLP rescales each row but never changes its direction. (A large
    # std, e.g. 3, drives the softmax weight to ~1e-10: the row then falls under l2norm's epsilon and
    # its direction is lost to rounding; 0.5 changes the scale clearly and stays well above it.)
    torch.nn.init.normal_(model.fusion.dynamic_weight[3].weight, std=0.5)
    fused_other = model.fusion(g, l)
    assert not torch.allclose(fused, fused_other)
    torch.testing.assert_close(l2norm(fused), l2norm(fused_other), atol=1e-6, rtol=0)


def test_quirk_fusion_softmax_is_over_the_two_weights():
    config = GaLRConfig.small()
    model, _ = _model_and_state(config)
    softmax = model.fusion.dynamic_weight[4]
    assert isinstance(softmax, torch.nn.Softmax) and softmax.dim == 1
    weights = model.fusion.dynamic_weight(torch.randn(5, config.embed_dim))
    assert weights.shape == (5, 2)
    torch.testing.assert_close(weights.sum(1), torch.ones(5))


def test_quirk_layernorm_uses_unbiased_std_plus_eps():
    norm = LayerNorm(4)
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    unbiased = torch.tensor(2.160246899)  # sqrt(var * 4 / 3)
    expected = (x - 3.0) / (unbiased + 1e-6)
    torch.testing.assert_close(norm(x), expected)
    assert not torch.allclose(norm(x), torch.nn.functional.layer_norm(x, (4,)), atol=1e-3)


def test_quirk_last_token_is_chosen_by_count_of_nonzero_ids():
    config = GaLRConfig.small()
    model, state = _model_and_state(config)
    padded = model.encode_text(torch.tensor([[4, 9, 2, 0, 0, 0]]))
    torch.testing.assert_close(padded, model.encode_text(torch.tensor([[4, 9, 2]])))
    # An id 0 inside a caption shortens its "length" (the original counts zeros), so the
    # state after token 2 of [4, 0, 9] is read (an index, not the padding mask, decides).
    gap = model.encode_text(torch.tensor([[4, 0, 9]]))
    torch.testing.assert_close(gap, reference_text(torch.tensor([[4, 0, 9]]), state), atol=1e-5, rtol=0)
    assert not torch.allclose(gap, model.encode_text(torch.tensor([[4, 9]])))


def test_quirk_gru_has_no_hidden_biases():
    model = GaLR(GaLRConfig.small())
    assert torch.count_nonzero(model.text_feature.gru.bias_hh_l0) == 0
    assert not model.text_feature.gru.bias_hh_l0.requires_grad


def test_quirk_l2norm_adds_eps_to_the_norm():
    assert torch.equal(l2norm(torch.zeros(1, 3)), torch.zeros(1, 3))
    x = torch.tensor([[3.0, 4.0]])
    torch.testing.assert_close(l2norm(x), x / (5.0 + 1e-8))


def test_text_output_is_non_negative_after_relu():
    model, _ = _model_and_state(GaLRConfig.small())
    assert torch.all(model.text_feature(torch.tensor([[3, 4, 5]])) >= 0)


def test_backbone_weights_load_and_mismatch_is_reported():
    model = GaLR(GaLRConfig.small())
    donor = GaLR(GaLRConfig.small()).extract_feature.resnet.state_dict()
    model.load_backbone_weights({"module." + k: v for k, v in donor.items()})
    torch.testing.assert_close(model.extract_feature.resnet.conv1.weight, donor["conv1.weight"])
    wide = GaLR(GaLRConfig.small(resnet_widths=(16, 32, 64, 128))).extract_feature.resnet.state_dict()
    with pytest.raises(ValueError, match="resnet_widths"):
        model.load_backbone_weights(wide)


def test_config_validation_and_round_trip():
    config = GaLRConfig.small()
    assert GaLRConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="multiple of 32"):
        GaLRConfig(image_size=250)
    with pytest.raises(ValueError, match="unknown"):
        GaLRConfig.from_dict({**config.to_dict(), "bogus": 1})
