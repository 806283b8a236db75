"""Structured experiment configs (OmegaConf over dataclasses).

An experiment YAML fills an `ExperimentConfig`; it may name a base file with `extends: other.yaml` (resolved
relative to the file), and `key=value` overrides from the command line are applied last. Every key is typed
and defaulted here; an unknown key, a wrong type or an impossible combination is a `ConfigError` whose
message names the key and the file it came from.

Relative data and output paths are resolved against the current working directory (run from the repo root).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A bad experiment configuration: the message is one line naming the file and the key."""


@dataclass
class BackboneConfig:
    preset: str = "tiny"
    """Architecture preset (`tiny`, `small`, `7b`) used when `pretrained` is not set; weights are random."""
    pretrained: str | None = None
    """Folder in the official Hugging Face layout (config.json + safetensors) or a dvlx export."""
    tokenizer: str | None = None
    """Tokenizer folder; defaults to `pretrained`, or to the built-in tiny tokenizer for the `tiny` and
    `small` presets."""
    attention: str = "full"
    """Attention mode of the LM: `full` (Dream), `prefix` or `causal`."""
    attn_implementation: str = "sdpa"
    """transformers attention kernel: `sdpa` or `eager`."""
    gradient_checkpointing: bool = False
    init_checkpoint: str | None = None
    """A dvlx Lightning checkpoint whose `backbone.*` weights are loaded over the model built from
    `pretrained`/`preset` (e.g. the projector of a pre-training run); optimiser state is not taken."""


@dataclass
class ProcessorConfig:
    """Image processor bounds; they travel into every export so training and inference agree."""

    min_pixels: int = 112 * 112
    max_pixels: int = 112 * 112


@dataclass
class SyntheticDataConfig:
    """A dataset the package generates itself (demo and tests) when `data.train` does not exist yet."""

    kind: str = "captions"
    """`captions`, `vqa`, `vqa-blank` (image-text; the last with uniform grey images, a text-only control)
    or `robosuite-lift`, `robosuite-lift-color` (trajectories)."""
    num_train: int = 2000
    """Samples (image-text) or episodes (simulator demonstrations)."""
    num_val: int = 200
    image_size: int = 112
    seed: int = 0
    action_noise: float = 0.0
    """Simulator demonstrations: std of Gaussian noise on the executed (not the recorded) position deltas,
    so that the data shows how to recover from small errors (`data_modules.demos`)."""


@dataclass
class DatasetEntry:
    """One trajectory dataset of a mixture: a shard folder and its sampling weight."""

    path: str = ""
    weight: float = 1.0


@dataclass
class DataConfig:
    kind: str = "image_text"
    """`image_text` (VL stages) or `trajectory` (VLA stage)."""
    train: str | None = None
    """Shard directory (with meta.json), glob, brace pattern `a-{000000..000009}.tar`, or comma list."""
    val: str | None = None
    synthetic: SyntheticDataConfig | None = None
    """If set, `train`/`val` are generated into `synthetic_dir` when absent."""
    synthetic_dir: str = "data/synthetic_captions"
    template: str = "plain"
    batch_size: int = 8
    """Per-device micro-batch size."""
    val_batch_size: int | None = None
    num_workers: int = 2
    shuffle_buffer: int = 1000
    max_length: int = 8192
    num_eos: int = 0
    """EOS tokens appended (and supervised) after the last turn: a fixed, batch-independent amount."""
    max_fault_fraction: float = 0.1
    """Stop the run when more than this fraction of samples is corrupt (they are skipped and counted)."""
    datasets: list[DatasetEntry] = field(default_factory=list)
    """Trajectory datasets (a weighted mixture); a single one may be given as `train` instead."""
    horizon: int = 8
    """Action chunk H trained and predicted (at most the shards' max_horizon)."""
    cameras: list[str] | None = None
    """Cameras fed to the model, in this order; None = all cameras of the first dataset."""
    use_proprio: bool = True
    normalization: str = "bounds_q99"
    image_size: int = 224
    augment: bool = True
    """Random 90 %-area crops and colour jitter (trajectory data); inference then uses the centre crop."""
    val_episodes: float = 0.05
    """Episodes held out per dataset for validation: a fraction (< 1) or a count (>= 1)."""
    balance: bool = True
    """Multiply mixture weights by dataset sizes (Open-X style)."""
    length_grouping: int = 0
    """If > 1, each worker gathers this many batches' worth of samples, sorts them by token count (image
    tokens included) and batches neighbours together, so padding shrinks; 0 or 1 = off."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "cosine"
    """After the linear warm-up: `cosine` (to `min_lr_ratio * lr`), `linear` (likewise) or `constant`."""
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None
    """Overrides `warmup_ratio` when set."""
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    lr_vision: float | None = None
    """Learning rate of the trainable vision blocks and merger (the paper: 2e-6); None = `lr`."""
    lr_projector: float | None = None
    """Learning rate of the projector; None = `lr`."""
    global_batch_size: int | None = None
    """If set, gradient accumulation = global / (per-device batch * devices * nodes), which must divide."""
    optimizer: str = "adamw"
    """`adamw` (torch) or `adamw8bit` (bitsandbytes: 8-bit optimiser states)."""


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    """Optimiser steps."""
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    """`auto`, `ddp`, `fsdp`, `deepspeed_stage_2` or `deepspeed_stage_3` (see docs/scaling.md)."""
    fsdp_sharding: str = "FULL_SHARD"
    """FSDP: `FULL_SHARD`, `SHARD_GRAD_OP`, `HYBRID_SHARD` (shard within a node) or `NO_SHARD`."""
    fsdp_state_dict: str = "sharded"
    """FSDP checkpoints: `sharded` (a folder, one file per rank) or `full` (one file, gathered on rank 0)."""
    cpu_offload: bool = False
    """FSDP and DeepSpeed: keep optimiser states (and under FSDP / ZeRO-3 parameters) in CPU memory."""
    find_unused_parameters: bool = False
    """DDP: tolerate trainable parameters that receive no gradient in a step (slower)."""
    compile: bool = False
    """torch.compile every LM decoder layer and vision block (regional compilation)."""
    precision: str = "32-true"
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    val_every_n_steps: int = 100
    limit_val_batches: int | None = None
    checkpoint_every_n_steps: int = 100
    max_consecutive_nonfinite: int = 5
    """Optimiser steps with a NaN/inf loss or gradient are skipped; this many in a row stop the run."""
    seed: int = 0
    progress_bar: bool = True


@dataclass
class DiffusionConfig:
    eps: float = 1e-3
    weighting: str = "cart"
    cart_p: float = 0.1
    ce_chunk_size: int = 8192


@dataclass
class LoraConfig:
    """LoRA adapters through peft (`rank` 0 = full fine-tuning of `stage.trainable`)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module-name suffixes to adapt; `all-linear` = every nn.Linear of the backbone except lm_head."""
    train_action_rows: bool = True
    """With token objectives, also train the embedding and output rows of the action tokens."""
    quantize: str | None = None
    """`nf4`: QLoRA, the base weights under the adapters stored in 4-bit NormalFloat (bitsandbytes, bf16
    compute); None = the base weights keep their dtype."""


@dataclass
class ObjectiveConfig:
    """The action objective of the VLA stage (`dvlx/objectives/<name>.py`)."""

    name: str = "flow_matching"
    """`discrete`, `discrete_diffusion`, `l1`, `diffusion`, `flow_matching` or `ar`."""
    steps: int | None = None
    """Inference steps; None = the objective's default (flow 4, DDIM 50, discrete diffusion 1)."""
    num_bins: int = 256
    """Action-token bins over the normalised range [-1, 1] (token objectives)."""
    head_blocks: int = 2
    """Residual blocks of the MLP-ResNet heads (continuous objectives)."""
    train_timesteps: int = 50
    """Discrete noise levels of the DDIM objective."""
    time_sampler: str = "beta"
    """Flow matching training times: `beta` (Beta(1.5, 1) towards noise) or `uniform`."""
    weighting: str = "cart"
    """Token weighting of the discrete-diffusion loss (`cart` or `none`)."""
    supervise_suffix: bool = True
    """Token objectives also predict the `<|im_end|>` and newline after the actions."""
    use_cache: bool = True
    """Reuse the prompt's KV cache across sampling steps where it is exact (`prefix` attention)."""


@dataclass
class GenerationEvalConfig:
    """Generation on held-out image-text data after every validation run (VL stages)."""

    enabled: bool = False
    num_samples: int = 64
    """Validation records answered each time (the first ones of `data.val`)."""
    num_logged: int = 4
    """Samples written to TensorBoard (image, prompt, reference, generated answer)."""
    steps: int = 4
    max_new_tokens: int = 8
    alg: str = "maskgit_plus"


@dataclass
class StageConfig:
    name: str = "vl_pretrain"
    trainable: list[str] | None = None
    """Parts that train, from `projector`, `lm`, `vision`, `merger`; None = the stage's default
    (`vl_pretrain`: projector only, as in the paper)."""
    vision_from_block: int = 0
    """With `vision` trainable: vision blocks before this index stay frozen (the paper unfreezes from 16)."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    generation: GenerationEvalConfig = field(default_factory=GenerationEvalConfig)
    val_sample_batches: int = 2
    """VLA: validation batches on which actions are also sampled (`val/l1_sampled`)."""
    val_t: float = 1.0
    """Diffusion time used for validation masking (1.0 masks every target token)."""


@dataclass
class RolloutConfig:
    """Closed-loop rollouts of the VLA stage during training (`callbacks/rollouts.py`,
    `dvlx.eval.rollout`): success rate in TensorBoard, optionally the checkpoint selection metric."""

    enabled: bool = False
    env: str = "robosuite-lift"
    """`robosuite-lift`, `robosuite-lift-color` or a LIBERO suite (`libero_spatial`, ...)."""
    every_n_steps: int = 0
    """Run every this many optimiser steps (0 = only at the end, with `at_end`)."""
    at_end: bool = True
    """Also run when training ends (on the exported weights) and print the success rate."""
    episodes: int = 10
    """Episodes per task (LIBERO: initial states 0..episodes-1 of each task)."""
    workers: int = 2
    max_steps: int | None = None
    """Policy steps per episode; None = the environment's limit."""
    open_loop_steps: int | None = None
    """Actions executed per chunk; None = the whole chunk."""
    seed: int = 7
    """The same episodes every time, so that runs at different steps compare."""
    video: bool = True
    """A frame strip of the first episode in TensorBoard (`rollout/frames`)."""
    monitor: bool = False
    """Keep the checkpoint with the best `rollout/success_rate` as `checkpoints/best-rollout-*.ckpt`."""
    libero_assets: str | None = None


@dataclass
class ExperimentConfig:
    name: str = ""
    """Experiment name; defaults to the YAML file's stem."""
    extends: str | None = None
    output_dir: str = "runs"
    variant: str = "default"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    processor: ProcessorConfig = field(default_factory=ProcessorConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """Used by the `vla` stage only."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Used by the `vla` stage only."""

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name / self.variant


ATTENTION_CHOICES = ("full", "prefix", "causal")
SCHEDULES = ("cosine", "linear", "constant")
WEIGHTINGS = ("cart", "none")
TEMPLATES = ("plain", "qwen_2_5")
TRAINABLE_PARTS = ("projector", "lm", "vision", "merger")
SYNTHETIC_KINDS = ("captions", "vqa", "vqa-blank", "robosuite-lift", "robosuite-lift-color")
DATA_KINDS = ("image_text", "trajectory")
NORMALIZATION_MODES = ("bounds_q99", "bounds", "mean_std")
PRESETS = ("tiny", "small", "7b")
ROLLOUT_ENVS = ("robosuite-lift", "robosuite-lift-color", "libero_spatial", "libero_object", "libero_goal",
                "libero_10", "libero_90")
STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed_stage_2", "deepspeed_stage_3")
FSDP_SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")
STATE_DICT_TYPES = ("sharded", "full")
OPTIMIZERS = ("adamw", "adamw8bit")
QUANTIZE_MODES = ("nf4",)


def did_you_mean(name: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        hint = did_you_mean(value, choices)
        raise ConfigError(f"key '{key}': '{value}' is not one of {list(choices)}{hint}")


def validate(
    cfg: ExperimentConfig, stage_names: tuple[str, ...] = (), objective_names: tuple[str, ...] = ()
) -> None:
    """Checks that need more than one key or a closed set of choices; raises ConfigError naming the key."""
    _check_choice("backbone.attention", cfg.backbone.attention, ATTENTION_CHOICES)
    if cfg.backbone.pretrained is None:
        _check_choice("backbone.preset", cfg.backbone.preset, PRESETS)
    _check_choice("optim.schedule", cfg.optim.schedule, SCHEDULES)
    _check_choice("stage.diffusion.weighting", cfg.stage.diffusion.weighting, WEIGHTINGS)
    _check_choice("data.template", cfg.data.template, TEMPLATES)
    if stage_names:
        _check_choice("stage.name", cfg.stage.name, stage_names)
    if objective_names and cfg.stage.name == "vla":
        _check_choice("objective.name", cfg.objective.name, objective_names)
    for part in cfg.stage.trainable or ():
        _check_choice("stage.trainable", part, TRAINABLE_PARTS)
    positive = {
        "data.batch_size": cfg.data.batch_size,
        "data.max_length": cfg.data.max_length,
        "trainer.max_steps": cfg.trainer.max_steps,
        "trainer.checkpoint_every_n_steps": cfg.trainer.checkpoint_every_n_steps,
        "trainer.max_consecutive_nonfinite": cfg.trainer.max_consecutive_nonfinite,
        "trainer.val_every_n_steps": cfg.trainer.val_every_n_steps,
        "trainer.accumulate_grad_batches": cfg.trainer.accumulate_grad_batches,
        "processor.min_pixels": cfg.processor.min_pixels,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"key '{key}': must be positive, got {value}")
    if cfg.processor.max_pixels < cfg.processor.min_pixels:
        raise ConfigError(
            f"key 'processor.max_pixels': {cfg.processor.max_pixels} is below processor.min_pixels "
            f"{cfg.processor.min_pixels}"
        )
    if cfg.optim.lr <= 0:
        raise ConfigError(f"key 'optim.lr': must be positive, got {cfg.optim.lr}")
    if not 0.0 <= cfg.optim.warmup_ratio < 1.0:
        raise ConfigError(f"key 'optim.warmup_ratio': must be in [0, 1), got {cfg.optim.warmup_ratio}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"key 'optim.betas': expected two values, got {list(cfg.optim.betas)}")
    if not 0.0 <= cfg.data.max_fault_fraction <= 1.0:
        fraction = cfg.data.max_fault_fraction
        raise ConfigError(f"key 'data.max_fault_fraction': must be in [0, 1], got {fraction}")
    if not 0.0 < cfg.stage.val_t <= 1.0:
        raise ConfigError(f"key 'stage.val_t': must be in (0, 1], got {cfg.stage.val_t}")
    for key in ("lr_vision", "lr_projector"):
        value = getattr(cfg.optim, key)
        if value is not None and value <= 0:
            raise ConfigError(f"key 'optim.{key}': must be positive, got {value}")
    _check_choice("data.kind", cfg.data.kind, DATA_KINDS)
    _check_choice("data.normalization", cfg.data.normalization, NORMALIZATION_MODES)
    if cfg.data.synthetic is not None:
        _check_choice("data.synthetic.kind", cfg.data.synthetic.kind, SYNTHETIC_KINDS)
    if cfg.lora.rank < 0:
        raise ConfigError(f"key 'lora.rank': must be >= 0, got {cfg.lora.rank}")
    if cfg.lora.rank > 0 and cfg.stage.name != "vla":
        raise ConfigError(f"key 'lora.rank': LoRA adapters are built by stage 'vla' only; stage "
                          f"'{cfg.stage.name}' trains the full weights of stage.trainable (set lora.rank=0)")
    _check_choice("trainer.strategy", cfg.trainer.strategy, STRATEGIES)
    _check_choice("trainer.fsdp_sharding", cfg.trainer.fsdp_sharding, FSDP_SHARDING)
    _check_choice("trainer.fsdp_state_dict", cfg.trainer.fsdp_state_dict, STATE_DICT_TYPES)
    _check_choice("optim.optimizer", cfg.optim.optimizer, OPTIMIZERS)
    if cfg.lora.quantize is not None:
        _check_choice("lora.quantize", cfg.lora.quantize, QUANTIZE_MODES)
        if cfg.lora.rank == 0:
            raise ConfigError("key 'lora.quantize': quantized base weights need adapters (lora.rank > 0)")
    if cfg.data.horizon < 1:
        raise ConfigError(f"key 'data.horizon': must be >= 1, got {cfg.data.horizon}")
    if cfg.rollout.enabled:
        _check_choice("rollout.env", cfg.rollout.env, ROLLOUT_ENVS)
        for key in ("every_n_steps", "episodes", "workers", "max_steps", "open_loop_steps"):
            value = getattr(cfg.rollout, key)
            low = 0 if key == "every_n_steps" else 1
            if value is not None and value < low:
                raise ConfigError(f"key 'rollout.{key}': must be >= {low}, got {value}")
        if cfg.rollout.monitor and cfg.rollout.every_n_steps == 0:
            raise ConfigError("key 'rollout.monitor': selecting checkpoints needs rollout.every_n_steps > 0")
    if cfg.data.train is None and cfg.data.synthetic is None and not cfg.data.datasets:
        raise ConfigError("key 'data.train': no training data given (set data.train or data.synthetic)")


def _unknown_key_message(err: ConfigKeyError, source: str) -> str:
    key = err.full_key or str(err.key)
    parent = err.object_type
    hint = ""
    if parent is not None and hasattr(parent, "__dataclass_fields__"):
        hint = did_you_mean(str(err.key), list(parent.__dataclass_fields__))
    return f"{source}: unknown key '{key}'{hint}"


def _merge(base: DictConfig, update: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except ConfigKeyError as err:
        raise ConfigError(_unknown_key_message(err, source)) from None
    except ValidationError as err:
        raise ConfigError(f"{source}: key '{err.full_key}': {err.msg.splitlines()[0]}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {str(err).splitlines()[0]}") from None


def _load_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, DictConfig]]:
    """The YAML file and the files it extends, base first."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle: {' -> '.join(str(p) for p in (*seen, path))}")
    if not path.is_file():
        raise ConfigError(f"{path}: experiment file not found")
    try:
        node = OmegaConf.load(path)
    except Exception as err:  # YAML syntax errors come from several libraries
        raise ConfigError(f"{path}: cannot parse YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    chain: list[tuple[Path, DictConfig]] = []
    base = node.get("extends")
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: key 'extends': expected a file name, got {base!r}")
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        chain.extend(_load_yaml_chain(base_path, (*seen, path)))
    chain.append((path, node))
    return chain


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"command line: override '{item}' is not of the form key=value")
    key, value = item.split("=", 1)
    parsed = OmegaConf.from_dotlist([f"x={value}"]).x
    return key.strip(), parsed


def load_config(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    stage_names: tuple[str, ...] = (),
    objective_names: tuple[str, ...] = (),
) -> ExperimentConfig:
    """Reads an experiment YAML (with its `extends` chain), applies `key=value` overrides, validates."""
    path = Path(path)
    merged = OmegaConf.structured(ExperimentConfig)
    for file_path, node in _load_yaml_chain(path):
        merged = _merge(merged, node, str(file_path))
    for item in overrides:
        key, value = parse_override(item)
        update = OmegaConf.create()
        try:
            OmegaConf.update(update, key, value, force_add=True)
        except OmegaConfBaseException as err:
            raise ConfigError(f"command line: bad override '{item}': {str(err).splitlines()[0]}") from None
        merged = _merge(merged, update, "command line")
    if not merged.name:
        merged.name = path.stem
    merged.extends = None
    try:
        cfg: ExperimentConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {str(err).splitlines()[0]}") from None
    try:
        validate(cfg, stage_names, objective_names)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return cfg


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
