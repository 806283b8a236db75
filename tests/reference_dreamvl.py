"""Plain-torch Dream-VL forward written from the reference spec (test helper).

Independent of transformers and of dvlx.backbone: it reads a dict of tensors with the official parameter names
and an official-layout config dict, and returns logits. Spec sections: LM 1.2-1.4, vision 3.2, projector 3.3,
splicing 3.5, positions 3.6.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

VISION_ROPE_THETA = 10000.0
VISION_LN_EPS = 1e-6


def official_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the official checkpoint for a config dict."""
    d, v, ff = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    head_dim = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    vc = cfg["vision_config"]
    e, m = vc["embed_dim"], vc["spatial_merge_size"]
    merged = e * m * m
    shapes: dict[str, tuple[int, ...]] = {
        "visual.patch_embed.proj.weight": (
            e,
            vc["in_chans"],
            vc["temporal_patch_size"],
            vc["patch_size"],
            vc["patch_size"],
        ),
    }
    for i in range(vc["depth"]):
        p = f"visual.blocks.{i}."
        shapes.update(
            {
                p + "norm1.weight": (e,),
                p + "norm1.bias": (e,),
                p + "norm2.weight": (e,),
                p + "norm2.bias": (e,),
                p + "attn.qkv.weight": (3 * e, e),
                p + "attn.qkv.bias": (3 * e,),
                p + "attn.proj.weight": (e, e),
                p + "attn.proj.bias": (e,),
                p + "mlp.fc1.weight": (e * vc["mlp_ratio"], e),
                p + "mlp.fc1.bias": (e * vc["mlp_ratio"],),
                p + "mlp.fc2.weight": (e, e * vc["mlp_ratio"]),
                p + "mlp.fc2.bias": (e,),
            }
        )
    shapes.update(
        {
            "visual.merger.ln_q.weight": (e,),
            "visual.merger.ln_q.bias": (e,),
            "visual.merger.mlp.0.weight": (merged, merged),
            "visual.merger.mlp.0.bias": (merged,),
            "visual.merger.mlp.2.weight": (vc["hidden_size"], merged),
            "visual.merger.mlp.2.bias": (vc["hidden_size"],),
            "model.embed_tokens.weight": (v, d),
        }
    )
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (d, d),
                p + "self_attn.q_proj.bias": (d,),
                p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, d),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (d, d),
                p + "mlp.gate_proj.weight": (ff, d),
                p + "mlp.up_proj.weight": (ff, d),
                p + "mlp.down_proj.weight": (d, ff),
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
            }
        )
    shapes.update(
        {
            "model.norm.weight": (d,),
            "projector.linear_1.weight": (d, vc["hidden_size"]),
            "projector.linear_1.bias": (d,),
            "projector.linear_2.weight": (d, d),
            "projector.linear_2.bias": (d,),
            "lm_head.weight": (v, d),
        }
    )
    return shapes


def rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def linear(x: Tensor, w: dict[str, Tensor], name: str) -> Tensor:
    return F.linear(x, w[name + ".weight"], w.get(name + ".bias"))


# ------------------------------------------------------------------------------------------- vision
def vision_positions(grid_thw: Tensor, merge: int) -> tuple[Tensor, Tensor]:
    """(row, col) of every patch in the processor's order: merge windows contiguous, frames repeated."""
    rows, cols = [], []
    for t, h, w in grid_thw.tolist():
        r = torch.arange(h)[:, None].expand(h, w)
        c = torch.arange(w)[None, :].expand(h, w)
        # (h, w) -> (h/merge, merge, w/merge, merge) -> window-major (h/merge, w/merge, merge, merge)
        r = r.reshape(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3).reshape(-1)
        c = c.reshape(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3).reshape(-1)
        rows.append(r.repeat(t))
        cols.append(c.repeat(t))
    return torch.cat(rows), torch.cat(cols)


def vision_tower(w: dict[str, Tensor], cfg: dict, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
    """Qwen2-VL ViT + patch merger: pixel rows [patches, 1176] -> merged tokens [N, vision hidden_size]."""
    vc = cfg["vision_config"]
    e, n_heads, merge = vc["embed_dim"], vc["num_heads"], vc["spatial_merge_size"]
    head_dim = e // n_heads
    # Conv3d with kernel == stride over one patch is a linear map of the flattened (C, T, ph, pw) row.
    patch_w = w["visual.patch_embed.proj.weight"].reshape(e, -1)  # [embed, C * T * ph * pw]
    x = pixel_values.to(patch_w.dtype) @ patch_w.T

    rows, cols = vision_positions(grid_thw, merge)
    rope_dim = head_dim // 2  # rows and columns each rotate half of every head
    inv_freq = 1.0 / (VISION_ROPE_THETA ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
    angles = torch.cat(
        [rows[:, None] * inv_freq, cols[:, None] * inv_freq], dim=-1
    )  # [patches, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)  # [patches, head_dim]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]  # [patches, 1, head_dim]

    seg = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]).tolist()
    bounds = [0, *torch.tensor(seg).cumsum(0).tolist()]
    n = x.shape[0]
    for i in range(vc["depth"]):
        p = f"visual.blocks.{i}."
        h = F.layer_norm(x, (e,), w[p + "norm1.weight"], w[p + "norm1.bias"], VISION_LN_EPS)
        qkv = linear(h, w, p + "attn.qkv").reshape(n, 3, n_heads, head_dim)  # [patches, 3, heads, head_dim]
        q, k, v = qkv.unbind(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = torch.empty_like(q)
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [heads, segment, head_dim]
            attn = torch.softmax(qs @ ks.transpose(1, 2) / math.sqrt(head_dim), dim=-1)
            out[start:end] = (attn @ vs).transpose(0, 1)
        x = x + linear(out.reshape(n, e), w, p + "attn.proj")  # [patches, heads * head_dim]
        h = F.layer_norm(x, (e,), w[p + "norm2.weight"], w[p + "norm2.bias"], VISION_LN_EPS)
        h = linear(h, w, p + "mlp.fc1")
        x = x + linear(h * torch.sigmoid(1.702 * h), w, p + "mlp.fc2")

    h = F.layer_norm(x, (e,), w["visual.merger.ln_q.weight"], w["visual.merger.ln_q.bias"], VISION_LN_EPS)
    h = h.reshape(-1, e * merge * merge)  # [N, 4 * embed]: the 4 patches of one merge window side by side
    h = F.gelu(linear(h, w, "visual.merger.mlp.0"))
    return linear(h, w, "visual.merger.mlp.2")


# ------------------------------------------------------------------------------------------- LM
def language_model(w: dict[str, Tensor], cfg: dict, embeds: Tensor, attention_mask: Tensor) -> Tensor:
    """Bidirectional Qwen2 decoder with key padding: embeds [B, L, D] -> logits [B, L, V]."""
    batch, length, d = embeds.shape
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = d // n_heads
    eps = cfg["rms_norm_eps"]
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L]
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = positions[..., None].float() * inv_freq  # [B, L, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, L, head_dim]
    cos, sin = angles.cos(), angles.sin()
    key_bias = torch.zeros(batch, 1, 1, length).masked_fill(
        attention_mask[:, None, None, :] == 0, float("-inf")
    )

    x = embeds
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = linear(h, w, p + "self_attn.q_proj").reshape(batch, length, n_heads, head_dim).transpose(1, 2)
        k = linear(h, w, p + "self_attn.k_proj").reshape(batch, length, n_kv, head_dim).transpose(1, 2)
        v = linear(h, w, p + "self_attn.v_proj").reshape(batch, length, n_kv, head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # GQA: each key/value head serves n_heads / n_kv consecutive query heads.
        k = k.repeat_interleave(n_heads // n_kv, dim=1)  # [B, heads, L, head_dim]
        v = v.repeat_interleave(n_heads // n_kv, dim=1)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim) + key_bias, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(batch, length, d)  # [B, L, D]
        x = x + linear(out, w, p + "self_attn.o_proj")
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        x = x + linear(
            F.silu(linear(h, w, p + "mlp.gate_proj")) * linear(h, w, p + "mlp.up_proj"),
            w,
            p + "mlp.down_proj",
        )
    x = rms_norm(x, w["model.norm.weight"], eps)
    return x @ w["lm_head.weight"].T


def reference_forward(
    w: dict[str, Tensor],
    cfg: dict,
    input_ids: Tensor,
    attention_mask: Tensor,
    pixel_values: Tensor | None = None,
    image_grid_thw: Tensor | None = None,
) -> Tensor:
    """Logits [B, L, V] of Dream-VL: image features replace the `image_token_id` embeddings in order."""
    embeds = w["model.embed_tokens.weight"][input_ids]  # [B, L, D]
    if pixel_values is not None:
        features = vision_tower(w, cfg, pixel_values, image_grid_thw)
        features = linear(F.gelu(linear(features, w, "projector.linear_1")), w, "projector.linear_2")
        embeds = embeds.clone()
        embeds[input_ids == cfg["image_token_id"]] = features
    return language_model(w, cfg, embeds, attention_mask)
