"""LoRA adapters on the backbone through peft, and merging them back into plain weights for export.

Adapters are injected in place (`peft.inject_adapter_in_model`), so the module tree keeps the official names
plus peft's `base_layer`/`lora_A`/`lora_B` levels; `merge_lora` folds them into the base weights and restores
the plain modules, after which `save_pretrained` writes the official layout again.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

ALL_LINEAR = "all-linear"


def lora_target_names(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full names of the nn.Linear modules to adapt: `all-linear` means every one except `lm_head` (the output
    layer, as peft's shorthand); other entries are name suffixes such as `q_proj` or `visual.merger.mlp.0`."""
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if ALL_LINEAR in targets:
        chosen = [name for name in linear if name != "lm_head"]
    else:
        chosen = [name for name in linear if any(name == t or name.endswith("." + t) for t in targets)]
    if not chosen:
        raise ValueError(f"lora.targets {list(targets)} match no nn.Linear module of the backbone")
    return chosen


def apply_lora(
    model: nn.Module,
    *,
    rank: int,
    alpha: float,
    dropout: float,
    targets: Sequence[str],
    output_token_ids: Sequence[int] | None = None,
    input_token_ids: Sequence[int] | None = None,
) -> list[str]:
    """Freezes `model` and injects LoRA adapters, plus trainable deltas for the `lm_head` rows of
    `output_token_ids` and the `embed_tokens` rows of `input_token_ids`. Returns the adapted module names."""
    from peft import LoraConfig, inject_adapter_in_model

    names = lora_target_names(model, targets)
    tokens = {}
    if output_token_ids:
        tokens["lm_head"] = sorted(int(i) for i in output_token_ids)
    if input_token_ids:
        tokens["embed_tokens"] = sorted(int(i) for i in input_token_ids)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=names,
        trainable_token_indices=tokens or None,
    )
    model.requires_grad_(False)
    inject_adapter_in_model(config, model)
    return names


def merge_lora(model: nn.Module) -> int:
    """Folds every adapter into its base weight and restores the plain module; returns how many it merged."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import TrainableTokensWrapper

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
            _replace(model, name, module.get_base_layer())
            merged += 1
    for name, module in list(model.named_modules()):
        if isinstance(module, TrainableTokensWrapper):
            _replace(model, name, module.token_adapter)
    return merged


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
