"""dvlx.processing.robot: statistics, normalisation, action spec, instructions, augmentation, VLA prompt."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from dvlx.processing import (
    IGNORE_INDEX,
    NORMALIZATION_MODES,
    ActionSpec,
    ArrayStats,
    Normalizer,
    augment_image,
    build_tiny_tokenizer,
    center_crop,
    encode_action_prompt,
    normalize_instruction,
    resize_image,
)
from dvlx.processing.tokenizer import IM_START


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _data(n: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)) * [1.0, 3.0, 0.5, 1.0] + [0.0, 2.0, -1.0, 0.0]
    x[:, 3] = 0.25  # a constant dimension
    return x.astype(np.float32)


def _spec(stats: ArrayStats | None = None, **overrides) -> ActionSpec:
    stats = stats or ArrayStats.from_array(_data())
    proprio = ArrayStats.from_array(_data(50, seed=1)[:, :2])
    kwargs = dict(
        horizon=2,
        max_horizon=4,
        action_dim=4,
        proprio_dim=2,
        cameras=["agent", "wrist"],
        action_names=["x", "y", "z", "grip"],
        proprio_names=["p0", "p1"],
        control_hz=20.0,
        action_normalizer=Normalizer("bounds_q99", stats, [True, True, True, False]),
        proprio_normalizer=Normalizer("bounds_q99", proprio),
        image_size=224,
        center_crop=0.9,
    )
    return ActionSpec(**{**kwargs, **overrides})


# ---- statistics and normalisation ------------------------------------------------------------------


def test_array_stats_match_numpy_and_round_trip():
    x = _data()
    stats = ArrayStats.from_array(x)
    wide = x.astype(np.float64)
    np.testing.assert_allclose(stats.q01, np.quantile(wide, 0.01, axis=0), rtol=0, atol=0)
    np.testing.assert_allclose(stats.q99, np.quantile(wide, 0.99, axis=0), rtol=0, atol=0)
    np.testing.assert_allclose(stats.std, wide.std(0))
    assert stats.count == 200 and stats.dim == 4
    assert ArrayStats.from_dict(stats.to_dict()) == stats
    with pytest.raises(ValueError, match="count"):
        ArrayStats.from_dict({k: v for k, v in stats.to_dict().items() if k != "count"})
    with pytest.raises(ValueError, match="one length"):
        ArrayStats(mean=[0.0], std=[1.0, 1.0], min=[0.0], max=[0.0], q01=[0.0], q99=[0.0], count=1)


@pytest.mark.parametrize("mode", NORMALIZATION_MODES)
def test_normalizer_round_trip_and_masked_dims(mode):
    x = _data()
    stats = ArrayStats.from_array(x)
    mask = [True, True, False, True]
    norm = Normalizer(mode, stats, mask)
    y = norm.normalize(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_array_equal(y[:, 2], x[:, 2])  # unmasked: untouched
    np.testing.assert_array_equal(y[:, 3], 0.0)  # zero range / zero std: maps to 0
    back = norm.unnormalize(y)
    np.testing.assert_array_equal(back[:, 2], x[:, 2])
    np.testing.assert_allclose(back[:, 3], 0.25, rtol=1e-6)
    if mode == "bounds_q99":
        # Values outside [q01, q99] are clipped; the round trip gives the clipped value back.
        lo, hi = np.asarray(stats.q01), np.asarray(stats.q99)
        expected = np.clip(x[:, :2], lo[:2], hi[:2])
        assert (np.abs(y[:, :2]) <= 1).all() and (np.abs(y[:, :2]) == 1).any()
        np.testing.assert_allclose(back[:, :2], expected, atol=1e-5)
        # The reference formula, written out once here for one value.
        v = float(x[5, 1])
        want = max(-1.0, min(1.0, 2 * (v - lo[1]) / (hi[1] - lo[1] + 1e-8) - 1))
        assert math.isclose(float(y[5, 1]), want, rel_tol=1e-6, abs_tol=1e-6)
    elif mode == "bounds":
        np.testing.assert_allclose(y[:, :2].min(0), -1, atol=1e-6)
        np.testing.assert_allclose(y[:, :2].max(0), 1, atol=1e-6)
        np.testing.assert_allclose(back[:, :2], x[:, :2], atol=1e-5)
    else:
        np.testing.assert_allclose(y[:, :2].mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(y[:, :2].std(0), 1, atol=1e-5)
        np.testing.assert_allclose(back[:, :2], x[:, :2], atol=1e-5)
        assert np.abs(norm.normalize(x * 100)).max() > 1  # not clipped
    # Torch tensors (any leading shape, float32 and bfloat16) give the numpy result.
    t = torch.from_numpy(x).reshape(10, 20, 4)  # (B, H, A)
    out = norm.normalize(t)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    flat = out.reshape(200, 4)  # (B * H, A)
    np.testing.assert_allclose(flat.numpy(), y, atol=1e-6)
    np.testing.assert_allclose(norm.unnormalize(flat).numpy(), back, atol=1e-5)
    assert norm.normalize(t.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="4 dims"):
        norm.normalize(x[:, :3])


def test_normalizer_dict_round_trip_and_fingerprint():
    stats = ArrayStats.from_array(_data())
    norm = Normalizer("bounds_q99", stats, [True, True, True, False])
    again = Normalizer.from_dict(norm.to_dict())
    assert again == norm and again.fingerprint() == norm.fingerprint()
    assert len(norm.fingerprint()) == 16 and int(norm.fingerprint(), 16) >= 0
    changed = ArrayStats.from_dict({**stats.to_dict(), "q99": [v + 1e-6 for v in stats.q99]})
    assert Normalizer("bounds_q99", changed, norm.mask).fingerprint() != norm.fingerprint()
    assert Normalizer("bounds_q99", stats, [True] * 4).fingerprint() != norm.fingerprint()
    assert Normalizer("bounds", stats, norm.mask).fingerprint() != norm.fingerprint()
    with pytest.raises(ValueError, match="did you mean 'bounds_q99'"):
        Normalizer("bound_q99", stats)
    with pytest.raises(ValueError, match="mask"):
        Normalizer("bounds", stats, [True])


def test_action_spec_round_trip_save_load_and_checks(tmp_path):
    spec = _spec()
    assert ActionSpec.from_dict(spec.to_dict()) == spec
    spec.save(tmp_path / "spec.json")
    loaded = ActionSpec.load(tmp_path / "spec.json")
    assert loaded == spec and loaded.fingerprint() == spec.fingerprint()
    assert spec.num_action_slots == 8 and spec.use_proprio
    stats = spec.action_normalizer.stats
    nudged = ArrayStats.from_dict({**stats.to_dict(), "mean": [stats.mean[0] + 1e-9, *stats.mean[1:]]})
    assert _spec(nudged).fingerprint() != spec.fingerprint()
    assert _spec(horizon=3).fingerprint() != spec.fingerprint()
    with pytest.raises(ValueError, match="horizon 5 > max_horizon 4"):
        _spec(horizon=5)
    with pytest.raises(ValueError, match="proprio_normalizer"):
        _spec(proprio_dim=0, proprio_names=[])
    with pytest.raises(ValueError, match="unknown keys"):
        ActionSpec.from_dict({**spec.to_dict(), "chunk": 8})
    (tmp_path / "bad.json").write_text('{"horizon": 1}')
    with pytest.raises(ValueError, match="bad.json"):
        ActionSpec.load(tmp_path / "bad.json")


def test_normalize_instruction():
    assert normalize_instruction("  Pick up the  Black bowl.\n") == "pick up the black bowl"
    assert normalize_instruction("open the drawer") == "open the drawer"
    assert normalize_instruction("Put it on the plate .") == "put it on the plate"
    assert normalize_instruction("What is 3.5?") == "what is 3.5?"


# ---- images -----------------------------------------------------------------------------------------


def _photo(size: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)
    pixels = np.stack(
        [np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), rng.uniform(0, 255, (size, size))], axis=-1
    )  # (height, width, 3)
    return Image.fromarray(pixels.astype(np.uint8))


def test_augment_image_is_deterministic_under_a_seed():
    img = _photo()
    a = np.asarray(augment_image(img, np.random.default_rng(3)))
    b = np.asarray(augment_image(img, np.random.default_rng(3)))
    c = np.asarray(augment_image(img, np.random.default_rng(4)))
    assert a.shape == (64, 64, 3)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    np.testing.assert_array_equal(np.asarray(augment_image(img, g1)), np.asarray(augment_image(img, g2)))
    # One generator, consecutive images: different draws.
    rng = np.random.default_rng(0)
    assert not np.array_equal(np.asarray(augment_image(img, rng)), np.asarray(augment_image(img, rng)))
    with pytest.raises(TypeError, match="Generator"):
        augment_image(img, 0)


def test_center_crop_geometry_and_resize():
    # A 200x200 blue image with a centred 100x100 red square: a centre crop of 90 % area magnifies the square
    # by 1 / sqrt(0.9) about the centre.
    pixels = np.zeros((200, 200, 3), dtype=np.uint8)
    pixels[..., 2] = 255
    pixels[50:150, 50:150] = (255, 0, 0)
    out = np.asarray(center_crop(Image.fromarray(pixels), 0.9))
    assert out.shape == (200, 200, 3)
    red = np.argwhere(out[..., 0] > 127)
    side = 100 / math.sqrt(0.9)
    for axis in (0, 1):
        lo, hi = red[:, axis].min(), red[:, axis].max() + 1
        assert abs((hi - lo) - side) <= 1.5
        assert abs((lo + hi) / 2 - 100) <= 1
    np.testing.assert_array_equal(np.asarray(center_crop(Image.fromarray(pixels), 1.0)), pixels)
    resized = resize_image(Image.fromarray(pixels).convert("RGBA"), 56)
    assert resized.size == (56, 56) and resized.mode == "RGB"


# ---- prompt -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_proprio", [True, False])
def test_encode_action_prompt_layout(tokenizer, use_proprio):
    horizon, action_dim = 3, 7
    prompt = encode_action_prompt(
        tokenizer, "  Put the Bowl on the plate.", [4, 6], horizon * action_dim, use_proprio=use_proprio
    )
    ids = prompt.input_ids
    n = len(ids)
    assert (
        len(prompt.labels) == len(prompt.action_slots) == len(prompt.proprio_slots) == len(prompt.prefix) == n
    )
    slots = [i for i, s in enumerate(prompt.action_slots) if s]
    assert len(slots) == horizon * action_dim and slots == list(range(slots[0], slots[0] + len(slots)))
    assert all(ids[i] == tokenizer.mask_token_id for i in slots)
    assert prompt.prefix == [i < slots[0] for i in range(n)]
    # The two structural tokens after the actions are the only labels.
    assert ids[slots[-1] + 1 :] == [tokenizer.im_end_token_id, tokenizer.newline_token_id]
    assert prompt.labels[:-2] == [IGNORE_INDEX] * (n - 2) and prompt.labels[-2:] == ids[-2:]
    # The prompt ends with the assistant header and contains the normalised instruction.
    header = tokenizer.encode(f"{IM_START}assistant\n")
    assert ids[slots[0] - len(header) : slots[0]] == header
    assert "What action should the robot take to put the bowl on the plate?" in tokenizer.decode(ids)
    # Cameras: vision_start, image tokens, vision_end, in order.
    starts = [i for i, t in enumerate(ids) if t == tokenizer.vision_start_token_id]
    ends = [i for i, t in enumerate(ids) if t == tokenizer.vision_end_token_id]
    assert [e - s - 1 for s, e in zip(starts, ends, strict=True)] == [4, 6]
    assert sum(t == tokenizer.image_token_id for t in ids) == 10
    proprio = [i for i, s in enumerate(prompt.proprio_slots) if s]
    if use_proprio:
        assert proprio == [ends[-1] + 1] and ids[proprio[0]] == tokenizer.mask_token_id
    else:
        assert proprio == [] and ids.count(tokenizer.mask_token_id) == horizon * action_dim
    assert ids[0] == tokenizer.im_start_token_id


def test_encode_action_prompt_rejects_bad_input(tokenizer):
    with pytest.raises(ValueError, match="num_image_tokens"):
        encode_action_prompt(tokenizer, "x", [], 7, use_proprio=False)
    with pytest.raises(ValueError, match="num_action_slots"):
        encode_action_prompt(tokenizer, "x", [4], 0, use_proprio=False)
    with pytest.raises(ValueError, match="instruction"):
        encode_action_prompt(tokenizer, "x", [4], 7, use_proprio=False, instruction_template="Do it")
