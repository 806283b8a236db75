"""`python -m dvlx.bench NAME [options]`: run one benchmark (see `python -m dvlx.bench --help`)."""

from __future__ import annotations

import importlib
import sys

from dvlx.config import did_you_mean

BENCHMARKS = {
    "loss": "O(L) CART weights + masked-diffusion loss against the L x L table formulation",
    "data": "image-text samples/s per worker against a plain JPEG-decode loop",
    "generate": "generated tokens/s with and without the prefix KV cache against full recomputation",
    "decode": "action-chunk latency per objective and step count, with the issue 5 decoding ratios",
    "memory": "per-GPU training memory estimate (weights, grads, optimiser, activations) by strategy",
    "train": "training step time against plain transformers Qwen2; checkpointing and compile ratios",
    "rollout": "simulator steps/s with 1 and W worker processes, policy queries/s batched against one by one",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        for name, what in BENCHMARKS.items():
            print(f"  {name:8s} {what}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"error: unknown benchmark '{name}'{did_you_mean(name, list(BENCHMARKS))}", file=sys.stderr)
        return 2
    return importlib.import_module(f"dvlx.bench.{name}").main(rest)


if __name__ == "__main__":
    sys.exit(main())
