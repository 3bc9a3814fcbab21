"""utils/mask_dit/nextdit.py: the mask-conditioned NextDiT, its presets and pretrained-weight loading."""

import json

import pytest
import torch

from utils.mask_dit.nextdit import (MODEL_PRESETS, MaskNextDiT2DModel, build_mask_nextdit, count_parameters,
                                    diffusers_to_original_keys, is_mask_dit_dir, load_pretrained_nextdit)


def tiny(**overrides):
    torch.manual_seed(0)
    return build_mask_nextdit("tiny", in_channels=3, mask_channels=2, **overrides)


def randomize(model, scale=0.1):
    """Perturb every weight, so zero-initialised gates / heads do not hide bugs."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def test_forward_backward_shapes():
    model = randomize(tiny(caption_dim=16))
    x = torch.randn(2, 3, 16, 24)  # non-square works: RoPE is built per grid
    mask = torch.rand(2, 2, 64, 96).round()  # any mask size: resized to the grid
    caption, caption_mask = torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = model(x, torch.rand(2), mask, caption, caption_mask)
    assert out.shape == x.shape
    out.pow(2).mean().backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_wrong_mask_channels_is_a_clear_error():
    model = tiny()
    with pytest.raises(ValueError, match=r"\[B, 2, H, W\]"):
        model(torch.randn(1, 3, 8, 8), torch.rand(1), torch.rand(1, 1, 8, 8))


def test_fresh_model_ignores_mask_until_trained():
    model = randomize(tiny())
    model.zero_mask_columns()
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    a = model(x, t, torch.zeros(2, 2, 16, 16))
    b = model(x, t, torch.ones(2, 2, 16, 16))
    c = model(x, t, None)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_mask_changes_output_once_columns_are_nonzero():
    model = randomize(tiny())
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    assert not torch.allclose(model(x, t, torch.zeros(2, 2, 16, 16)), model(x, t, torch.ones(2, 2, 16, 16)))


def test_save_load_round_trip_keeps_config_and_output(tmp_path):
    model = randomize(tiny(caption_dim=16, learn_sigma=True))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "MaskNextDiT2DModel" and config["mask_channels"] == 2
    loaded = MaskNextDiT2DModel.from_pretrained(tmp_path)
    assert loaded.x_embedder.weight.shape == model.x_embedder.weight.shape
    assert loaded.final_layer.linear.weight.shape == model.final_layer.linear.weight.shape
    x, t, mask = torch.randn(1, 3, 8, 8), torch.rand(1), torch.rand(1, 2, 8, 8)
    caption = torch.randn(1, 3, 16)
    assert torch.equal(model(x, t, mask, caption), loaded(x, t, mask, caption))


def test_gradient_checkpointing_gives_the_same_gradients():
    model = randomize(tiny())
    x, t, mask = torch.randn(2, 3, 8, 8), torch.rand(2), torch.rand(2, 2, 8, 8)
    model(x, t, mask).pow(2).mean().backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.enable_gradient_checkpointing()
    model(x, t, mask).pow(2).mean().backward()
    for expected, parameter in zip(reference, model.parameters()):
        torch.testing.assert_close(parameter.grad, expected)


def _tiny_lumina(cross_attention_dim=32):
    from diffusers import LuminaNextDiT2DModel

    torch.manual_seed(0)
    base = LuminaNextDiT2DModel(sample_size=16, patch_size=2, in_channels=4, hidden_size=64, num_layers=2,
                                num_attention_heads=4, num_kv_heads=2, multiple_of=16,
                                cross_attention_dim=cross_attention_dim, learn_sigma=True)
    return randomize(base)


def _lumina_output(base, x, t, caption, caption_mask):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    rope = get_2d_rotary_pos_embed_lumina(base.config.hidden_size // base.config.num_attention_heads, 384, 384)
    with torch.no_grad():
        return base(x, t, caption, caption_mask, rope, cross_attention_kwargs={}).sample[:, : base.config.in_channels]


def _inputs():
    generator = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 16, 16, generator=generator), torch.rand(2, generator=generator)
    caption = torch.randn(2, 5, 32, generator=generator)
    caption_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return x, t, caption, caption_mask


def test_loaded_from_diffusers_lumina_equals_base_for_any_mask(tmp_path):
    base = _tiny_lumina()
    base.save_pretrained(tmp_path)
    model = load_pretrained_nextdit(str(tmp_path), mask_channels=3)
    assert model.config.mask_channels == 3 and model.config.learn_sigma
    x, t, caption, caption_mask = _inputs()
    expected = _lumina_output(base, x, t, caption, caption_mask)
    with torch.no_grad():
        for mask in (None, torch.zeros(2, 3, 16, 16), torch.rand(2, 3, 64, 64).round()):
            torch.testing.assert_close(model(x, t, mask, caption, caption_mask), expected, atol=1e-5, rtol=1e-4)
    # Image columns copied, mask columns zero.
    assert torch.equal(model.x_embedder.weight[:, :16], base.patch_embedder.proj.weight)
    assert not model.x_embedder.weight[:, 16:].any()


def test_loaded_from_original_consolidated_pth_equals_base(tmp_path):
    base = _tiny_lumina()
    with torch.no_grad():  # the original layout shares one query projection for self and cross attention
        for layer in base.layers:
            layer.attn2.to_q.weight.copy_(layer.attn1.to_q.weight)
            layer.attn2.norm_q.load_state_dict(layer.attn1.norm_q.state_dict())
    ours = diffusers_to_original_keys(base.state_dict())
    original = {k: v for k, v in ours.items() if ".wq_y." not in k and ".q_norm_y." not in k}
    original["pad_token"] = base.pad_token.detach().clone()
    path = tmp_path / "consolidated.00-of-01.pth"
    torch.save(original, path)
    model = load_pretrained_nextdit(str(path), mask_channels=1)
    assert model.config.num_attention_heads == 4 and model.config.num_kv_heads == 2
    x, t, caption, caption_mask = _inputs()
    with torch.no_grad():
        out = model(x, t, torch.rand(2, 1, 16, 16).round(), caption, caption_mask)
    torch.testing.assert_close(out, _lumina_output(base, x, t, caption, caption_mask), atol=1e-5, rtol=1e-4)


def test_reload_of_our_model_with_more_mask_channels(tmp_path):
    model = randomize(tiny())
    model.save_pretrained(tmp_path)
    wider = load_pretrained_nextdit(str(tmp_path), mask_channels=4)
    x, t = torch.randn(1, 3, 8, 8), torch.rand(1)
    with torch.no_grad():
        torch.testing.assert_close(wider(x, t, torch.rand(1, 4, 8, 8)), model(x, t, None))


def test_presets_parameter_counts_on_meta_device():
    counts = {name: count_parameters(name, in_channels=3, mask_channels=1) for name in MODEL_PRESETS}
    assert counts["tiny"] < 1e6
    assert 0.10e9 < counts["ultrafast"] < 0.13e9
    assert 0.5e9 < counts["0.6B"] < 0.7e9
    assert 1.0e9 < counts["1.1B"] < 1.2e9
    # 2.3B with Lumina-Next's Gemma-2B caption width (2048) and a latent input.
    assert 2.2e9 < count_parameters("2.3B", in_channels=4, caption_dim=2048, learn_sigma=True) < 2.45e9


def test_model_config_json_overrides_preset(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"hidden_size": 32, "num_layers": 1, "num_attention_heads": 2}))
    model = build_mask_nextdit("tiny", str(path), mask_channels=1)
    assert (model.config.hidden_size, model.config.num_layers) == (32, 1)
    path.write_text(json.dumps({"hiden_size": 32}))
    with pytest.raises(ValueError, match="hiden_size"):
        build_mask_nextdit("tiny", str(path))


def test_is_mask_dit_dir(tmp_path):
    assert not is_mask_dit_dir(str(tmp_path))
    tiny().save_pretrained(tmp_path / "transformer")
    assert is_mask_dit_dir(str(tmp_path))
    _tiny_lumina().save_pretrained(tmp_path / "other" / "transformer")
    assert not is_mask_dit_dir(str(tmp_path / "other"))
