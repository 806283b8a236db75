"""`python -m dvlx.fit EXPERIMENT.yaml [key=value ...] [--resume] [--sweep key=a,b,c] [--print-config]`.

Loads the experiment, builds tokenizer, image processor, backbone, stage, data and callbacks, then runs
Lightning's Trainer. Each run writes `runs/<experiment>/<variant>/`: `config.yaml` (resolved), `checkpoints/`,
`tb/` (TensorBoard), `csv/version_<n>/metrics.csv` (one per start) and, when training ends, `export/`.
Errors in the experiment are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path

from dvlx.config import ConfigError, ExperimentConfig, load_config, parse_override, to_yaml
from dvlx.export import EXPORT_MARKER

log = logging.getLogger("dvlx.fit")

FINAL_METRICS = "final_metrics.json"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dvlx.fit", description=__doc__.split("\n\n")[1])
    parser.add_argument("experiment", help="experiment YAML file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the latest checkpoint of this run (sweeps: skip finished variants)",
    )
    parser.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=A,B,C",
        help="one run per value, each in its own variant folder (repeat for a grid)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def sweep_variants(sweeps: list[str]) -> list[tuple[str, list[str]]]:
    """(variant name, overrides) for the grid of `--sweep key=a,b,c` arguments; one default without sweeps."""
    if not sweeps:
        return [("", [])]
    axes = []
    for item in sweeps:
        key, _ = parse_override(item)
        values = item.split("=", 1)[1].split(",")
        if not all(values):
            raise ConfigError(f"command line: --sweep '{item}' has an empty value")
        axes.append([(key, v) for v in values])
    variants = []
    for combo in itertools.product(*axes):
        name = "_".join(f"{k}-{v}" for k, v in combo).replace("/", "-")
        variants.append((name, [f"{k}={v}" for k, v in combo]))
    return variants


def _registries() -> dict[str, tuple[str, ...]]:
    from dvlx.objectives import OBJECTIVES
    from dvlx.stages import STAGES

    return {"stage_names": tuple(STAGES), "objective_names": tuple(OBJECTIVES)}


class _CurrentStderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever `sys.stderr` is when a record is written: test runners and notebooks
    replace (and close) stderr between calls of `main`, and a handler holding the old one fails on it."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging() -> None:
    """INFO lines from dvlx's own packages on stderr (Lightning configures its own logger)."""
    handler = _CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("dvlx", "data_modules", "callbacks"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not any(getattr(h, "_dvlx", False) for h in logger.handlers):
            handler._dvlx = True
            logger.addHandler(handler)


# Warnings that describe what dvlx does on purpose: frozen modules stay in eval mode, and the streaming
# datasets report a per-rank length that already accounts for their workers.
_EXPECTED_WARNINGS = (
    r".*module\(s\) in eval mode at the start of training.*",
    r".*`IterableDataset` has `__len__` defined.*",
    r".*you need to define a `flops_per_batch` attribute.*",
    # On --resume the checkpoint folder holds the run's checkpoints by design.
    r".*Checkpoint directory .* exists and is not empty.*",
)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _configure_logging()
    try:
        variants = sweep_variants(args.sweep)
        configs = []
        for variant, extra in variants:
            cfg = load_config(args.experiment, [*args.overrides, *extra], **_registries())
            if variant:
                cfg = replace(cfg, variant=variant)
            configs.append(cfg)
    except ConfigError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    if args.print_config:
        for cfg in configs:
            print(to_yaml(cfg))
        return 0
    from callbacks.numerics import NonFiniteTrainingError
    from data_modules.faults import TooManyFaultsError

    results = []
    for cfg in configs:
        try:
            results.append(run(cfg, resume=args.resume))
        except ConfigError as err:
            print(f"error: {_one_line(err)}", file=sys.stderr)
            return 2
        except (NonFiniteTrainingError, TooManyFaultsError) as err:
            # A data worker's error arrives with its traceback in the message; its last line is the reason.
            reason = str(err).strip().splitlines()[-1].split(f"{type(err).__name__}: ", 1)[-1]
            print(f"error: {cfg.run_dir}: {reason}", file=sys.stderr)
            return 1
    if args.sweep:
        table = write_sweep_table(configs, args.sweep)
        print(table.read_text())
    return 0 if all(r == 0 for r in results) else 1


def _one_line(err: Exception) -> str:
    """An error message on one line (reports such as a checkpoint's missing keys span several)."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def _check_run_dir(cfg: ExperimentConfig, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None for a fresh start; refuses to overwrite an existing run."""
    run_dir = cfg.run_dir
    has_checkpoints = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    if resume:
        # last.ckpt is a file, or a folder for sharded (FSDP, DeepSpeed) checkpoints; a cut one is skipped.
        from callbacks.checkpoint_io import find_resume_checkpoint

        found, rejected = find_resume_checkpoint(run_dir / "checkpoints")
        for path, problem in rejected:
            log.warning("%s is not a complete checkpoint (%s); resuming from an earlier one", path, problem)
        if found is None and rejected:
            path, problem = rejected[0]
            raise ConfigError(f"{path}: --resume found no complete checkpoint ({problem})")
        return found
    if has_checkpoints or (run_dir / "export" / EXPORT_MARKER).exists():
        raise ConfigError(
            f"{run_dir}: run folder already holds a run; pass --resume to continue it, or choose another "
            f"variant (variant=NAME) or output_dir"
        )
    return None


def exported_step(run_dir: Path) -> int:
    """The step of the run's completed export, or -1 when it has none."""
    marker = run_dir / "export" / EXPORT_MARKER
    if not marker.is_file():
        return -1
    return int(json.loads(marker.read_text()).get("step", -1))


def _check_writable(path: Path) -> None:
    probe = path / ".write_test"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{path}: output folder is not writable ({err.strerror or err})") from None


def run(cfg: ExperimentConfig, resume: bool = False) -> int:
    """Trains one variant. Returns 0 on success."""
    import lightning as L

    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    run_dir = cfg.run_dir
    if resume and exported_step(run_dir) >= cfg.trainer.max_steps:
        log.info("%s: finished earlier (export at step >= %d), skipping", run_dir, cfg.trainer.max_steps)
        return 0
    ckpt_path = _check_run_dir(cfg, resume)
    _check_writable(run_dir)
    write_atomic(run_dir / "config.yaml", to_yaml(cfg))

    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    tokenizer = build_tokenizer(cfg)
    add_action_tokens(cfg, tokenizer)
    image_processor = build_image_processor(cfg)
    backbone = build_backbone(cfg, tokenizer)
    datamodule = build_datamodule(cfg, tokenizer, image_processor)
    spec = action_spec(cfg, datamodule)
    stage = build_stage(cfg, backbone, tokenizer, spec)
    from callbacks.checkpoint_io import estimate_checkpoint_bytes, free_space_problem

    # Room for the next checkpoint while the previous one still exists.
    full = free_space_problem(run_dir, 2 * estimate_checkpoint_bytes(stage))
    if full is not None:
        raise ConfigError(f"{run_dir}: output location is too full for checkpoints ({full})")
    trainer = build_trainer(cfg, tokenizer, image_processor)
    log.info(
        "run %s: %s, %d trainable of %d parameters, global batch %d (%d per device x %d devices x %d "
        "accumulation)",
        run_dir,
        type(stage).__name__,
        sum(p.numel() for p in stage.parameters() if p.requires_grad),
        sum(p.numel() for p in stage.parameters()),
        trainer.world_size * trainer.accumulate_grad_batches * cfg.data.batch_size,
        cfg.data.batch_size,
        trainer.world_size,
        trainer.accumulate_grad_batches,
    )
    from dvlx.strategies import batch_layout

    for logger in trainer.loggers:
        logger.log_hyperparams(batch_layout(cfg, trainer.world_size).as_hparams())
    trainer.fit(stage, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    final = {
        k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith(("val/", "rollout/"))
    }
    if trainer.is_global_zero:
        write_atomic(run_dir / FINAL_METRICS, json.dumps({"step": trainer.global_step, **final}, indent=2))
        if final:
            print(
                f"{run_dir} step {trainer.global_step}: "
                + ", ".join(f"{k} {v:.4f}" for k, v in final.items())
            )
    return 0


def write_sweep_table(configs: list[ExperimentConfig], sweeps: list[str]) -> Path:
    """`runs/<experiment>/sweep.md`: the final validation metrics of every variant, one row each."""
    rows = []
    for cfg in configs:
        path = cfg.run_dir / FINAL_METRICS
        rows.append((cfg.variant, json.loads(path.read_text()) if path.is_file() else {}))
    keys = sorted({k for _, metrics in rows for k in metrics if k != "step"})
    lines = [
        f"# Sweep of {configs[0].name}: {' '.join('--sweep ' + s for s in sweeps)}",
        "",
        "| variant | step | " + " | ".join(keys) + " |",
        "|---" * (len(keys) + 2) + "|",
    ]
    for variant, metrics in rows:
        cells = [f"{metrics[k]:.4f}" if k in metrics else "-" for k in keys]
        lines.append(f"| {variant} | {metrics.get('step', '-')} | " + " | ".join(cells) + " |")
    out = Path(configs[0].output_dir) / configs[0].name / "sweep.md"
    write_atomic(out, "\n".join(lines) + "\n")
    return out


# ---------------------------------------------------------------------------------------------- builders
def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_tokenizer(cfg: ExperimentConfig):
    from dvlx.processing import Tokenizer, build_tiny_tokenizer

    folder = cfg.backbone.tokenizer or cfg.backbone.pretrained
    if folder is not None:
        try:
            return Tokenizer.from_pretrained(folder)
        except (OSError, ValueError) as err:
            raise ConfigError(f"key 'backbone.tokenizer': {err}") from None
    if cfg.backbone.preset not in ("tiny", "small"):
        raise ConfigError(
            f"key 'backbone.tokenizer': the '{cfg.backbone.preset}' preset needs a tokenizer folder "
            "(backbone.tokenizer or backbone.pretrained)"
        )
    return build_tiny_tokenizer()


def add_action_tokens(cfg: ExperimentConfig, tokenizer) -> None:
    """Token objectives need `<|action_k|>` in the vocabulary; added here, before the backbone is built."""
    if cfg.stage.name != "vla":
        return
    from dvlx.objectives import objective_class

    if getattr(objective_class(cfg.objective.name), "uses_action_tokens", False):
        from dvlx.processing.action_tokens import ActionTokenizer

        added = ActionTokenizer(tokenizer, num_bins=cfg.objective.num_bins).ensure_tokens()
        if added:
            log.info("added %d action tokens to the tokenizer", added)


def action_spec(cfg: ExperimentConfig, datamodule):
    """The VLA stage's action spec from the data (H from config; A, S, cameras, statistics from meta.json)."""
    if cfg.stage.name != "vla":
        return None
    datamodule.prepare_data()
    try:
        datamodule.setup("fit")
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    return datamodule.action_spec


def build_image_processor(cfg: ExperimentConfig):
    from dvlx.processing import ImageProcessor

    return ImageProcessor(min_pixels=cfg.processor.min_pixels, max_pixels=cfg.processor.max_pixels)


def build_backbone(cfg: ExperimentConfig, tokenizer):
    from dvlx.backbone import CheckpointError, DreamVL, preset_config

    if cfg.backbone.pretrained is not None:
        try:
            backbone = DreamVL.from_pretrained(
                cfg.backbone.pretrained, dtype="float32", attn_implementation=cfg.backbone.attn_implementation
            )
        except CheckpointError as err:
            raise ConfigError(f"key 'backbone.pretrained': {err}") from None
        ids = tokenizer.special_ids()
        wrong = {
            k: (v, getattr(backbone.config, k)) for k, v in ids.items() if getattr(backbone.config, k) != v
        }
        if wrong:
            raise ConfigError(
                "key 'backbone.tokenizer': tokenizer and checkpoint disagree on special ids "
                + ", ".join(f"{k} (tokenizer {a}, checkpoint {b})" for k, (a, b) in wrong.items())
            )
    else:
        config = preset_config(cfg.backbone.preset, vocab_size=len(tokenizer), **tokenizer.special_ids())
        backbone = DreamVL(config, attn_implementation=cfg.backbone.attn_implementation)
    if len(tokenizer) > backbone.config.vocab_size:
        # Tokens added for this stage (action tokens) beyond the checkpoint's embedding rows.
        backbone.resize_token_embeddings(len(tokenizer))
    if cfg.backbone.init_checkpoint is not None:
        load_backbone_checkpoint(backbone, cfg.backbone.init_checkpoint)
    from dvlx.strategies import prepare_backbone

    prepare_backbone(cfg, backbone)
    return backbone


def load_backbone_checkpoint(backbone, path: str) -> None:
    """Loads the `backbone.*` tensors of a dvlx Lightning checkpoint over `backbone` (shapes must match)."""
    import torch

    if not Path(path).is_file():
        raise ConfigError(f"key 'backbone.init_checkpoint': {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign files raise many types
        raise ConfigError(
            f"key 'backbone.init_checkpoint': {path} is not a readable checkpoint ({err})"
        ) from None
    prefix = "backbone."
    tensors = {
        k[len(prefix) :]: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith(prefix)
    }
    if not tensors:
        raise ConfigError(f"key 'backbone.init_checkpoint': {path} holds no backbone.* weights")
    own = backbone.state_dict()
    unknown = sorted(k for k in tensors if k not in own)
    bad_shape = sorted(k for k in tensors if k in own and tuple(own[k].shape) != tuple(tensors[k].shape))
    if unknown or bad_shape:
        raise ConfigError(
            f"key 'backbone.init_checkpoint': {path} does not fit the model: unknown {unknown[:5]}, "
            f"mis-shaped {bad_shape[:5]}"
        )
    backbone.load_state_dict(tensors, strict=False)
    log.info("loaded %d backbone tensors from %s", len(tensors), path)


def build_stage(cfg: ExperimentConfig, backbone, tokenizer=None, spec=None):
    from dvlx.stages import STAGES

    if cfg.stage.name == "vla":
        return STAGES["vla"](cfg, backbone, tokenizer, spec)
    return STAGES[cfg.stage.name](cfg, backbone)


def build_datamodule(cfg: ExperimentConfig, tokenizer, image_processor):
    if cfg.data.kind == "trajectory":
        return build_trajectory_datamodule(cfg, tokenizer, image_processor)
    from data_modules.image_text import ImageTextDataModule

    data = cfg.data
    train, val, generate = data.train, data.val, None
    if data.synthetic is not None:
        from data_modules.synthetic import generate_captions, generate_vqa, generate_vqa_blank

        syn = data.synthetic
        writers = {"captions": generate_captions, "vqa": generate_vqa, "vqa-blank": generate_vqa_blank}
        writer = writers[syn.kind]
        root = Path(data.synthetic_dir)
        train = train or str(root / "train")
        val = val or str(root / "val")

        def generate() -> None:
            writer(
                root, num_train=syn.num_train, num_val=syn.num_val, image_size=syn.image_size, seed=syn.seed
            )

    elif not Path(train).exists() and not any(ch in train for ch in "*{,"):
        raise ConfigError(f"key 'data.train': {train} does not exist")
    return ImageTextDataModule(
        train=train,
        val=val,
        tokenizer=tokenizer,
        image_processor=image_processor,
        template=data.template,
        batch_size=data.batch_size,
        val_batch_size=data.val_batch_size,
        num_workers=data.num_workers,
        shuffle_buffer=data.shuffle_buffer,
        max_length=data.max_length,
        num_eos=data.num_eos,
        seed=cfg.trainer.seed,
        max_fault_fraction=data.max_fault_fraction,
        generate=generate,
        length_grouping=data.length_grouping,
    )


def build_trajectory_datamodule(cfg: ExperimentConfig, tokenizer, image_processor):
    from data_modules.trajectory import TrajectoryDataModule

    data = cfg.data
    datasets = [{"path": d.path, "weight": d.weight} for d in data.datasets]
    generate = None
    if data.synthetic is not None:
        from data_modules.demos import DemoConfig, generate_demos

        syn = data.synthetic
        root = Path(data.synthetic_dir)
        datasets = datasets or [{"path": str(root), "weight": 1.0}]
        demo = DemoConfig(
            task=syn.kind,
            episodes=syn.num_train,
            out=str(root),
            seed=syn.seed,
            image_size=syn.image_size,
            workers=max(1, data.num_workers),
            action_noise=syn.action_noise,
        )

        def generate() -> None:
            generate_demos(demo)

    elif data.train is not None:
        datasets = datasets or [{"path": data.train, "weight": 1.0}]
    for entry in datasets:
        if data.synthetic is None and not Path(entry["path"]).exists():
            raise ConfigError(f"key 'data.datasets': {entry['path']} does not exist")
    return TrajectoryDataModule(
        datasets=datasets,
        tokenizer=tokenizer,
        image_processor=image_processor,
        horizon=data.horizon,
        batch_size=data.batch_size,
        val_batch_size=data.val_batch_size,
        cameras=data.cameras,
        use_proprio=data.use_proprio,
        normalization=data.normalization,
        image_size=data.image_size,
        augment=data.augment,
        num_workers=data.num_workers,
        shuffle_buffer=data.shuffle_buffer,
        seed=cfg.trainer.seed,
        balance=data.balance,
        val_episodes=int(data.val_episodes) if data.val_episodes >= 1 else data.val_episodes,
        max_fault_fraction=data.max_fault_fraction,
        generate=generate,
    )


def build_trainer(cfg: ExperimentConfig, tokenizer, image_processor):
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from callbacks import AtomicCheckpointIO, DataFaultMonitor, ExportOnTrainEnd, throughput_monitor
    from callbacks.checkpoint_io import StepCheckpoint
    from callbacks.numerics import NonFiniteGuard
    from callbacks.resume import StepSeed
    from dvlx.strategies import batch_layout, build_strategy

    t, run_dir = cfg.trainer, cfg.run_dir
    checkpoint = StepCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="step-{step:07d}",
        every_n_train_steps=t.checkpoint_every_n_steps,
        save_last=True,
        save_top_k=2,
        monitor="step",
        mode="max",
        auto_insert_metric_name=False,
    )
    callbacks = [
        checkpoint,
        LearningRateMonitor(logging_interval="step"),
        DataFaultMonitor(),
        throughput_monitor(),
        StepSeed(t.seed),
        NonFiniteGuard(t.max_consecutive_nonfinite),
        ExportOnTrainEnd(run_dir / "export", tokenizer, image_processor, to_yaml(cfg)),
    ]
    if cfg.stage.name == "vla":
        from callbacks.action_plots import ActionChunkPlot
        from callbacks.resume import SpecOnResume

        callbacks.append(ActionChunkPlot())
        callbacks.append(SpecOnResume())
        if cfg.rollout.enabled:
            from callbacks.rollouts import RolloutMonitor, best_rollout_checkpoint

            monitor = RolloutMonitor(cfg.rollout, tokenizer, image_processor, run_dir, cfg.objective.steps)
            callbacks.append(monitor)
            if cfg.rollout.monitor:
                callbacks.append(best_rollout_checkpoint(run_dir, cfg.rollout))
    gen = cfg.stage.generation
    if gen.enabled and cfg.data.kind == "image_text":
        from callbacks.generation_samples import GenerationMonitor
        from dvlx.eval.vl import GenerationSettings

        val = cfg.data.val or str(Path(cfg.data.synthetic_dir) / "val")
        settings = GenerationSettings(
            steps=gen.steps,
            max_new_tokens=gen.max_new_tokens,
            alg=gen.alg,
            template=cfg.data.template,
            batch_size=cfg.data.batch_size,
        )
        callbacks.append(
            GenerationMonitor(val, tokenizer, image_processor, settings, gen.num_samples, gen.num_logged)
        )
    trainer = L.Trainer(
        default_root_dir=run_dir,
        max_steps=t.max_steps,
        max_epochs=-1,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(cfg),
        precision=t.precision,
        gradient_clip_val=cfg.optim.grad_clip or None,
        log_every_n_steps=t.log_every_n_steps,
        limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=None,
        logger=[
            TensorBoardLogger(save_dir=run_dir, name="tb", version="", default_hp_metric=False),
            # A resumed run gets csv/version_<n+1>: Lightning's CSV writer empties an existing metrics file.
            CSVLogger(save_dir=run_dir, name="csv"),
        ],
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
    )
    accumulate = batch_layout(cfg, trainer.world_size).accumulate
    trainer.accumulate_grad_batches = accumulate
    # Validation cadence counts training batches; the config counts optimiser steps.
    trainer.val_check_interval = t.val_every_n_steps * accumulate
    return trainer


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
