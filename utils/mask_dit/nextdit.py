"""A mask-conditioned NextDiT (Lumina-Next family) as a diffusers `ModelMixin`/`ConfigMixin`.

The network is Lumina-Next's NextDiT: patch size 2, 2D RoPE on image tokens, QK LayerNorm,
RMSNorm "sandwich" norms around attention and the SwiGLU feed-forward, adaLN modulation from
the timestep (plus the pooled caption when captions are used) with tanh gates that start at
zero, and optional cross-attention to caption tokens behind a per-head gate that also starts
at zero. Attention runs through `F.scaled_dot_product_attention`, so PyTorch picks flash /
memory-efficient kernels where the device has them (self-attention has no mask, which keeps
those kernels eligible).

Mask conditioning: the mask ([B, mask_channels, H, W], values in [0, 1]) is resized to the
input grid and concatenated to the noisy input as extra channels. It is fed as `2 * m - 1`
(background = -1, foreground = +1) so that an all-zero input can mean "no mask" for
classifier-free guidance (`mask=None`). The patch-embedding columns of the mask channels start
at zero, so a freshly built or freshly converted model ignores the mask until it learns to use it.

Parameter names follow the original Lumina-Next `consolidated.pth` (`x_embedder`,
`layers.N.attention.wq`, ...); the cross-attention query has its own `wq_y`/`q_norm_y`
(diffusers' layout keeps a separate cross-attention query; the original shares `wq`, which
converts as a copy). `load_pretrained_nextdit` converts both the original layout and
diffusers' `LuminaNextDiT2DModel` into this model.

Time convention (Lumina / rectified flow as in the original repo): t in [0, 1], t = 1 is data,
t = 0 is pure noise; the model predicts the velocity x_data - noise.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from utils.checkpointing import own_memory
from utils.errors import UserError, UserFileNotFoundError

logger = logging.getLogger(__name__)

# Size presets. Real parameter counts (measured on the meta device, see docs/MASK_DIT.md) depend
# on caption_dim (cross-attention) and mask_channels; the names are the guide-003 planning points.
MODEL_PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=None, multiple_of=16),
    # The CPU demo of docs/MASK_DIT.md: 64 px pixel space in 256 tokens (patch 4) trains in minutes.
    "cpu_demo": dict(hidden_size=128, num_layers=4, num_attention_heads=4, num_kv_heads=None, multiple_of=32,
                     patch_size=4),
    # guide 003 "ultra fast" table entry: hidden 768, depth 12, 12 heads (~0.1B, not 0.6B).
    "ultrafast": dict(hidden_size=768, num_layers=12, num_attention_heads=12, num_kv_heads=None, multiple_of=256),
    "0.6B": dict(hidden_size=1536, num_layers=18, num_attention_heads=24, num_kv_heads=8, multiple_of=256),
    "1.1B": dict(hidden_size=2048, num_layers=20, num_attention_heads=32, num_kv_heads=8, multiple_of=256),
    # Lumina-Next-2B's architecture (hidden 2304, 24 layers, 32 heads, 8 KV heads): the shapes of
    # its consolidated.pth / diffusers weights (load those with --pretrained_model_name_or_path).
    "2B": dict(hidden_size=2304, num_layers=24, num_attention_heads=32, num_kv_heads=8, multiple_of=256),
    "2.3B": dict(hidden_size=2304, num_layers=32, num_attention_heads=32, num_kv_heads=8, multiple_of=256),
}

MASK_DIT_CONFIG_NAME = "mask_dit_config.json"


def rope_angles_2d(head_dim: int, height: int, width: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """Rotation angles of Lumina's 2D RoPE for an `height x width` token grid: [H*W, head_dim // 2].

    Half of each head's rotary pairs encode the row, half the column, interleaved per frequency
    (row f0, col f0, row f1, col f1, ...), as in Lumina-Next.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    axis_dim = head_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, axis_dim, 2, device=device, dtype=torch.float64)[: axis_dim // 2] / axis_dim))
    rows = torch.outer(torch.arange(height, device=device, dtype=torch.float64), freqs).float()  # [H, D/4]
    cols = torch.outer(torch.arange(width, device=device, dtype=torch.float64), freqs).float()  # [W, D/4]
    rows = rows[:, None, :].expand(height, width, -1)
    cols = cols[None, :, :].expand(height, width, -1)
    return torch.stack([rows, cols], dim=-1).reshape(height * width, axis_dim)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x0, x1), (x2, x3), ... of x [B, L, heads, head_dim] by angles [L, head_dim/2]."""
    x_float = x.float().unflatten(-1, (-1, 2))
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    real, imag = x_float[..., 0], x_float[..., 1]
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


class RMSNorm(nn.Module):
    """RMS norm computed in float32, with a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class Attention(nn.Module):
    """Self-attention over image tokens (2D RoPE) plus optional zero-gated cross-attention to captions."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None, qk_norm: bool, caption_dim: int | None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = dim // num_heads
        kv_dim = self.num_kv_heads * self.head_dim
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, kv_dim, bias=False)
        self.wv = nn.Linear(dim, kv_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.q_norm = nn.LayerNorm(dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(kv_dim) if qk_norm else nn.Identity()
        self.has_cross_attention = bool(caption_dim)
        if self.has_cross_attention:
            self.wq_y = nn.Linear(dim, dim, bias=False)
            self.wk_y = nn.Linear(caption_dim, kv_dim, bias=False)
            self.wv_y = nn.Linear(caption_dim, kv_dim, bias=False)
            self.q_norm_y = nn.LayerNorm(dim) if qk_norm else nn.Identity()
            self.ky_norm = nn.LayerNorm(kv_dim) if qk_norm else nn.Identity()
            self.gate = nn.Parameter(torch.zeros(num_heads))

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.unflatten(-1, (heads, self.head_dim))

    def _attend(self, q, k, v, mask=None) -> torch.Tensor:
        """q [B, L, H, d], k/v [B, S, H_kv, d] -> [B, L, H, d]; KV heads repeated for grouped-query attention."""
        repeat = self.num_heads // self.num_kv_heads
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)

    def forward(self, x, rope, caption=None, caption_mask=None) -> torch.Tensor:
        """x [B, L, dim]; rope [L, head_dim/2]; caption [B, S, caption_dim]; caption_mask [B, S] (1 = token)."""
        q = apply_rope(self._heads(self.q_norm(self.wq(x)), self.num_heads), rope)
        k = apply_rope(self._heads(self.k_norm(self.wk(x)), self.num_kv_heads), rope)
        v = self._heads(self.wv(x), self.num_kv_heads)
        out = self._attend(q, k, v)
        if self.has_cross_attention and caption is not None:
            q_y = apply_rope(self._heads(self.q_norm_y(self.wq_y(x)), self.num_heads), rope)
            k_y = self._heads(self.ky_norm(self.wk_y(caption)), self.num_kv_heads)
            v_y = self._heads(self.wv_y(caption), self.num_kv_heads)
            mask = None if caption_mask is None else caption_mask.bool()[:, None, None, :]
            out_y = self._attend(q_y, k_y, v_y, mask)
            out = out + out_y * self.gate.tanh().view(1, 1, -1, 1).to(out_y.dtype)
        return self.wo(out.flatten(-2))


class FeedForward(nn.Module):
    """SwiGLU MLP; hidden width 2/3 * 4 * dim rounded up to `multiple_of`, as in Lumina-Next."""

    def __init__(self, dim: int, multiple_of: int, ffn_dim_multiplier: float | None):
        super().__init__()
        hidden = int(2 * 4 * dim / 3)
        if ffn_dim_multiplier is not None:
            hidden = int(ffn_dim_multiplier * hidden)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Sandwich-normed attention and MLP, each scaled by adaLN and added through a tanh gate."""

    def __init__(self, dim, num_heads, num_kv_heads, multiple_of, ffn_dim_multiplier, norm_eps, qk_norm, caption_dim):
        super().__init__()
        self.attention = Attention(dim, num_heads, num_kv_heads, qk_norm, caption_dim)
        self.feed_forward = FeedForward(dim, multiple_of, ffn_dim_multiplier)
        self.attention_norm1 = RMSNorm(dim, eps=norm_eps)
        self.attention_norm2 = RMSNorm(dim, eps=norm_eps)
        self.ffn_norm1 = RMSNorm(dim, eps=norm_eps)
        self.ffn_norm2 = RMSNorm(dim, eps=norm_eps)
        self.attention_y_norm = RMSNorm(caption_dim, eps=norm_eps) if caption_dim else None
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(dim, 1024), 4 * dim))

    def forward(self, x, rope, adaln_input, caption=None, caption_mask=None):
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln_input).chunk(4, dim=1)
        if caption is not None and self.attention_y_norm is not None:
            caption = self.attention_y_norm(caption)
        attended = self.attention(self.attention_norm1(x) * (1 + scale_msa[:, None]), rope, caption, caption_mask)
        x = x + gate_msa[:, None].tanh() * self.attention_norm2(attended)
        mlp = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp[:, None]))
        return x + gate_mlp[:, None].tanh() * self.ffn_norm2(mlp)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t (cos first, 256 channels) through a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(hidden_size, 1024), hidden_size))

    def forward(self, x, adaln_input):
        scale = self.adaLN_modulation(adaln_input)
        return self.linear(self.norm_final(x) * (1 + scale[:, None]))


class MaskNextDiT2DModel(ModelMixin, ConfigMixin):
    """NextDiT conditioned on a segmentation mask (and optionally caption tokens).

    Args:
        in_channels: channels of the generated signal (3 for pixel space, the VAE's latent channels otherwise).
        mask_channels: channels of the conditioning mask (1 binary, or K one-hot classes).
        caption_dim: width of the caption encoder's hidden states; None or 0 builds a mask-only model.
        learn_sigma: the output head has 2 * in_channels channels and the second half is dropped
            (Lumina-Next's pretrained heads are built this way; keep True when fine-tuning them).
        sample_size: the training input grid (pixels or latents); informational, any multiple of
            patch_size works at inference.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["TransformerBlock"]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """diffusers' loader, with the weights copied out of the file mapping (see `own_memory`)."""
        return own_memory(super().from_pretrained(*args, **kwargs))

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        patch_size: int = 2,
        in_channels: int = 3,
        mask_channels: int = 1,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_attention_heads: int = 12,
        num_kv_heads: int | None = None,
        multiple_of: int = 256,
        ffn_dim_multiplier: float | None = None,
        norm_eps: float = 1e-5,
        qk_norm: bool = True,
        caption_dim: int | None = None,
        learn_sigma: bool = False,
        rope_theta: float = 10000.0,
    ):
        super().__init__()
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}")
        if mask_channels < 1:
            raise ValueError(f"mask_channels must be >= 1, got {mask_channels}")
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        adaln_dim = min(hidden_size, 1024)
        self.x_embedder = nn.Linear(patch_size * patch_size * (in_channels + mask_channels), hidden_size)
        self.t_embedder = TimestepEmbedder(adaln_dim)
        self.cap_embedder = (
            nn.Sequential(nn.LayerNorm(caption_dim), nn.Linear(caption_dim, adaln_dim)) if caption_dim else None
        )
        self.layers = nn.ModuleList(
            TransformerBlock(hidden_size, num_attention_heads, num_kv_heads, multiple_of, ffn_dim_multiplier,
                             norm_eps, qk_norm, caption_dim)
            for _ in range(num_layers)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.gradient_checkpointing = False
        self._rope_cache: dict = {}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Lumina-Next's init: xavier linears, zero adaLN / final / caption projections and gates, zero mask columns."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in self.layers:
            nn.init.zeros_(layer.adaLN_modulation[1].weight)
            nn.init.zeros_(layer.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.cap_embedder is not None:
            nn.init.zeros_(self.cap_embedder[1].weight)
            nn.init.zeros_(self.cap_embedder[1].bias)
        self.zero_mask_columns()

    @property
    def num_image_columns(self) -> int:
        return self.config.patch_size**2 * self.config.in_channels

    @torch.no_grad()
    def zero_mask_columns(self) -> None:
        """Zero the patch-embedding weights that read the mask channels (they come after the image ones)."""
        self.x_embedder.weight[:, self.num_image_columns:] = 0

    def _rope(self, height_tokens: int, width_tokens: int, device) -> torch.Tensor:
        key = (height_tokens, width_tokens, str(device))
        if key not in self._rope_cache:
            head_dim = self.config.hidden_size // self.config.num_attention_heads
            self._rope_cache[key] = rope_angles_2d(head_dim, height_tokens, width_tokens, self.config.rope_theta, device)
        return self._rope_cache[key]

    def prepare_mask(self, mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """Mask [B, mask_channels, h, w] in [0, 1] (or None = unconditional) -> [B, mask_channels, H, W] in {-1..1, 0}.

        Downsampling uses area averaging so thin structures (vessels) survive as partial coverage;
        upsampling uses nearest.
        """
        batch, _, height, width = like.shape
        if mask is None:
            return like.new_zeros(batch, self.config.mask_channels, height, width)
        if mask.ndim != 4 or mask.shape[1] != self.config.mask_channels:
            raise UserError(
                f"mask must be [B, {self.config.mask_channels}, H, W] (the model's mask_channels), got {tuple(mask.shape)}"
            )
        mask = mask.to(device=like.device, dtype=torch.float32)
        if mask.shape[-2:] != (height, width):
            smaller = mask.shape[-2] > height or mask.shape[-1] > width
            mask = F.interpolate(mask, size=(height, width), mode="area" if smaller else "nearest")
        return (2 * mask - 1).to(like.dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        mask_is_prepared: bool = False,
    ) -> torch.Tensor:
        """Predict the flow velocity.

        Args:
            hidden_states: noisy input x_t [B, in_channels, H, W] (H, W multiples of patch_size).
            timestep: t [B] or scalar in [0, 1], 1 = data.
            mask: [B, mask_channels, h, w] in [0, 1] (resized to H, W here), or None for "no mask";
                with `mask_is_prepared` it is already the model input from `prepare_mask`.
            encoder_hidden_states: caption tokens [B, S, caption_dim], or None (mask-only model, or
                an unconditional pass of a caption model: the caption path is then skipped).
            encoder_attention_mask: [B, S], 1 for real tokens.

        Returns:
            velocity [B, in_channels, H, W] (learn_sigma's extra channels are dropped).
        """
        config = self.config
        batch, _, height, width = hidden_states.shape
        p = config.patch_size
        if height % p or width % p:
            raise ValueError(f"input {height}x{width} is not a multiple of patch_size {p}")
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        mask_input = mask if mask_is_prepared else self.prepare_mask(mask, hidden_states)
        x = torch.cat([hidden_states, mask_input.to(hidden_states.dtype)], dim=1)
        channels, height_tokens, width_tokens = x.shape[1], height // p, width // p
        # Channel-major patches ([C, p, p] flattened), so image columns come first, mask columns after.
        x = x.view(batch, channels, height_tokens, p, width_tokens, p).permute(0, 2, 4, 1, 3, 5).flatten(3)
        x = self.x_embedder(x).flatten(1, 2)
        rope = self._rope(height_tokens, width_tokens, x.device)

        adaln_input = self.t_embedder(timestep)
        if encoder_hidden_states is not None and self.cap_embedder is None:
            raise ValueError("this model was built without captions (caption_dim=None); pass encoder_hidden_states=None")
        if encoder_hidden_states is not None:
            if encoder_attention_mask is None:
                encoder_attention_mask = torch.ones(encoder_hidden_states.shape[:2], device=x.device)
            weights = encoder_attention_mask.float().unsqueeze(-1)
            pooled = (encoder_hidden_states * weights).sum(1) / weights.sum(1).clamp_min(1.0)
            adaln_input = adaln_input + self.cap_embedder(pooled.to(encoder_hidden_states.dtype))

        for layer in self.layers:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(
                    layer, x, rope, adaln_input, encoder_hidden_states, encoder_attention_mask
                )
            else:
                x = layer(x, rope, adaln_input, encoder_hidden_states, encoder_attention_mask)

        x = self.final_layer(x, adaln_input)
        x = x.view(batch, height_tokens, width_tokens, p, p, self.out_channels)
        x = x.permute(0, 5, 1, 3, 2, 4).reshape(batch, self.out_channels, height, width)
        return x[:, : config.in_channels]


def build_mask_nextdit(
    preset: str | None = None,
    model_config: str | dict | None = None,
    **overrides,
) -> MaskNextDiT2DModel:
    """A fresh model from a preset name (MODEL_PRESETS) and/or a JSON file / dict of config keys.

    Precedence: overrides (e.g. in_channels, mask_channels, caption_dim) > model_config > preset.
    """
    config: dict = {}
    if preset is not None:
        if preset not in MODEL_PRESETS:
            raise UserError(f"--model_size {preset!r} is not one of {sorted(MODEL_PRESETS)}")
        config.update(MODEL_PRESETS[preset])
    if isinstance(model_config, str):
        with open(model_config, encoding="utf-8") as handle:
            model_config = json.load(handle)
    if model_config:
        known = set(inspect.signature(MaskNextDiT2DModel.__init__).parameters) - {"self"}
        unknown = {k for k in model_config if not k.startswith("_")} - known
        if unknown:
            raise UserError(f"--model_config: unknown keys {sorted(unknown)}")
        config.update({k: v for k, v in model_config.items() if not k.startswith("_")})
    config.update({k: v for k, v in overrides.items() if v is not None})
    return MaskNextDiT2DModel(**config)


def count_parameters(preset: str, **overrides) -> int:
    """Parameter count of a preset, built on the meta device (no memory, instant)."""
    with torch.device("meta"):
        model = build_mask_nextdit(preset, **overrides)
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Fine-tuning from pretrained Lumina-Next weights.
# ----------------------------------------------------------------------------------------------


def diffusers_to_original_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `LuminaNextDiT2DModel` names -> our (original Lumina-Next) names.

    diffusers' cross-attention query (attn2.to_q / attn2.norm_q) becomes our wq_y / q_norm_y,
    and its shared output projection attn2.to_out.0 our wo. pad_token (only used for ragged
    batches, which we do not make) is dropped.
    """
    top = {
        "patch_embedder.proj.": "x_embedder.",
        "time_caption_embed.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
        "time_caption_embed.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
        "time_caption_embed.caption_embedder.": "cap_embedder.",
        "norm_out.linear_1.": "final_layer.adaLN_modulation.1.",
        "norm_out.linear_2.": "final_layer.linear.",
    }
    block = {
        "gate": "attention.gate",
        "attn1.to_q.": "attention.wq.", "attn1.to_k.": "attention.wk.", "attn1.to_v.": "attention.wv.",
        "attn1.norm_q.": "attention.q_norm.", "attn1.norm_k.": "attention.k_norm.",
        "attn2.to_q.": "attention.wq_y.", "attn2.to_k.": "attention.wk_y.", "attn2.to_v.": "attention.wv_y.",
        "attn2.norm_q.": "attention.q_norm_y.", "attn2.norm_k.": "attention.ky_norm.",
        "attn2.to_out.0.": "attention.wo.",
        "norm1.linear.": "adaLN_modulation.1.", "norm1.norm.": "attention_norm1.", "norm2.": "attention_norm2.",
        "ffn_norm1.": "ffn_norm1.", "ffn_norm2.": "ffn_norm2.", "norm1_context.": "attention_y_norm.",
        "feed_forward.linear_1.": "feed_forward.w1.", "feed_forward.linear_2.": "feed_forward.w2.",
        "feed_forward.linear_3.": "feed_forward.w3.",
    }
    converted = {}
    for key, value in state_dict.items():
        if key == "pad_token":
            continue
        new_key = None
        for old, new in top.items():
            if key.startswith(old):
                new_key = new + key[len(old):]
        if key.startswith("layers."):
            index, rest = key[len("layers."):].split(".", 1)
            for old, new in block.items():
                if rest == old or (old.endswith(".") and rest.startswith(old)):
                    new_key = f"layers.{index}.{new}{rest[len(old):]}"
                    break
        if new_key is None:
            raise KeyError(f"unexpected key {key!r} in a LuminaNextDiT2DModel state dict")
        converted[new_key] = value
    return converted


def original_to_ours(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original consolidated.pth names -> ours: the shared query (wq, q_norm) is copied to wq_y, q_norm_y."""
    converted = {k: v for k, v in state_dict.items() if k != "pad_token" and not k.startswith("freqs_cis")}
    for key, value in state_dict.items():
        if ".attention.wq." in key and key.replace(".wq.", ".wk_y.") in state_dict:
            converted[key.replace(".wq.", ".wq_y.")] = value.clone()
        if ".attention.q_norm." in key and key.replace(".q_norm.", ".ky_norm.") in state_dict:
            converted[key.replace(".q_norm.", ".q_norm_y.")] = value.clone()
    return converted


def _load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("ema", "model", "state_dict"):  # training checkpoints sometimes wrap the weights
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def _config_from_state_dict(state: dict[str, torch.Tensor], patch_size: int = 2) -> dict:
    """Architecture of an original-layout state dict, read from its tensor shapes."""
    hidden = state["x_embedder.weight"].shape[0]
    num_layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
    caption_dim = state["cap_embedder.0.weight"].shape[0] if "cap_embedder.0.weight" in state else None
    kv_dim = state["layers.0.attention.wk.weight"].shape[0]
    gate = state.get("layers.0.attention.gate")
    if gate is None:
        raise UserError("cannot infer num_attention_heads without cross-attention gates; pass --model_config")
    num_heads = gate.shape[0]
    ffn_hidden = state["layers.0.feed_forward.w1.weight"].shape[0]
    multiple_of = 256 if ffn_hidden % 256 == 0 else (16 if ffn_hidden % 16 == 0 else 1)
    out_features = state["final_layer.linear.weight"].shape[0] // patch_size**2
    in_channels = state["x_embedder.weight"].shape[1] // patch_size**2
    return dict(
        patch_size=patch_size, hidden_size=hidden, num_layers=num_layers, num_attention_heads=num_heads,
        num_kv_heads=kv_dim // (hidden // num_heads), multiple_of=multiple_of, caption_dim=caption_dim,
        qk_norm="layers.0.attention.q_norm.weight" in state, in_channels=in_channels,
        learn_sigma=out_features == 2 * in_channels,
    )


def load_pretrained_nextdit(path: str, mask_channels: int, subfolder: str | None = None, **overrides) -> MaskNextDiT2DModel:
    """A mask model initialised from pretrained NextDiT weights.

    path: a diffusers folder of `LuminaNextDiT2DModel` (or of our own class, e.g. a previous run's
        `transformer/`), with an optional `subfolder` such as "transformer"; or an original
        Lumina-Next `consolidated.pth` / `.safetensors` file.
    Every weight transfers except the input embedder, whose image columns are copied while the
    mask columns start at zero, so right after loading the output equals the base model's for any
    mask. `overrides` may set config keys that do not change parameter shapes (e.g. sample_size).
    """
    if os.path.isfile(path):
        state = original_to_ours(_load_state_dict_file(path))
        config = _config_from_state_dict(state)
    else:
        folder = os.path.join(path, subfolder) if subfolder else path
        config_file = os.path.join(folder, "config.json")
        if not os.path.isfile(config_file):
            raise UserFileNotFoundError(
                f"{folder}: no config.json. Pass a diffusers transformer folder (use --pretrained_subfolder "
                "transformer for a whole pipeline) or an original consolidated.pth file."
            )
        with open(config_file, encoding="utf-8") as handle:
            base_config = json.load(handle)
        class_name = base_config.get("_class_name")
        if class_name == MaskNextDiT2DModel.__name__:
            base = MaskNextDiT2DModel.from_pretrained(folder)
            state, config = base.state_dict(), dict(base.config)
            # Keep only the image columns; the mask columns are rebuilt below for the new mask_channels.
            state["x_embedder.weight"] = state["x_embedder.weight"][:, : base.num_image_columns]
        elif class_name == "LuminaNextDiT2DModel":
            from diffusers import LuminaNextDiT2DModel

            base = LuminaNextDiT2DModel.from_pretrained(folder)
            state = diffusers_to_original_keys(base.state_dict())
            c = base.config
            config = dict(
                sample_size=c.sample_size, patch_size=c.patch_size, in_channels=c.in_channels,
                hidden_size=c.hidden_size, num_layers=c.num_layers, num_attention_heads=c.num_attention_heads,
                num_kv_heads=c.num_kv_heads, multiple_of=c.multiple_of, ffn_dim_multiplier=c.ffn_dim_multiplier,
                norm_eps=c.norm_eps, qk_norm=c.qk_norm, caption_dim=c.cross_attention_dim, learn_sigma=c.learn_sigma,
            )
            if c.scaling_factor != 1.0:
                logger.warning(f"{folder}: RoPE scaling_factor {c.scaling_factor} is ignored (we use 1.0).")
        else:
            raise UserError(f"{config_file}: _class_name {class_name!r} is neither LuminaNextDiT2DModel nor ours")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config.update(overrides)
    config["mask_channels"] = mask_channels
    model = MaskNextDiT2DModel(**config)
    image_columns = state.pop("x_embedder.weight")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "x_embedder.weight"]
    if missing or unexpected:
        raise UserError(f"{path}: weights do not fit the model (missing {missing[:8]}, unexpected {unexpected[:8]})")
    with torch.no_grad():
        model.x_embedder.weight.zero_()
        model.x_embedder.weight[:, : model.num_image_columns] = image_columns
    return model


def is_mask_dit_dir(path: str) -> bool:
    """True for a folder written by train_mask_dit.py (mask_dit_config.json, or transformer/ of our class)."""
    if not os.path.isdir(path):
        return False
    if os.path.isfile(os.path.join(path, MASK_DIT_CONFIG_NAME)):
        return True
    config_file = os.path.join(path, "transformer", "config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as handle:
            try:
                return json.load(handle).get("_class_name") == MaskNextDiT2DModel.__name__
            except json.JSONDecodeError:
                return False
    return False
