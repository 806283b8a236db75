"""Drive a running `python -m dvlx.serve` server: send observations, print the action chunks and latencies.

    python -m dvlx.serve --policy runs/tiny_vla_flow_matching/default/export --port 8000 &
    python examples/serve_client.py --port 8000                          # random observations from metadata
    python examples/serve_client.py --port 8000 --env robosuite-lift     # closed loop in the simulator

With `--env` the script runs one episode of a robosuite task from `data_modules.sim` (needs the `sim` extra),
executing the first `--open-loop-steps` actions of each chunk before asking again, and reports success.
Without it, the observations are random images and proprio shaped as the server's metadata says.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dvlx.client import PolicyClient


def random_observation(metadata: dict, rng: np.random.Generator, size: int) -> dict:
    return {
        "images": {
            c: rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for c in metadata["cameras"]
        },
        "proprio": rng.uniform(-1, 1, size=metadata["proprio_dim"]).astype(np.float32),
        "instruction": "lift the cube",
    }


def report(index: int, reply: dict, latency_ms: float) -> None:
    actions = reply["actions"]
    timing = reply["server_timing"]
    print(
        f"request {index}: actions {list(actions.shape)}, round trip {latency_ms:.1f} ms "
        f"(inference {timing['infer_ms']:.1f} ms, queued {timing['queue_ms']:.1f} ms, "
        f"batch {timing['batch_size']})"
    )
    print("  first action:", np.array2string(actions[0], precision=3, suppress_small=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--env", default=None, help="robosuite-lift(-color); default: random")
    parser.add_argument("--requests", type=int, default=5, help="chunks to ask for")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the server's)")
    parser.add_argument("--open-loop-steps", type=int, default=None, help="actions executed per chunk")
    parser.add_argument("--image-size", type=int, default=84, help="rendered or random image size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with PolicyClient(args.host, args.port) as client:
        meta = client.metadata
        print(
            f"server: {meta['policy']} ({meta['objective']}), "
            f"chunk {meta['horizon']} x {meta['action_dim']}, "
            f"cameras {meta['cameras']}, proprio {meta['proprio_dim']}, healthy: {client.health()}"
        )
        settings = {"steps": args.steps, "open_loop_steps": args.open_loop_steps}
        if args.env is None:
            rng = np.random.default_rng(args.seed)
            for i in range(args.requests):
                observation = random_observation(meta, rng, args.image_size)
                start = time.perf_counter()
                reply = client.infer(observation, **settings)
                report(i, reply, (time.perf_counter() - start) * 1000)
            return

        from data_modules import sim  # the simulator is optional; imported only when asked for

        env = sim.make_env(args.env, seed=args.seed, image_size=args.image_size, cameras=meta["cameras"])
        try:
            observation = sim.reset(env, seed=args.seed, index=0)
            print(f"instruction: {observation['instruction']!r}")
            for i in range(args.requests):
                start = time.perf_counter()
                reply = client.infer(observation, **settings)
                report(i, reply, (time.perf_counter() - start) * 1000)
                for action in reply["actions"]:
                    observation = sim.step(env, action)
            print(f"success after {args.requests} chunks: {sim.success(env)}")
        finally:
            env.close()


if __name__ == "__main__":
    main()
