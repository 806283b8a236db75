"""Dream-VL backbone on transformers: Qwen2 decoder layers, Qwen2-VL vision tower, 2-layer GELU projector.

- LM: `Qwen2Model` (embed_tokens, layers, norm, rotary) whose layers this module drives itself with one
  additive float mask per forward, so the attention mode is a per-call switch: `full` (Dream, bidirectional
  over valid keys), `prefix` (prompt/image tokens never attend to answer tokens) or `causal` (AR baseline).
  Every attention module has `is_causal = False`, so neither SDPA nor eager adds causality of its own.
- Positions are plain 1-D over the spliced sequence: the running count of valid tokens minus one. The M-RoPE
  of Qwen2-VL is never used (the official weights were trained with 1-D positions).
- Vision: `Qwen2VisionTransformerPretrainedModel` (native resolution, block-diagonal attention per image); its
  merged tokens (`pooler_output`) go through the projector and replace the embeddings of `image_token_id`.
- Parameter names are the official checkpoint's, so the Hugging Face layout loads as it is.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.qwen2 import Qwen2Config, Qwen2Model
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VisionTransformerPretrainedModel,
    Qwen2VLVisionBlock,
    Qwen2VLVisionRotaryEmbedding,
)

from dvlx.backbone.config import ATTENTION_MODES, SPECIAL_TOKEN_FIELDS, DreamVLConfig

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
VISION_ROPE_THETA = 10000.0
"""The Qwen2-VL ViT rotary base; it is not a key of the official config."""
BLOCK_CLASSES: tuple[type[nn.Module], ...] = (Qwen2DecoderLayer, Qwen2VLVisionBlock)
"""The repeated blocks (LM decoder layer, vision block): the units of FSDP wrapping, activation
checkpointing and regional torch.compile."""


@dataclass
class DreamVLOutput:
    logits: Tensor | None
    """[B, L, V] float, or None when the forward was asked for hidden states only."""
    last_hidden_state: Tensor
    """[B, L, D] after the final RMSNorm."""
    past_key_values: Cache | None = None
    """The KV cache extended by this call when `use_cache=True`, else None."""


class Projector(nn.Module):
    """Linear -> GELU (exact erf) -> Linear, from the vision merger width to the LM width."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class _ReadOnlyCache:
    """Lets attention read a filled DynamicCache without extending it (a suffix re-fed at every step)."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        layer = self.cache.layers[layer_idx]
        return torch.cat([layer.keys, key], dim=-2), torch.cat([layer.values, value], dim=-2)


def qwen2_text_config(config: DreamVLConfig, attn_implementation: str = "sdpa") -> Qwen2Config:
    """The transformers config of the LM part.

    Built field by field: handing the official config.json to Qwen2Config is accepted silently but leaves the
    model causal and rope_theta at its 1e4 default (transformers 5 reads it from `rope_parameters`).
    """
    return Qwen2Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attention_dropout=config.attention_dropout,
        use_sliding_window=False,
        use_cache=False,
        tie_word_embeddings=False,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        is_causal=False,
        attn_implementation=attn_implementation,
    )


def qwen2_vision_config(config: DreamVLConfig, attn_implementation: str = "sdpa") -> Qwen2VLVisionConfig:
    vc = config.vision_config
    return Qwen2VLVisionConfig(
        depth=vc.depth,
        embed_dim=vc.embed_dim,
        hidden_size=vc.hidden_size,
        hidden_act=vc.hidden_act,
        mlp_ratio=vc.mlp_ratio,
        num_heads=vc.num_heads,
        in_channels=vc.in_chans,
        patch_size=vc.patch_size,
        spatial_merge_size=vc.spatial_merge_size,
        temporal_patch_size=vc.temporal_patch_size,
        initializer_range=config.initializer_range,
        rope_parameters={"rope_type": "axial", "rope_theta": VISION_ROPE_THETA},
        attn_implementation=attn_implementation,
    )


class DreamVL(nn.Module):
    """Dream-VL: image features spliced into a bidirectional Qwen2 decoder; official parameter names."""

    def __init__(self, config: DreamVLConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}"
            )
        self.config = config
        self.attn_implementation = attn_implementation
        self.model = Qwen2Model(qwen2_text_config(config, attn_implementation))
        for layer in self.model.layers:
            layer.self_attn.is_causal = False
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.visual = Qwen2VisionTransformerPretrainedModel(qwen2_vision_config(config, attn_implementation))
        self.projector = Projector(config.vision_config.hidden_size, config.hidden_size)
        self._init_own_weights()

    def _init_own_weights(self) -> None:
        # transformers initialises its own modules in post_init; these follow the same rule.
        std = self.config.initializer_range
        for linear in (self.lm_head, self.projector.linear_1, self.projector.linear_2):
            nn.init.normal_(linear.weight, std=std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def materialize_rotary_buffers(self, device: torch.device | str) -> None:
        """Recompute the non-persistent rotary tables (inv_freq) on `device`, e.g. after a meta build."""
        with torch.device(device):
            self.model.rotary_emb = Qwen2RotaryEmbedding(self.model.config)
            self.visual.rotary_pos_emb = Qwen2VLVisionRotaryEmbedding(self.visual.config)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        # Module.to(bfloat16) also narrows the rotary frequency tables, which wrecks the angles of distant
        # positions (transformers does not guard against it); they are recomputed in float32 instead.
        tables = [self.model.rotary_emb.inv_freq, self.visual.rotary_pos_emb.inv_freq]
        if any(t.dtype != torch.float32 for t in tables):
            self.materialize_rotary_buffers(tables[0].device)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    # ---------------------------------------------------------------------------------- vocabulary
    def resize_token_embeddings(self, new_vocab_size: int) -> None:
        """Grow or shrink the rows of `model.embed_tokens` and `lm_head` to `new_vocab_size`.

        Kept rows keep their values; new rows are drawn from N(0, initializer_range), the rule these two
        layers are initialised with. dtype, device, requires_grad and the embedding's padding_idx (the pad
        id) are kept; the configs' vocab_size follows. Every special id must stay inside the vocabulary.
        The parameters are replaced, so resize before building an optimiser.
        """
        if isinstance(new_vocab_size, bool) or not isinstance(new_vocab_size, int):
            raise ValueError(
                f"resize_token_embeddings: new_vocab_size must be an int, got {new_vocab_size!r}"
            )
        special = {name: getattr(self.config, name) for name in SPECIAL_TOKEN_FIELDS}
        outside = {name: value for name, value in special.items() if value >= new_vocab_size}
        if new_vocab_size < 1 or outside:
            raise ValueError(
                f"resize_token_embeddings: new_vocab_size {new_vocab_size} must exceed every special id, "
                f"but {outside} would fall outside"
            )
        old_size = self.config.vocab_size
        if new_vocab_size == old_size:
            return
        embed = self.model.embed_tokens
        for module in (embed, self.lm_head):
            old = module.weight
            with torch.no_grad():
                rows = old.new_empty((new_vocab_size, old.shape[1]))  # [V, D]
                keep = min(old_size, new_vocab_size)
                rows[:keep] = old[:keep]
                if new_vocab_size > old_size:
                    nn.init.normal_(rows[old_size:], std=self.config.initializer_range)
            module.weight = nn.Parameter(rows, requires_grad=old.requires_grad)
        embed.num_embeddings = new_vocab_size
        self.lm_head.out_features = new_vocab_size
        self.config.vocab_size = new_vocab_size
        self.model.config.vocab_size = new_vocab_size
        self.model.vocab_size = new_vocab_size

    # --------------------------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        attn_implementation: str = "sdpa",
    ) -> DreamVL:
        """Load the official Hugging Face layout (config.json + safetensors, sharded or not)."""
        from dvlx.backbone.checkpoint import load_pretrained

        return load_pretrained(
            cls, folder, dtype=dtype, device=device, attn_implementation=attn_implementation
        )

    def save_pretrained(
        self,
        folder: str | Path,
        max_shard_size_bytes: int = 5 * 2**30,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        """Write config.json + safetensors in the official layout, atomically; see checkpoint.py."""
        from dvlx.backbone.checkpoint import save_pretrained

        save_pretrained(self, folder, max_shard_size_bytes=max_shard_size_bytes, dtype=dtype)

    # ---------------------------------------------------------------------------------- activation
    def gradient_checkpointing_enable(self) -> None:
        """Recompute every LM layer and vision block in the backward (non-reentrant torch checkpoint)."""
        self._set_checkpointing(True)

    def gradient_checkpointing_disable(self) -> None:
        self._set_checkpointing(False)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(
            getattr(m, "gradient_checkpointing", False)
            for m in self.modules()
            if isinstance(m, GradientCheckpointingLayer)
        )

    def _set_checkpointing(self, enable: bool) -> None:
        # GradientCheckpointingLayer (Qwen2 decoder layers, Qwen2-VL blocks) wraps its own forward with these
        # two attributes; it only checkpoints in training mode with grad enabled.
        func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        for module in self.modules():
            if isinstance(module, GradientCheckpointingLayer):
                module.gradient_checkpointing = enable
                module._gradient_checkpointing_func = func

    # -------------------------------------------------------------------------------------- vision
    def encode_images(self, pixel_values: Tensor, image_grid_thw: Tensor) -> Tensor:
        """Pixel rows [N_patches, patch_dim] in merge-window order + grid (t, h, w) per image -> [N, D]."""
        vc = self.config.vision_config
        if image_grid_thw is None or image_grid_thw.dim() != 2 or image_grid_thw.shape[-1] != 3:
            shape = None if image_grid_thw is None else tuple(image_grid_thw.shape)
            raise ValueError(f"image_grid_thw must be [num_images, 3] (t, h, w), got {shape}")
        if pixel_values.dim() != 2 or pixel_values.shape[-1] != vc.patch_dim:
            raise ValueError(
                f"pixel_values must be [num_patches, {vc.patch_dim}], got {tuple(pixel_values.shape)}"
            )
        n_patches = int(image_grid_thw.prod(dim=-1).sum())
        if pixel_values.shape[0] != n_patches:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[0]} rows but image_grid_thw implies {n_patches}"
            )
        if bool((image_grid_thw[:, 1:] % vc.spatial_merge_size != 0).any()):
            raise ValueError(
                f"image_grid_thw h and w must be multiples of spatial_merge_size "
                f"{vc.spatial_merge_size}, got {image_grid_thw.tolist()}"
            )
        # A frozen tower builds no autograd graph, so it holds no activations for the backward.
        track = torch.is_grad_enabled() and any(p.requires_grad for p in self.visual.parameters())
        with torch.set_grad_enabled(track):
            merged = self.visual(pixel_values, grid_thw=image_grid_thw).pooler_output
        return self.projector(merged)

    def embed(
        self, input_ids: Tensor, pixel_values: Tensor | None = None, image_grid_thw: Tensor | None = None
    ) -> Tensor:
        """Token embeddings [B, L, D] with image features written, in order, at `image_token_id` positions."""
        embeds = self.model.embed_tokens(input_ids)
        is_image = input_ids == self.config.image_token_id
        n_slots = int(is_image.sum())
        n_features = 0
        if pixel_values is not None:
            features = self.encode_images(pixel_values, image_grid_thw)
            n_features = features.shape[0]
        if n_slots != n_features:
            raise ValueError(
                f"input_ids hold {n_slots} image tokens (id {self.config.image_token_id}) "
                f"but the images give {n_features} features"
            )
        if n_features == 0:
            return embeds
        # is_image[..., None]: [B, L, 1], broadcast over D; features fill the True slots in row-major order.
        return embeds.masked_scatter(is_image[..., None], features.to(embeds.dtype))

    # -------------------------------------------------------------------------------------- masks
    @staticmethod
    def default_position_ids(
        attention_mask: Tensor | None, past_length: int, length: int, device: torch.device
    ) -> Tensor:
        """[B or 1, L]: running count of valid tokens minus one (0..L-1 without padding), past the cache."""
        if attention_mask is None:
            return torch.arange(past_length, past_length + length, device=device)[None, :]  # [1, L]
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return positions[:, past_length:]

    @staticmethod
    def attention_bias(
        mode: str,
        attention_mask: Tensor | None,
        prefix_mask: Tensor | None,
        batch: int,
        past_length: int,
        length: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Tensor | None:
        """Additive float mask [B, 1, L, L_past + L] (0 = attend, finfo.min = not), or None for plain full.

        `full`: every valid key. `causal`: valid keys at or before the query. `prefix`: valid keys, and a
        prefix query (prompt/image) only sees prefix keys, so prefix states never depend on the answer.
        """
        total = past_length + length
        if mode == "full" and (attention_mask is None or bool(attention_mask.all())):
            return None
        allowed = torch.ones(batch, 1, length, total, dtype=torch.bool, device=device)
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]  # [B, 1, 1, L_past + L]
        query_index = torch.arange(past_length, total, device=device)[:, None]  # [L, 1]
        key_index = torch.arange(total, device=device)[None, :]  # [1, L_past + L]
        if mode == "causal":
            allowed = allowed & (key_index <= query_index)
        elif mode == "prefix":
            is_prefix = prefix_mask.bool()
            key_is_prefix = is_prefix[:, None, None, :]  # [B, 1, 1, L_past + L]
            query_is_prefix = is_prefix[:, None, past_length:, None]  # [B, 1, L, 1]
            allowed = allowed & (~query_is_prefix | key_is_prefix)
        # Every query may see itself. This changes only padded queries (nobody reads their outputs) and leaves
        # no row without a key: such a row becomes all -inf, then NaN, once the bias is narrowed (e.g. to
        # fp16), and NaN values would reach valid rows through `0 * NaN` in the next layer.
        allowed = allowed | (key_index == query_index)
        bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return bias.masked_fill_(~allowed, torch.finfo(dtype).min)

    # ------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        position_ids: Tensor | None = None,
        attention_mode: str | None = None,
        prefix_mask: Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool = False,
        return_logits: bool = True,
    ) -> DreamVLOutput:
        """Run the backbone.

        attention_mask / prefix_mask: [B, L_past + L] (1/True = valid token / prompt-or-image token),
        covering the cached tokens too; prefix_mask is read only in `prefix` mode. past_key_values: a
        DynamicCache; with use_cache=True it is extended by this call and returned, with use_cache=False it
        is only read.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, image_grid_thw)
        elif pixel_values is not None:
            raise ValueError("pixel_values need input_ids to locate the image tokens; got inputs_embeds")
        mode = attention_mode or self.config.attention
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}, got {mode!r}")

        batch, length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        cache = past_key_values
        if use_cache and cache is None:
            cache = DynamicCache()
        past_length = cache.get_seq_length() if cache is not None else 0
        total = past_length + length
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, total):
            raise ValueError(
                f"attention_mask must be [B, L_past + L] = [{batch}, {total}], "
                f"got {list(attention_mask.shape)}"
            )
        if mode == "prefix" and (prefix_mask is None or tuple(prefix_mask.shape) != (batch, total)):
            got = None if prefix_mask is None else list(prefix_mask.shape)
            raise ValueError(
                f"attention_mode 'prefix' needs prefix_mask [B, L_past + L] = [{batch}, {total}], got {got}"
            )
        if position_ids is None:
            position_ids = self.default_position_ids(attention_mask, past_length, length, device)
        position_ids = position_ids.expand(batch, -1)
        bias = self.attention_bias(
            mode, attention_mask, prefix_mask, batch, past_length, length, inputs_embeds.dtype, device
        )
        if cache is not None and self.training and torch.is_grad_enabled() and self.is_gradient_checkpointing:
            # transformers' checkpointed layers silently drop the cache, which would ignore the cached keys.
            raise ValueError("a KV cache cannot be combined with activation checkpointing in training mode")
        layer_cache = cache if use_cache or cache is None else _ReadOnlyCache(cache)

        hidden = inputs_embeds
        rotary = self.model.rotary_emb(hidden, position_ids)
        for layer in self.model.layers:
            hidden = layer(
                hidden,
                attention_mask=bias,
                position_embeddings=rotary,
                cache=layer_cache,
                use_cache=use_cache,
            )
        hidden = self.model.norm(hidden)
        logits = self.lm_head(hidden) if return_logits else None
        return DreamVLOutput(
            logits=logits, last_hidden_state=hidden, past_key_values=cache if use_cache else None
        )


__all__ = ["DreamVL", "DreamVLOutput", "Projector", "qwen2_text_config", "qwen2_vision_config"]
