"""Benchmark of the masked-diffusion loss: O(L) CART weights against the reference's L x L table.

Two parts, each at several lengths: (a) the CART weights alone, (b) the full loss (weights, cross-entropy at
the loss positions, backward) with either weights implementation. Every measurement runs in a fresh
subprocess so that peak memory is attributable to one variant.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from dvlx.diffusion import MaskedDiffusion, cart_weights, shifted_loss_positions

PARTS = ("weights", "loss")
VARIANTS = ("ours", "table")
SEED = 0
_WARM_LENGTH = 16
# Fast steps are repeated until this much time is measured: on a shared 2-core machine single calls are
# occasionally descheduled for a whole time slice, and a median of a handful of sub-millisecond calls is not
# robust to that.
_MIN_TIMED_S = 0.25
_MAX_REPEATS = 200
# Warm-up runs the step (at least once) for this long: freshly started CPU worker threads were seen to run
# 100x slower for up to a few seconds on a virtual machine.
_WARM_S = 1.0


def reference_table(length: int, p: float, device: torch.device) -> Tensor:
    """The reference formulation: W[l, r] = 0.5 p q^(|l - r| - 1) off the diagonal, 0 on it (float32)."""
    idx = torch.arange(length, device=device, dtype=torch.float32)
    dist = (idx[:, None] - idx[None, :]).abs()  # (L, L)
    table = 0.5 * p * (1.0 - p) ** (dist - 1.0)
    return table.fill_diagonal_(0.0)


@dataclass(frozen=True)
class TableDiffusion(MaskedDiffusion):
    """MaskedDiffusion whose CART weights come from the reference's L x L table (benchmark only)."""

    table: Tensor | None = field(default=None, repr=False, compare=False)

    def position_weights(self, loss_positions: Tensor, attention_mask: Tensor | None = None) -> Tensor | None:
        context = ~loss_positions
        if attention_mask is not None:
            context = context & (attention_mask == 1)
        return context.float() @ self.table


def _inputs(batch: int, length: int, vocab: int, device: torch.device) -> dict[str, Tensor]:
    """Token ids, a prompt-then-answer maskable pattern, right padding on the last row, and a corruption."""
    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, vocab - 1, (batch, length), generator=gen)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[-1, length - length // 8 :] = 0
    maskable = attention_mask.bool().clone()
    maskable[:, : length // 4] = False  # the prompt stays clean
    corruption = MaskedDiffusion(mask_token_id=vocab - 1).corrupt(ids, maskable, generator=gen)
    return {
        "ids": ids.to(device),
        "noisy_ids": corruption.noisy_ids.to(device),
        "masked": corruption.masked.to(device),
        "attention_mask": attention_mask.to(device),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_cpu_peak() -> bool:
    """Return freed heap pages to the OS and reset the peak RSS to the current RSS (Linux only).

    Without this, ru_maxrss remembers the transient peak of building the inputs and a variant whose memory
    fits under it would show no increase. Returns False where the reset is not available.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size
    except OSError:
        return False
    return True


def _build(
    part: str, variant: str, length: int, args: argparse.Namespace
) -> tuple[Callable[[], None], dict[str, float], int]:
    """Inputs, then the memory baseline, then the variant's own state; returns (step, results, baseline)."""
    device = torch.device(args.device)
    torch.manual_seed(SEED)
    data = _inputs(args.batch, length, args.vocab, device)
    if part == "weights":
        # Only what the step uses stays alive, so nothing is freed below the baseline later.
        context = ~shifted_loss_positions(data.pop("masked")) & (data.pop("attention_mask") == 1)
        data.clear()
    else:
        hidden = torch.randn(args.batch, length, args.hidden, device=device, requires_grad=True)
        head = nn.Linear(args.hidden, args.vocab, bias=False, device=device)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        _reset_cpu_peak()
        baseline = _peak_bytes(device)

    table = reference_table(length, args.cart_p, device) if variant == "table" else None
    result: dict[str, float] = {}
    if part == "weights":

        def step() -> None:
            if table is None:
                cart_weights(context, args.cart_p)
            else:
                context.float() @ table

        return step, result, baseline

    if table is None:
        diffusion = MaskedDiffusion(mask_token_id=args.vocab - 1, cart_p=args.cart_p)
    else:
        diffusion = TableDiffusion(mask_token_id=args.vocab - 1, cart_p=args.cart_p, table=table)

    def step() -> None:
        out = diffusion.loss(hidden, head, data["ids"], data["masked"], data["attention_mask"])
        out.loss.backward()
        hidden.grad = None
        head.weight.grad = None
        result["loss"] = out.loss.item()
        result["n_supervised"] = float(out.n_supervised.item())

    return step, result, baseline


def run_worker(part: str, variant: str, length: int, args: argparse.Namespace) -> dict[str, float]:
    """Time one (part, variant, length) and measure its peak memory above the post-input baseline."""
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    # A tiny run first loads the code paths (lazy libraries, autograd, allocator pools), so that the
    # measured increase belongs to the sizes under test rather than to first use.
    warm_step, _, _ = _build(part, variant, _WARM_LENGTH, args)
    warm_step()
    del warm_step
    step, result, baseline = _build(part, variant, length, args)
    times = _time(step, args.repeats, device)
    result["time_ms"] = 1e3 * statistics.median(times)
    result["peak_mib"] = max(0, _peak_bytes(device) - baseline) / 2**20
    return result


def _time(step: Callable[[], None], repeats: int, device: torch.device) -> list[float]:
    """Wall times of `step` after a warm-up: at least `repeats`, more while under `_MIN_TIMED_S`."""
    start = time.perf_counter()
    for _ in range(_MAX_REPEATS):
        step()
        _sync(device)
        if time.perf_counter() - start > _WARM_S:
            break
    times: list[float] = []
    while len(times) < repeats or (sum(times) < _MIN_TIMED_S and len(times) < _MAX_REPEATS):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _spawn(part: str, variant: str, length: int, argv: list[str]) -> dict[str, float]:
    repo_root = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo_root), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "dvlx.bench.loss", *argv, "--worker", f"{part}:{variant}:{length}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"dvlx/bench/loss.py: worker {part}:{variant}:{length} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dvlx.bench.loss", description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128, help="width D of the hidden states")
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary size V of the lm_head")
    parser.add_argument("--repeats", type=int, default=5, help="minimum timed repeats after the warm-up")
    parser.add_argument("--cart-p", type=float, default=0.1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per worker (0: torch's default)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def _header(argv: list[str], args: argparse.Namespace) -> list[str]:
    device = torch.device(args.device)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
    threads = args.threads if args.threads > 0 else torch.get_num_threads()
    machine += f"{threads} threads per worker, device {args.device}"
    if device.type == "cuda":
        machine += f" ({torch.cuda.get_device_name(device)})"
        memory = "torch.cuda.max_memory_allocated increase over the allocation after inputs are built"
    else:
        memory = "ru_maxrss increase over the process's ru_maxrss after inputs are built"
        if _reset_cpu_peak():
            memory += " (then malloc_trim(0) and the peak reset via /proc/self/clear_refs)"
        else:
            memory += " (peak could not be reset: small variants may show 0)"
    return [
        f"command: python -m dvlx.bench.loss {shlex.join(argv)}".rstrip(),
        f"machine: {machine}",
        f"sizes: batch {args.batch}, hidden D {args.hidden}, vocab V {args.vocab}, cart_p {args.cart_p}, "
        f"prompt = first L/4 (clean), last row right-padded by L/8, t ~ U(0,1) per row (seed {SEED})",
        f"time: median over >= {args.repeats} repeats (more, up to {_MAX_REPEATS}, until {_MIN_TIMED_S} s "
        f"are measured) after a {_WARM_S} s warm-up (at least one call); 'table' times exclude the one-off "
        "table build (the reference caches it), its memory includes the resident table",
        f"memory: each variant in a fresh subprocess; {memory}",
        "weights = CART weights only; loss = weights + float32 CE at loss positions + backward; "
        "x = table / ours ('-': ours below the memory resolution)",
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or one worker measurement) and print a table; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.worker is not None:
        part, variant, length = args.worker.split(":")
        print(json.dumps(run_worker(part, variant, int(length), args)))
        return 0

    lines = _header(argv, args)
    print("\n".join(lines), flush=True)
    cols = f"{'part':<8} {'L':>6} {'ours ms':>10} {'table ms':>10} {'time x':>8} "
    cols += f"{'ours MiB':>10} {'table MiB':>10} {'mem x':>8}  loss |ours - table|"
    print(cols)
    print("-" * len(cols))
    for length in args.lengths:
        for part in PARTS:
            ours, table = (_spawn(part, variant, length, argv) for variant in VARIANTS)
            time_ratio = table["time_ms"] / max(ours["time_ms"], 1e-9)
            # Below one page of resolution the ratio is meaningless; '-' marks it.
            mem_ratio = f"{table['peak_mib'] / ours['peak_mib']:.1f}" if ours["peak_mib"] >= 0.05 else "-"
            agree = f"{abs(ours['loss'] - table['loss']):.2e}" if part == "loss" else ""
            row = f"{part:<8} {length:>6} {ours['time_ms']:>10.2f} {table['time_ms']:>10.2f} "
            row += f"{time_ratio:>8.1f} {ours['peak_mib']:>10.1f} {table['peak_mib']:>10.1f} {mem_ratio:>8}"
            print(f"{row}  {agree}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
