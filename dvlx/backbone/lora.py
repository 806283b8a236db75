"""LoRA adapters on the backbone through peft, and merging them back into plain weights for export.

Adapters are injected in place (`peft.inject_adapter_in_model`), so the module tree keeps the official names
plus peft's `base_layer`/`lora_A`/`lora_B` levels; `merge_lora` folds them into the base weights and restores
the plain modules, after which `save_pretrained` writes the official layout again.

QLoRA (`quantize="nf4"`): the base weight of every adapted nn.Linear is stored in 4-bit NormalFloat with
double quantisation (bitsandbytes `Linear4bit`, bf16 compute); adapters, biases and every other module keep
their dtype. Merging dequantises: the export holds the NF4-rounded base weights plus the adapters, which is
the model that was trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ALL_LINEAR = "all-linear"
QUANTIZE_MODES = ("nf4",)


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
    quantize: str | None = None,
) -> list[str]:
    """Freezes `model` and injects LoRA adapters, plus trainable deltas for the `lm_head` rows of
    `output_token_ids` and the `embed_tokens` rows of `input_token_ids`; with `quantize="nf4"` the adapted
    base weights are first quantised (QLoRA). Returns the adapted module names."""
    from peft import LoraConfig, inject_adapter_in_model

    names = lora_target_names(model, targets)
    if quantize is not None:
        quantize_linear(model, names, quantize)
        # peft picks its 4-bit LoRA layer (which can dequantise for merging) only for models flagged so.
        model.is_loaded_in_4bit = True
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


def quantize_linear(
    model: nn.Module, names: Sequence[str], mode: str = "nf4", compute_dtype: torch.dtype = torch.bfloat16
) -> None:
    """Replaces the named nn.Linear modules by bitsandbytes `Linear4bit` (frozen NF4 weights, double
    quantisation, `compute_dtype` matmuls); the weights are quantised on the modules' current device."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"lora.quantize: '{mode}' is not one of {list(QUANTIZE_MODES)}")
    import bitsandbytes as bnb

    for name in names:
        old = model.get_submodule(name)
        if isinstance(old, bnb.nn.Linear4bit):
            continue
        new = bnb.nn.Linear4bit(
            old.in_features,
            old.out_features,
            bias=old.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type=mode,
            device="meta",
        )
        new.weight = bnb.nn.Params4bit(
            old.weight.data, requires_grad=False, compress_statistics=True, quant_type=mode
        )
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.data, requires_grad=False)
        new._register_load_state_dict_pre_hook(_load_prequantized, with_module=True)
        _replace(model, name, new.to(old.weight.device))


def _load_prequantized(module, state_dict, prefix, *args) -> None:
    """Load-state-dict hook of a 4-bit layer: a checkpoint holds the packed weight plus its quantisation
    state under `weight.*` (bitsandbytes writes them but does not read them back); the weight is rebuilt
    from both, and the packed data is then copied over by the regular loading."""
    import bitsandbytes as bnb

    stem = prefix + "weight."
    stats = {key[len(stem) :]: state_dict.pop(key) for key in [k for k in state_dict if k.startswith(stem)]}
    if not stats or prefix + "weight" not in state_dict:
        return
    module.weight = bnb.nn.Params4bit.from_prequantized(
        data=state_dict[prefix + "weight"],
        quantized_stats=stats,
        requires_grad=False,
        device=module.weight.device,
        module=module,
    )


def _dequantized_linear(base: nn.Module) -> nn.Linear:
    """A plain nn.Linear holding the dequantised weight of a bitsandbytes 4-bit layer (its original dtype)."""
    import bitsandbytes as bnb

    state = base.weight.quant_state
    weight = bnb.functional.dequantize_4bit(base.weight.data, state).to(state.dtype)
    plain = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
    plain.weight = nn.Parameter(weight, requires_grad=False)
    if base.bias is not None:
        plain.bias = nn.Parameter(base.bias.data.to(state.dtype), requires_grad=False)
    return plain


def _is_4bit(module: nn.Module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, bnb.nn.Linear4bit)


def merge_lora(model: nn.Module) -> int:
    """Folds every adapter into its base weight and restores the plain module (4-bit bases become plain
    dequantised nn.Linear modules); returns how many it merged."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import TrainableTokensWrapper

    quantized = getattr(model, "is_loaded_in_4bit", False)
    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            base = module.get_base_layer()
            if quantized and _is_4bit(base):
                # Merging in 4 bits would round the adapters' delta to NF4; it is added in full precision.
                plain = _dequantized_linear(base)
                with torch.no_grad():
                    for adapter in module.active_adapters:
                        plain.weight += module.get_delta_weight(adapter).to(plain.weight.dtype)
                _replace(model, name, plain)
            else:
                module.merge(safe_merge=True)
                _replace(model, name, base)
            merged += 1
    if quantized:
        model.is_loaded_in_4bit = False
    for name, module in list(model.named_modules()):
        if isinstance(module, TrainableTokensWrapper):
            _replace(model, name, module.token_adapter)
    return merged


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
