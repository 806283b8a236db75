"""Training memory per GPU, estimated before launch: weights, gradients, optimiser states, activations.

    python -m dvlx.bench memory --preset 7b --stage vla --lora 32 --batch 8 [--quantize nf4]
        [--optimizer adamw|adamw8bit] [--precision bf16-mixed|bf16-true|32-true] [--images 2]
        [--image-size 224] [--text-tokens 100] [--world-sizes 1,8] [--strategies ddp,fsdp,zero2,zero3]

The model is built on the meta device (nothing is allocated) with the stage's real trainability rules (LoRA
through peft, frozen parts, the objective's heads), so parameter and trainable counts are exact. Activations
are measured, not modelled: every repeated block (each LM decoder layer, each vision block, the merger,
the projector, the final norm) runs once on the meta device under `saved_tensors_hooks`, and the bytes of
the distinct tensors autograd keeps for the backward are summed. Attention runs through a stand-in shaped
like the flash / memory-efficient kernels (it keeps q, k and v with the KV heads repeated, the output and a
float32 log-sum-exp per query; no L x L matrix), which is what SDPA keeps on a GPU and on the CPU.

Per-GPU bytes by strategy (N = world size, P = parameters, T = trainable parameters):

| strategy | weights | gradients | optimiser states |
|---|---|---|---|
| ddp (and one GPU) | P x weight bytes | T x param bytes | AdamW 2 states in the param dtype; 8-bit: 2 B |
| fsdp (FULL_SHARD) | P x 4 / N + two unsharded bf16 blocks | T x 4 / N | as ddp, / N |
| zero2 | P x 2 + T x 4 / N (float32 master) | T x 2 / N | as ddp for float32, / N |
| zero3 | P x 2 / N + T x 4 / N + two bf16 blocks | T x 2 / N | as zero2 |

Weight bytes: `bf16-true` 2, `bf16-mixed` and `32-true` 4 (float32 weights, bf16 compute), NF4 (QLoRA base
weights) about 0.516 (4 bits + an 8-bit scale per 64 and a float32 scale per 256 scales). Under `bf16-mixed`
without FSDP, autocast also keeps a bf16 copy of every weight a matmul used until the backward (2 B x the
matmul weights on the grad path; with activation checkpointing only one block's worth).

Activations with checkpointing: the input of every block plus one block recomputed in the backward.
Workspace: the vocabulary logits of one loss chunk (VL stages) in bf16 and float32 plus their gradient.
Not included: the CUDA context and kernels (about 0.5 to 1 GiB), allocator fragmentation (often 5 to 15 %),
communication buckets of DDP/ZeRO (a few hundred MiB). `bf16-mixed` activations are estimated as bf16;
real runs keep the residual stream in float32, which adds 2 B x B x L x D per layer (reported as a note).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dvlx.backbone import DreamVL, preset_config

GIB = 2**30
STRATEGY_CHOICES = ("ddp", "fsdp", "zero2", "zero3")
PRECISIONS = ("bf16-mixed", "bf16-true", "32-true")
NF4_BLOCK = 64
NF4_TABLES = (16 + 256 + 1) * 4
"""Per quantised tensor: the NF4 code (16 floats), the 8-bit code of the scales (256) and their offset."""
ADAM8BIT_MIN_SIZE = 4096
"""bitsandbytes keeps 32-bit states for tensors smaller than this."""
ADAM8BIT_BLOCK = 256
ADAM8BIT_TABLES = 2 * 256 * 4
"""The two 8-bit codes, shared by all tensors."""
CHECKPOINT_STATE_BYTES = 5056 + 16
"""A checkpointed block also keeps the CPU and the CUDA generator states (to replay dropout)."""
CONTEXT_GIB = 1.0
"""CUDA context and kernels, added to the per-card verdict."""
PEERS = {
    "vla": "OpenVLA-OFT (7B, LoRA rank 32, batch 8, one GPU, bf16): about 62 GB reported",
}
_ATTENTION = "dvlx_kernel_shaped"


@dataclass
class Job:
    """What trains and on what shapes."""

    preset: str = "7b"
    stage: str = "vla"
    objective: str = "flow_matching"
    lora_rank: int = 0
    quantize: str | None = None
    trainable: list[str] | None = None
    vision_from_block: int = 0
    batch: int = 8
    images: int = 2
    image_size: int = 224
    text_tokens: int = 100
    """Tokens besides the visual ones: prompt, proprio, action slots / answer."""
    loss_tokens: int = 0
    """VL stages: supervised tokens per sample (the diffusion loss's rows); 0 = half of `text_tokens`."""
    horizon: int = 8
    action_dim: int = 7
    proprio_dim: int = 8
    precision: str = "bf16-mixed"
    optimizer: str = "adamw"
    ce_chunk_size: int = 8192
    preset_overrides: dict = field(default_factory=dict)


@dataclass
class Counts:
    parameters: int
    trainable: int
    quantized: int
    """Frozen parameters stored in NF4 (QLoRA base weights)."""
    quantized_bytes: float
    """Their bytes: 4 bits each, an 8-bit scale per 64, a float32 scale per 256 scales, the code tables."""
    matmul_frozen: int
    """Frozen (non-quantised) weights of the linear layers on the gradient path (autocast copies them)."""
    largest_block: int
    """Parameters of the largest LM layer or vision block (an FSDP / ZeRO-3 unit)."""
    optimizer_bytes: float
    """AdamW state bytes for the trainable tensors at the param dtype (the 8-bit rule per tensor)."""


@dataclass
class Activations:
    per_block: list[int]
    """Saved bytes of each block (vision blocks, then LM layers) without checkpointing."""
    block_inputs: list[int]
    """What each checkpointed block keeps: its input and the generator states."""
    other: int
    """Merger, projector, final norm, loss rows, attention bias and rotary tables."""
    workspace: int
    """Transient peak outside the saved set (one loss chunk's logits)."""
    lm_residual: int
    """B x L x D x 2: the float32 residual stream's extra bytes per LM layer under bf16-mixed."""

    def retained(self, checkpointing: bool) -> int:
        """Bytes alive between the forward and the backward."""
        return sum(self.block_inputs if checkpointing else self.per_block) + self.other

    def saved(self, checkpointing: bool) -> int:
        """Peak of the saved set: with checkpointing, one block is recomputed on top of the retained bytes."""
        return self.retained(checkpointing) + (max(self.per_block, default=0) if checkpointing else 0)


# ------------------------------------------------------------------------------------------- model
def _tokenizer_ids(preset: str) -> dict:
    if preset == "7b":
        return {}
    from dvlx.processing import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    return {"vocab_size": len(tokenizer), **tokenizer.special_ids()}


def _action_spec(job: Job):
    from dvlx.processing.robot import ActionSpec, ArrayStats, Normalizer

    def stats(dim: int) -> ArrayStats:
        return ArrayStats(mean=[0.0] * dim, std=[1.0] * dim, min=[-1.0] * dim, max=[1.0] * dim,
                          q01=[-1.0] * dim, q99=[1.0] * dim, count=1)

    a, s = job.action_dim, job.proprio_dim
    return ActionSpec(
        horizon=job.horizon, max_horizon=job.horizon, action_dim=a, proprio_dim=s,
        cameras=[f"camera{i}" for i in range(job.images)], action_names=[f"a{i}" for i in range(a)],
        proprio_names=[f"s{i}" for i in range(s)], control_hz=10.0,
        action_normalizer=Normalizer("bounds_q99", stats(a), [True] * a),
        proprio_normalizer=Normalizer("bounds_q99", stats(s), [True] * s) if s else None,
        image_size=job.image_size,
    )


def build_stage(job: Job, device: str | torch.device = "meta", quantize: bool = False) -> nn.Module:
    """The stage's LightningModule with the job's trainability, built on `device` (random weights).

    LoRA adapters are injected without quantisation unless `quantize` (the meta device cannot quantise);
    `Job.quantize` is accounted for in bytes either way."""
    from dvlx.config import ExperimentConfig, LoraConfig, ObjectiveConfig, OptimConfig, StageConfig
    from dvlx.objectives import objective_class
    from dvlx.stages import STAGES

    cfg = ExperimentConfig(
        stage=StageConfig(name=job.stage, trainable=job.trainable, vision_from_block=job.vision_from_block),
        objective=ObjectiveConfig(name=job.objective),
        lora=LoraConfig(rank=job.lora_rank, alpha=16.0, quantize=job.quantize if quantize else None),
        optim=OptimConfig(optimizer=job.optimizer),
    )
    with torch.device(device):
        config = preset_config(job.preset, **_tokenizer_ids(job.preset), **job.preset_overrides)
        backbone = DreamVL(config)
        if job.stage == "vla":
            if getattr(objective_class(job.objective), "uses_action_tokens", False):
                raise ValueError(
                    f"dvlx.bench memory: objective '{job.objective}' needs the real tokenizer (action "
                    "tokens); estimate with a continuous objective (l1, diffusion, flow_matching)"
                )
            return STAGES["vla"](cfg, backbone, None, _action_spec(job))
        return STAGES[job.stage](cfg, backbone)


def _is_lora_base(name: str) -> bool:
    return name.endswith("base_layer.weight")


def count_parameters(stage: nn.Module, job: Job) -> Counts:
    """Parameter counts and the byte-relevant groups of a built stage."""
    from dvlx.backbone.model import BLOCK_CLASSES

    backbone = stage.backbone
    total = trainable = quantized = matmul_frozen = 0
    param_bytes = 2 if job.precision == "bf16-true" else 4
    optimizer_bytes = quantized_bytes = 0.0
    for name, p in stage.named_parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
            if job.optimizer == "adamw8bit" and n >= ADAM8BIT_MIN_SIZE:
                optimizer_bytes += 2 * (n + 4 * -(-n // ADAM8BIT_BLOCK))  # codes + a float32 absmax per block
            else:
                optimizer_bytes += 2 * n * (4 if job.optimizer == "adamw8bit" else param_bytes)
        elif job.quantize and _is_lora_base(name):
            quantized += n
            scales = -(-n // NF4_BLOCK)
            quantized_bytes += n / 2 + scales + 4 * -(-scales // 256) + NF4_TABLES
    if job.optimizer == "adamw8bit" and optimizer_bytes:
        optimizer_bytes += ADAM8BIT_TABLES
    for name, module in backbone.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head" and not module.weight.requires_grad:
            if not (job.quantize and name.endswith("base_layer")) and _on_grad_path(name, backbone):
                matmul_frozen += module.weight.numel()
    largest = max(
        sum(p.numel() for p in m.parameters()) for m in backbone.modules() if isinstance(m, BLOCK_CLASSES)
    )
    return Counts(total, trainable, quantized, quantized_bytes, matmul_frozen, largest, optimizer_bytes)


def _on_grad_path(name: str, backbone: DreamVL) -> bool:
    """Linear layers whose inputs carry gradient: the LM and projector always (something upstream trains in
    every stage), the vision tower only where it trains."""
    if name.startswith("visual."):
        return any(p.requires_grad for p in backbone.visual.parameters())
    return True


# ------------------------------------------------------------------------------------- activations
class _KernelShaped(torch.autograd.Function):
    """Attention that keeps for the backward what fused kernels keep: q, k, v, the output, the LSE (and the
    additive bias, when there is one)."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, bias: Tensor | None) -> Tensor:
        out = torch.empty_like(query)  # [B, n_heads, L, head_dim], the query's memory layout
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)  # [B, n_heads, L]
        ctx.save_for_backward(query, key, value, out, lse, *(() if bias is None else (bias,)))
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        raise RuntimeError("dvlx.bench memory: the kernel-shaped attention only measures the forward")


def _kernel_shaped_attention(module, query, key, value, attention_mask=None, **kwargs):
    groups = query.shape[1] // key.shape[1]
    if groups > 1 and attention_mask is not None:
        # transformers hands SDPA the KV heads repeated to the query heads whenever a mask is passed.
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    out = _KernelShaped.apply(query, key, value, attention_mask)
    return out.transpose(1, 2), None  # [B, L, n_heads, head_dim]


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_ATTENTION, _kernel_shaped_attention)


def saved_bytes(fn, module: nn.Module, shared: tuple[Tensor, ...] = ()) -> int:
    """Bytes of the distinct tensors autograd saves while `fn()` runs, except `module`'s parameters and
    buffers and the `shared` tensors (inputs common to all blocks, counted once by the caller)."""
    own = {t.untyped_storage()._cdata for t in [*module.parameters(), *module.buffers(), *shared]}
    kept: dict[int, Tensor] = {}

    def pack(t: Tensor) -> Tensor:
        key = t.untyped_storage()._cdata
        if key not in own:
            kept.setdefault(key, t)  # the tensor stays referenced, so its storage address is not reused
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(t.untyped_storage().nbytes() for t in kept.values())


def sequence_shape(config, job: Job) -> tuple[int, int, int]:
    """(L, visual tokens per sample, patches per image) of a DreamVLConfig for the job's images and text."""
    vc = config.vision_config
    side = job.image_size // vc.patch_size
    patches = side * side
    tokens = patches // (vc.spatial_merge_size**2)
    return job.images * tokens + job.text_tokens, job.images * tokens, patches


def measure_activations(stage: nn.Module, job: Job, device: str | torch.device = "meta") -> Activations:
    """Per-block saved bytes of the job's forward (see the module docstring), on `device`."""
    _register_attention()
    backbone = stage.backbone
    dtype = torch.float32 if job.precision == "32-true" else torch.bfloat16
    size = torch.finfo(dtype).bits // 8
    backbone.to(dtype)
    config = backbone.config
    batch = job.batch
    length, visual, patches = sequence_shape(config, job)
    width = config.hidden_size
    head_dim = width // config.num_attention_heads

    def tensor(*shape: int, grad: bool = True) -> Tensor:
        return torch.empty(*shape, device=device, dtype=dtype, requires_grad=grad)

    per_block: list[int] = []
    block_inputs: list[int] = []
    other = 0

    # Vision tower: all images of the batch in one packed sequence, block-diagonal per image.
    visual_tower = backbone.visual
    n_patches = batch * job.images * patches
    if job.images and any(p.requires_grad for p in visual_tower.parameters()):
        visual_tower.config._attn_implementation = _ATTENTION
        vhead = visual_tower.config.embed_dim // visual_tower.config.num_heads
        cu = torch.arange(0, n_patches + 1, patches, dtype=torch.int32)
        rotary = (tensor(n_patches, vhead, grad=False), tensor(n_patches, vhead, grad=False))
        grad_in = any(p.requires_grad for p in visual_tower.patch_embed.parameters())
        for block in visual_tower.blocks:
            trains = any(p.requires_grad for p in block.parameters())
            grad_in = grad_in or trains
            hidden = tensor(n_patches, visual_tower.config.embed_dim, grad=grad_in)
            run = lambda b=block, h=hidden: b(h, cu_seqlens=cu, position_embeddings=rotary)  # noqa: E731
            per_block.append(saved_bytes(run, block, rotary))
            block_inputs.append(hidden.numel() * size + CHECKPOINT_STATE_BYTES if grad_in else 0)
        merged_in = tensor(n_patches, visual_tower.config.embed_dim, grad=grad_in)
        other += saved_bytes(lambda: visual_tower.merger(merged_in), visual_tower.merger)
        other += 2 * n_patches * vhead * size  # vision rotary cos / sin
    features = tensor(batch * visual, visual_tower.config.hidden_size, grad=True)
    if job.images:
        other += saved_bytes(lambda: backbone.projector(features), backbone.projector)

    # LM layers: every input carries gradient (something below trains in every stage).
    backbone.model.config._attn_implementation = _ATTENTION
    rotary = (tensor(batch, length, head_dim, grad=False), tensor(batch, length, head_dim, grad=False))
    # dvlx passes an additive bias whenever a batch has padding or the mode is not `full` (the usual case):
    # SDPA then gets the KV heads repeated to the query heads.
    bias = tensor(batch, 1, length, length, grad=False)
    for layer in backbone.model.layers:
        hidden = tensor(batch, length, width)
        run = lambda m=layer, h=hidden: m(h, attention_mask=bias, position_embeddings=rotary)  # noqa: E731
        per_block.append(saved_bytes(run, layer, (*rotary, bias)))
        block_inputs.append(hidden.numel() * size + CHECKPOINT_STATE_BYTES)
    hidden = tensor(batch, length, width)
    other += saved_bytes(lambda: backbone.model.norm(hidden), backbone.model.norm)
    other += 2 * batch * length * head_dim * size  # LM rotary cos / sin
    other += batch * length * length * size  # the additive attention bias [B, 1, L, L]

    workspace = 0
    if job.stage != "vla":
        rows = batch * (job.loss_tokens or job.text_tokens // 2)
        other += rows * width * size  # the hidden rows at loss positions, kept by the chunked loss
        chunk = min(rows, job.ce_chunk_size)
        workspace = chunk * config.vocab_size * (size + 4 + 4)  # logits, float32 copy, their gradient
    lm_residual = 2 * batch * length * width if job.precision == "bf16-mixed" else 0
    return Activations(per_block, block_inputs, other, workspace, lm_residual)


# ------------------------------------------------------------------------------------------- bytes
@dataclass
class Row:
    strategy: str
    world: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    activations_ckpt: float
    workspace: float

    def total(self, checkpointing: bool) -> float:
        acts = self.activations_ckpt if checkpointing else self.activations
        return self.weights + self.grads + self.optimizer + acts + self.workspace


def state_bytes(counts: Counts, job: Job, strategy: str, world: int) -> tuple[float, float, float]:
    """(weights, gradients, optimiser states) in bytes per GPU; see the module docstring's table."""
    param_bytes = 2 if job.precision == "bf16-true" else 4
    frozen = counts.parameters - counts.trainable - counts.quantized
    unit = counts.largest_block * 2 * 2  # two bf16 units gathered at a time
    if strategy == "ddp":
        weights = (counts.trainable + frozen) * param_bytes + counts.quantized_bytes
        return weights, counts.trainable * param_bytes, counts.optimizer_bytes
    if job.quantize:
        raise ValueError(f"strategy '{strategy}' cannot shard 4-bit weights (see dvlx/strategies.py)")
    if strategy == "fsdp":
        weights = counts.parameters * param_bytes / world + unit
        return weights, counts.trainable * 4 / world, counts.optimizer_bytes / world
    low = 2 if job.precision != "32-true" else 4
    master = counts.trainable * 4 / world
    states = 2 * counts.trainable * 4 if job.optimizer == "adamw" else counts.optimizer_bytes
    if strategy == "zero2":
        return counts.parameters * low + master, counts.trainable * low / world, states / world
    if strategy == "zero3":
        weights = counts.parameters * low / world + master + unit
        return weights, counts.trainable * low / world, states / world
    raise ValueError(f"unknown strategy '{strategy}'; choose from {STRATEGY_CHOICES}")


def estimate(
    job: Job, strategies=("ddp",), worlds=(1,), device="meta"
) -> tuple[Counts, Activations, list[Row]]:
    """Counts, activations and one row per (strategy, world size)."""
    stage = build_stage(job, device)
    counts = count_parameters(stage, job)
    acts = measure_activations(stage, job, device)
    autocast = 0
    if job.precision == "bf16-mixed":
        autocast = 2 * counts.matmul_frozen
    rows = []
    for strategy in strategies:
        for world in worlds:
            if job.quantize and strategy != "ddp":
                continue
            weights, grads, optim = state_bytes(counts, job, strategy, world)
            copies = autocast if strategy in ("ddp",) else 0
            per_layer = copies / max(1, len(acts.per_block))
            rows.append(
                Row(
                    strategy,
                    world,
                    weights,
                    grads,
                    optim,
                    acts.saved(False) + copies,
                    acts.saved(True) + per_layer,
                    acts.workspace,
                )
            )
    return counts, acts, rows


# --------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dvlx.bench memory", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="7b", choices=("7b", "tiny"))
    parser.add_argument("--stage", default="vla", choices=("vla", "vl_pretrain", "vl_instruct"))
    parser.add_argument("--objective", default="flow_matching", help="VLA objective (continuous ones)")
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning of the stage)")
    parser.add_argument("--quantize", choices=("nf4",), default=None, help="QLoRA: NF4 base weights")
    parser.add_argument("--trainable", default=None, help="comma list of parts (projector,lm,vision,merger)")
    parser.add_argument("--vision-from-block", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8, help="per-device micro-batch")
    parser.add_argument("--images", type=int, default=2, help="images (cameras) per sample")
    parser.add_argument("--image-size", type=int, default=224, help="side of each square image in pixels")
    parser.add_argument("--text-tokens", type=int, default=100, help="non-visual tokens per sample")
    parser.add_argument("--loss-tokens", type=int, default=0, help="VL stages: supervised tokens per sample")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16-mixed")
    parser.add_argument("--optimizer", choices=("adamw", "adamw8bit"), default="adamw")
    parser.add_argument("--world-sizes", default="1,8", help="comma list of world sizes")
    parser.add_argument("--strategies", default="ddp,fsdp,zero2,zero3", help="comma list")
    parser.add_argument("--card-gib", type=float, default=24.0, help="card size for the fits column")
    return parser


def _gib(value: float) -> str:
    return f"{value / GIB:8.2f}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    job = Job(
        preset=args.preset,
        stage=args.stage,
        objective=args.objective,
        lora_rank=args.lora,
        quantize=args.quantize,
        trainable=args.trainable.split(",") if args.trainable else None,
        vision_from_block=args.vision_from_block,
        batch=args.batch,
        images=args.images,
        image_size=args.image_size,
        text_tokens=args.text_tokens,
        loss_tokens=args.loss_tokens,
        precision=args.precision,
        optimizer=args.optimizer,
    )
    strategies = [s for s in args.strategies.split(",") if s]
    bad = [s for s in strategies if s not in STRATEGY_CHOICES]
    if bad:
        print(f"error: --strategies: {bad} not in {list(STRATEGY_CHOICES)}", file=sys.stderr)
        return 2
    worlds = [int(w) for w in args.world_sizes.split(",") if w]
    if job.quantize and not job.lora_rank:
        print("error: --quantize needs LoRA adapters (--lora RANK)", file=sys.stderr)
        return 2
    if job.lora_rank and job.stage != "vla":
        print(f"error: --lora: LoRA adapters are built by stage vla only, not {job.stage}", file=sys.stderr)
        return 2
    try:
        counts, acts, rows = estimate(job, strategies, worlds)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    config = preset_config(job.preset, **_tokenizer_ids(job.preset), **job.preset_overrides)
    length, visual, _ = sequence_shape(config, job)
    print(f"command: python -m dvlx.bench memory {shlex.join(argv)}".rstrip())
    print(
        f"job: preset {job.preset}, stage {job.stage}, LoRA rank {job.lora_rank}, quantize {job.quantize}, "
        f"{job.precision}, {job.optimizer}, batch {job.batch} x L {length} ({visual} visual tokens)"
    )
    print(
        f"parameters {counts.parameters / 1e9:.3f} B, trainable {counts.trainable / 1e6:.1f} M "
        f"({100 * counts.trainable / counts.parameters:.2f} %), NF4 {counts.quantized / 1e9:.3f} B"
    )
    print(
        f"activations per sample: {acts.saved(False) / job.batch / GIB:.3f} GiB without checkpointing, "
        f"{acts.saved(True) / job.batch / GIB:.3f} GiB with; loss workspace {acts.workspace / GIB:.2f} GiB"
    )
    print()
    header = (
        f"{'strategy':8s} {'GPUs':>5s} {'weights':>8s} {'grads':>8s} {'optim':>8s} {'acts':>8s} "
        f"{'acts ckpt':>9s} {'total':>8s} {'tot ckpt':>8s}  fits {args.card_gib:g} GiB "
        f"(ckpt, +{CONTEXT_GIB:g})"
    )
    print(header + "   [GiB per GPU]")
    for row in rows:
        fits = row.total(True) / GIB + CONTEXT_GIB <= args.card_gib
        print(
            f"{row.strategy:8s} {row.world:5d} {_gib(row.weights)} {_gib(row.grads)} {_gib(row.optimizer)} "
            f"{_gib(row.activations)} {_gib(row.activations_ckpt):>9s} {_gib(row.total(False))} "
            f"{_gib(row.total(True))}  {'yes' if fits else 'no'}"
        )
    if acts.lm_residual:
        extra = acts.lm_residual * config.num_hidden_layers
        print(
            f"\nbf16-mixed keeps the residual stream in float32: add up to {extra / GIB:.2f} GiB to 'acts' "
            f"(about {acts.lm_residual / GIB:.3f} GiB per layer kept; checkpointing keeps only block inputs)."
        )
    if job.stage in PEERS:
        print(f"peer: {PEERS[job.stage]}")
    print("not included: CUDA context, allocator fragmentation, communication buckets (see --help)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
