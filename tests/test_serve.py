"""The policy server (`dvlx.serve`), its client and the msgpack-numpy codec, on a tiny exported VLA."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
from vla_batch import tiny_backbone, tiny_spec
from websockets.sync.client import connect

from dvlx.client import PolicyClient, PolicyServerError
from dvlx.config import ExperimentConfig, ObjectiveConfig, StageConfig
from dvlx.export import write_export
from dvlx.msgpack_numpy import DecodeError, packb, unpackb
from dvlx.policy import Policy
from dvlx.processing import ImageProcessor, build_tiny_tokenizer
from dvlx.processing.action_tokens import ActionTokenizer
from dvlx.serve import PolicyServer, ServerThread
from dvlx.stages import VLA

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def export(tmp_path_factory, one_thread) -> Path:
    """A tiny `l1` export: its sampler is deterministic, so served chunks can be compared exactly."""
    tokenizer = build_tiny_tokenizer()
    ActionTokenizer(tokenizer).ensure_tokens()
    spec = tiny_spec()
    cfg = ExperimentConfig(stage=StageConfig(name="vla"), objective=ObjectiveConfig(name="l1"))
    stage = VLA(cfg, tiny_backbone(tokenizer), tokenizer, spec)
    processor = ImageProcessor(min_pixels=spec.image_size**2, max_pixels=spec.image_size**2)
    return write_export(
        tmp_path_factory.mktemp("serve") / "export", stage.backbone, tokenizer, processor,
        stage="VLA", step=1, objective=stage.objective, spec=spec,
    )


@pytest.fixture(scope="module")
def policy(export) -> Policy:
    return Policy.from_pretrained(export)


@pytest.fixture(scope="module")
def port(policy):
    """A server that waits up to 1 s for a second request, so concurrent requests meet in one batch."""
    with ServerThread(PolicyServer(policy, port=0, max_batch=2, batch_timeout_ms=1000)) as port:
        yield port


def observation(spec, seed: int = 0, instruction: str = "pick up the block") -> dict:
    rng = np.random.default_rng(seed)
    return {
        "images": {c: rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8) for c in spec.cameras},
        "proprio": rng.uniform(-1, 1, size=spec.proprio_dim).astype(np.float32),
        "instruction": instruction,
    }


def test_codec_matches_openpi_wire_format() -> None:
    value = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.int16(7), "s": "text", "l": [1, 2.5]}
    packed = packb(value)
    # openpi's layout, written out: bin marker keys, str dtype, the shape as a list, raw C-order bytes.
    raw = msgpack.unpackb(packed, raw=False)
    data = value["a"].tobytes()
    assert raw["a"] == {b"__ndarray__": True, b"data": data, b"dtype": "<f4", b"shape": [2, 3]}
    assert raw["n"] == {b"__npgeneric__": True, b"data": 7, b"dtype": "<i2"}
    decoded = unpackb(packed)
    np.testing.assert_array_equal(decoded["a"], value["a"])
    assert decoded["a"].dtype == np.float32 and decoded["a"].flags.writeable
    assert decoded["n"] == 7 and decoded["n"].dtype == np.int16 and decoded["l"] == [1, 2.5]
    truncated = msgpack.packb({b"__ndarray__": True, b"data": b"abc", b"dtype": "<f4", b"shape": [1]})
    with pytest.raises(DecodeError, match="needs 4 bytes"):
        unpackb(truncated)
    with pytest.raises(DecodeError, match="not allowed"):
        unpackb(msgpack.packb({b"__ndarray__": True, b"data": b"12345678", b"dtype": "|O", b"shape": [1]}))
    with pytest.raises(DecodeError, match="msgpack"):
        unpackb(b"\xc1")
    with pytest.raises(TypeError):
        packb({"x": np.zeros(2, dtype=np.complex64)})


def test_round_trip_matches_policy_predict(port, policy) -> None:
    spec = policy.spec
    obs = observation(spec)
    with PolicyClient("127.0.0.1", port) as client:
        meta = client.metadata
        assert (meta["horizon"], meta["action_dim"], meta["proprio_dim"]) == (
            spec.horizon, spec.action_dim, spec.proprio_dim
        )
        assert meta["cameras"] == spec.cameras and meta["instruction_required"] is True
        assert meta["action_spec_fingerprint"] == spec.fingerprint()
        reply = client.infer(obs)
        actions = reply["actions"]
        assert actions.shape == (spec.horizon, spec.action_dim) and actions.dtype == np.float32
        assert np.all(np.isfinite(actions))
        np.testing.assert_allclose(actions, policy.predict(obs), atol=1e-5)
        assert reply["server_timing"]["batch_size"] == 1 and reply["server_timing"]["infer_ms"] > 0
        # Settings: a shorter open-loop part, and a step count (ignored by l1, honoured by the protocol).
        short = client.infer(obs, steps=3, open_loop_steps=2)
        np.testing.assert_allclose(short["actions"], actions[:2], atol=1e-5)
        assert "prev_total_ms" in short["server_timing"]
        assert client.health()


def test_malformed_requests_get_errors_and_the_server_keeps_serving(port, policy) -> None:
    spec = policy.spec
    obs = observation(spec)
    front, wrist = spec.cameras
    cases = {
        "lacks cameras \\['wrist'\\]": {**obs, "images": {front: obs["images"][front]}},
        "unknown cameras \\['side'\\]": {**obs, "images": {**obs["images"], "side": obs["images"][front]}},
        f"'{wrist}'\\]: expected dtype uint8": {
            **obs, "images": {**obs["images"], wrist: obs["images"][wrist].astype(np.float32)}
        },
        f"'{front}'\\]: expected shape \\[height, width, 3\\].*\\[3, 48, 64\\]": {
            **obs, "images": {**obs["images"], front: obs["images"][front].transpose(2, 0, 1).copy()}
        },
        "request\\['proprio'\\]: expected a float array of shape \\[2\\].*got shape \\[3\\]": {
            **obs, "proprio": np.zeros(3, np.float32)
        },
        "request\\['proprio'\\]: .*got dtype <U1": {**obs, "proprio": np.array(["a", "b"])},
        "lacks 'proprio'": {k: v for k, v in obs.items() if k != "proprio"},
        "request\\['instruction'\\]: expected a string": {**obs, "instruction": 3},
        "unknown keys \\['temperature'\\]": {**obs, "temperature": 0.5},
        "request\\['steps'\\]: expected an int": {**obs, "steps": 0},
        "request\\['open_loop_steps'\\]: expected an int in \\[1, 4\\]": {**obs, "open_loop_steps": 5},
    }
    with PolicyClient("127.0.0.1", port) as client:
        for pattern, request in cases.items():
            with pytest.raises(PolicyServerError, match=pattern):
                client.infer(request)
        assert client.predict(obs).shape == (spec.horizon, spec.action_dim)
    # Frames that are not msgpack observation maps, sent without the client's packing.
    with connect(f"ws://127.0.0.1:{port}", max_size=None) as raw:
        unpackb(raw.recv())
        for frame, pattern in [
            (b"\xc1\x00", "not a valid msgpack message"),
            ("hello", "text frame"),
            (packb([1, 2]), "expected a msgpack map"),
        ]:
            raw.send(frame)
            assert re.search(pattern, unpackb(raw.recv())["error"])
        raw.send(packb(obs))
        assert unpackb(raw.recv())["actions"].shape == (spec.horizon, spec.action_dim)


def test_concurrent_clients_are_batched_by_settings(port, policy) -> None:
    spec = policy.spec
    observations = [observation(spec, seed) for seed in (1, 2)]
    expected = policy.predict_batch(observations)

    def run(settings: list[dict]) -> list[dict]:
        clients = [PolicyClient("127.0.0.1", port) for _ in settings]
        barrier = threading.Barrier(len(clients))
        replies: list[dict | None] = [None] * len(clients)

        def ask(i: int) -> None:
            barrier.wait()
            replies[i] = clients[i].infer(observations[i], **settings[i])

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(clients))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        for client in clients:
            client.close()
        return replies

    merged = run([{}, {}])
    assert [r["server_timing"]["batch_size"] for r in merged] == [2, 2]
    for reply, chunk in zip(merged, expected, strict=True):
        np.testing.assert_allclose(reply["actions"], chunk, atol=1e-4)
    split = run([{"steps": 1}, {"steps": 2}])
    assert [r["server_timing"]["batch_size"] for r in split] == [1, 1]


def test_cli_and_example_client_and_sigterm(export, policy) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "dvlx.serve", "--policy", str(export), "--port", "0", "--max-batch", "1"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
    )
    try:
        port = None
        deadline = time.monotonic() + 45
        while port is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            found = re.search(r"serving .* on ws://[\d.]+:(\d+)", line)
            port = int(found.group(1)) if found else None
        assert port, "the server did not log its port"
        with PolicyClient("127.0.0.1", port) as client:
            assert client.health()
            chunk = client.predict(observation(policy.spec))
        assert chunk.shape == (policy.spec.horizon, policy.spec.action_dim)
        example = subprocess.run(
            [sys.executable, "examples/serve_client.py", "--port", str(port), "--requests", "2"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )
        assert example.returncode == 0, example.stderr
        assert example.stdout.count(f"actions [{policy.spec.horizon}, {policy.spec.action_dim}]") == 2
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert "server stopped" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
