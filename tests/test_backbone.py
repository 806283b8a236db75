"""Dream-VL backbone: official names/shapes, parity with transformers and with a plain-torch reference,
attention modes, KV cache, checkpoint I/O. CPU, float32, tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reference_dreamvl import official_shapes, reference_forward
from safetensors.torch import load_file, save_file
from transformers import DynamicCache
from transformers.models.qwen2 import Qwen2Config, Qwen2ForCausalLM

from dvlx.backbone import (
    ATTENTION_MODES,
    CheckpointError,
    DreamVL,
    DreamVLConfig,
    VisionConfig,
    preset_config,
)
from dvlx.backbone.model import DreamVLOutput

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference"

VOCAB = 300
# Deliberately not the official ids: nothing may hard-code them.
IDS = dict(
    mask_token_id=297,
    image_token_id=290,
    video_token_id=291,
    vision_start_token_id=292,
    vision_end_token_id=293,
    vision_token_id=294,
    pad_token_id=296,
    eos_token_id=296,
    bos_token_id=295,
)
TEXT_HIGH = 280  # random text tokens stay below every special id
GRIDS = [(1, 4, 4), (1, 4, 6)]  # two images of different sizes: 4 and 6 merged tokens


def tiny_config(**overrides) -> DreamVLConfig:
    return preset_config("tiny", vocab_size=VOCAB, **{**IDS, **overrides})


def tiny_model(seed: int = 0, **kwargs) -> DreamVL:
    torch.manual_seed(seed)
    return DreamVL(tiny_config(), **kwargs).eval()


def images(cfg: DreamVLConfig, grids=GRIDS, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random pixel rows [patches, patch_dim] in processor order, and grid_thw, as the processor gives."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor(grids)
    rows = int(grid.prod(-1).sum())
    return torch.randn(rows, cfg.vision_config.patch_dim, generator=g), grid


def image_batch(cfg: DreamVLConfig, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Two right-padded rows: row 0 holds image 0 (4 tokens), row 1 image 1 (6 tokens)."""
    g = torch.Generator().manual_seed(seed)
    img = cfg.image_token_id
    row0 = [
        *torch.randint(0, TEXT_HIGH, (3,), generator=g).tolist(),
        *[img] * 4,
        *torch.randint(0, TEXT_HIGH, (4,), generator=g).tolist(),
    ]
    row1 = [
        *torch.randint(0, TEXT_HIGH, (2,), generator=g).tolist(),
        *[img] * 6,
        *torch.randint(0, TEXT_HIGH, (5,), generator=g).tolist(),
    ]
    length = max(len(row0), len(row1))
    ids = torch.full((2, length), cfg.pad_token_id)
    mask = torch.zeros(2, length, dtype=torch.long)
    for b, row in enumerate((row0, row1)):
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
    return ids, mask


def assert_close_where(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, atol: float = 1e-5) -> None:
    valid = mask.bool()
    torch.testing.assert_close(a[valid], b[valid], atol=atol, rtol=1e-5)


# ------------------------------------------------------------------------------ 1. official layout
def _official_state_dict() -> dict[str, tuple[int, ...]]:
    listing = REFERENCE / "dream_vl_7b_state_dict.txt"
    if not listing.is_file():
        pytest.skip(f"reference listing {listing} is absent (needs the shared/ folder beside the repo)")
    out = {}
    for line in listing.read_text().splitlines():
        name, shape, _dtype = line.split("\t")
        out[name] = tuple(json.loads(shape))
    return out


def _rss_bytes() -> int | None:
    statm = Path("/proc/self/statm")
    if not statm.is_file():
        return None
    import os

    return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_7b_on_meta_matches_official_names_shapes_and_allocates_nothing():
    official = _official_state_dict()
    before = _rss_bytes()
    with torch.device("meta"):
        model = DreamVL(preset_config("7b"))
    after = _rss_bytes()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(shapes) == set(official), set(shapes) ^ set(official)
    assert {k: v for k, v in shapes.items() if official[k] != v} == {}
    assert sum(p.numel() for p in model.parameters()) == 8_317_072_896
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    if before is not None:
        assert after - before < 256 * 2**20  # 8.3B float32 parameters would be 33 GB
    # The test-only reference derives the same layout from the spec.
    official_config = json.loads((REFERENCE / "dream-vl-7b" / "config.json").read_text())
    assert official_shapes(official_config) == official


def test_7b_preset_reads_special_ids_from_the_official_config():
    cfg = preset_config("7b")
    official = json.loads(
        (Path(__file__).resolve().parents[1] / "dvlx/backbone/dream_vl_7b.json").read_text()
    )
    for key in IDS:
        assert getattr(cfg, key) == official[key]
    assert cfg.vocab_size == official["vocab_size"] and cfg.rope_theta == official["rope_theta"]
    assert preset_config("7b", num_hidden_layers=2).num_hidden_layers == 2


def test_presets_fail_loudly():
    with pytest.raises(ValueError, match="tinny.*Did you mean 'tiny'"):
        preset_config("tinny", vocab_size=VOCAB, **IDS)
    with pytest.raises(ValueError, match="mask_token_id") as err:
        preset_config("tiny", vocab_size=VOCAB, image_token_id=1)
    assert "vocab_size" not in str(err.value) and "bos_token_id" in str(err.value)
    with pytest.raises(ValueError, match="Did you mean 'hidden_size'"):
        tiny_config(hiden_size=32)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_config(mask_token_id=VOCAB)


# --------------------------------------------------------------------------- 2. transformers parity
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_text_parity_with_bidirectional_qwen2(impl):
    model = tiny_model(attn_implementation=impl)
    cfg = model.config
    hf_cfg = Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=False,
        is_causal=False,
        attn_implementation="sdpa",
    )
    hf = Qwen2ForCausalLM(hf_cfg).eval()
    text_state = {k: v for k, v in model.state_dict().items() if k.startswith(("model.", "lm_head."))}
    hf.load_state_dict(text_state, strict=True)

    ids = torch.randint(0, TEXT_HIGH, (3, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    mask[2, 4:] = 0
    with torch.no_grad():
        ours = model(ids, mask).logits
        theirs = hf(input_ids=ids, attention_mask=mask).logits
        hf.config.is_causal = True
        causal = hf(input_ids=ids, attention_mask=mask).logits
    assert_close_where(ours, theirs, mask)
    # The comparison is sensitive to the attention pattern: the causal model differs at position 0.
    assert not torch.allclose(ours[:, 0], causal[:, 0], atol=1e-4)


# ------------------------------------------------------------------------------ 3. attention modes
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_attention_modes(impl):
    model = tiny_model(attn_implementation=impl)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, TEXT_HIGH, (2, 9), generator=g)
    changed_last = ids.clone()
    changed_last[:, -1] = (ids[:, -1] + 1) % TEXT_HIGH
    prefix = torch.zeros_like(ids, dtype=torch.bool)
    prefix[:, :5] = True
    changed_prefix = ids.clone()
    changed_prefix[:, 2] = (ids[:, 2] + 1) % TEXT_HIGH

    def run(x, mode):
        with torch.no_grad():
            return model(x, attention_mode=mode, prefix_mask=prefix).logits

    assert not torch.allclose(run(ids, "full")[:, 0], run(changed_last, "full")[:, 0], atol=1e-5)
    torch.testing.assert_close(run(ids, "causal")[:, :-1], run(changed_last, "causal")[:, :-1])
    assert not torch.allclose(run(ids, "causal")[:, -1], run(changed_last, "causal")[:, -1], atol=1e-5)
    base = run(ids, "prefix")
    torch.testing.assert_close(base[:, :5], run(changed_last, "prefix")[:, :5])
    assert not torch.allclose(base[:, 5:], run(changed_prefix, "prefix")[:, 5:], atol=1e-5)
    # Non-prefix tokens attend each other both ways.
    assert not torch.allclose(base[:, 5], run(changed_last, "prefix")[:, 5], atol=1e-5)

    with pytest.raises(ValueError, match="prefix_mask"):
        model(ids, attention_mode="prefix")
    with pytest.raises(ValueError, match="attention_mode must be one of"):
        model(ids, attention_mode="bidirectional")
    assert set(ATTENTION_MODES) == {"full", "prefix", "causal"}


def test_config_default_mode_is_used():
    torch.manual_seed(0)
    model = DreamVL(tiny_config(attention="causal")).eval()
    ids = torch.randint(0, TEXT_HIGH, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model(ids, attention_mode="causal").logits)


# ---------------------------------------------------------------------- 5. independent reference
def _official_tiny_dict() -> dict:
    """An official-style config.json for a tiny model, with the extra keys the official one carries."""
    cfg = tiny_config().to_dict()
    cfg.update(
        {
            "auto_map": {
                "AutoConfig": "configuration_dreamvl.DreamVLConfig",
                "AutoModel": "modeling_dreamvl.DreamVLModel",
            },
            "architectures": ["DreamVLModel"],
            "transformers_version": "4.51.3",
            "model_type": "dream-vl",
        }
    )
    cfg.pop("attention")
    return cfg


def _random_official_weights(cfg: dict, seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in official_shapes(cfg).items():
        is_norm = "norm" in name or "ln_q" in name
        if is_norm and name.endswith("weight"):
            weights[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            weights[name] = 0.2 * torch.randn(shape, generator=g)
    return weights


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_loaded_official_folder_matches_plain_torch_reference(tmp_path, impl):
    cfg = _official_tiny_dict()
    weights = _random_official_weights(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})

    model = DreamVL.from_pretrained(tmp_path, attn_implementation=impl)
    assert model.dtype == torch.float32 and not model.training
    pixels, grid = images(model.config)
    ids, mask = image_batch(model.config)
    with torch.no_grad():
        ours = model(ids, mask, pixels, grid).logits
        ref = reference_forward(weights, cfg, ids, mask, pixels, grid)
    assert_close_where(ours, ref, mask, atol=2e-5)


# ------------------------------------------------------------------------------------ 4. round trip
def test_save_load_round_trip_sharded_and_single(tmp_path):
    model = tiny_model()
    pixels, grid = images(model.config)
    ids, mask = image_batch(model.config)
    with torch.no_grad():
        expected = model(ids, mask, pixels, grid).logits

    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size_bytes=40_000)
    assert sorted(p.name for p in (tmp_path / "single").iterdir()) == ["config.json", "model.safetensors"]
    shards = sorted((tmp_path / "sharded").glob("model-*-of-*.safetensors"))
    assert len(shards) > 3
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    saved_config = json.loads((tmp_path / "single" / "config.json").read_text())
    assert saved_config["model_type"] == "dream-vl" and saved_config["torch_dtype"] == "float32"
    assert saved_config["rope_theta"] == model.config.rope_theta
    assert not any("inv_freq" in k for k in load_file(tmp_path / "single" / "model.safetensors"))

    for name in ("single", "sharded"):
        config_path = tmp_path / name / "config.json"
        raw = json.loads(config_path.read_text())
        raw["auto_map"] = {"AutoModel": "modeling_dreamvl.DreamVLModel"}
        config_path.write_text(json.dumps(raw))
        loaded = DreamVL.from_pretrained(tmp_path / name)
        assert loaded.config == model.config
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids, mask, pixels, grid).logits, expected, atol=0, rtol=0)

    bf16 = DreamVL.from_pretrained(tmp_path / "single", dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.model.rotary_emb.inv_freq.dtype == torch.float32


def test_save_keeps_other_files_and_is_atomic(tmp_path, monkeypatch):
    model = tiny_model()
    target = tmp_path / "export"
    model.save_pretrained(target, max_shard_size_bytes=40_000)
    (target / "tokenizer.json").write_text("{}")
    model.save_pretrained(target)  # now unsharded: old shards and index must go, the tokenizer stays
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    before = load_file(target / "model.safetensors")

    import dvlx.backbone.checkpoint as ckpt

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny_model(seed=9).save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    after = load_file(target / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def _broken_copy(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_checkpoint_errors_name_the_key(tmp_path):
    good = tmp_path / "good"
    tiny_model().save_pretrained(good)
    key = "model.layers.1.mlp.up_proj.weight"

    missing = _broken_copy(good, tmp_path / "missing", lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=r"1 missing.*\n.*missing \(1\):\n.*up_proj") as err:
        DreamVL.from_pretrained(missing)
    assert str(missing) in str(err.value)

    def add(t):
        t["visual.blocks.0.attn.extra.weight"] = torch.zeros(2)

    with pytest.raises(CheckpointError, match=r"unexpected \(1\):\n.*visual.blocks.0.attn.extra.weight"):
        DreamVL.from_pretrained(_broken_copy(good, tmp_path / "unexpected", add))

    def reshape(t):
        t[key] = torch.zeros(3, 3)

    with pytest.raises(CheckpointError, match=r"mis-shaped \(1\):\n.*up_proj.weight: checkpoint \[3, 3\]"):
        DreamVL.from_pretrained(_broken_copy(good, tmp_path / "misshaped", reshape))

    def many(t):
        for i in range(12):
            t[f"extra.{i}"] = torch.zeros(1)

    with pytest.raises(CheckpointError, match=r"unexpected \(12\):(\n.*){10}\n    \.\.\. and 2 more"):
        DreamVL.from_pretrained(_broken_copy(good, tmp_path / "many", many))

    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, needle in (
        (tmp_path / "nowhere", "checkpoint folder not found"),
        (empty, "config file not found"),
    ):
        with pytest.raises(CheckpointError, match=needle) as err:
            DreamVL.from_pretrained(folder)
        assert str(folder) in str(err.value) and "\n" not in str(err.value)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((good / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json in"):
        DreamVL.from_pretrained(no_weights)


def test_config_file_errors_name_file_and_key(tmp_path):
    path = tmp_path / "config.json"
    cfg = tiny_config()
    cfg.to_json(path)
    assert DreamVLConfig.from_json(path) == cfg

    raw = json.loads(path.read_text())
    for mutate, needle in (
        (lambda d: d.pop("hidden_size"), "required key 'hidden_size' is missing"),
        (lambda d: d["vision_config"].pop("depth"), "required key 'vision_config.depth' is missing"),
        (lambda d: d.update(num_hidden_layers="2"), "key 'num_hidden_layers' must be int"),
        (lambda d: d.update(tie_word_embeddings=1), "key 'tie_word_embeddings' must be bool"),
        (lambda d: d.update(attention="bidirectional"), "attention must be one of"),
    ):
        broken = json.loads(json.dumps(raw))
        mutate(broken)
        path.write_text(json.dumps(broken))
        with pytest.raises(CheckpointError, match=needle) as err:
            DreamVLConfig.from_json(path)
        assert str(path) in str(err.value)
    assert isinstance(cfg.vision_config, VisionConfig)


# ---------------------------------------------------------------------- 6. splicing, positions, cache
def test_image_token_count_mismatch_is_an_error():
    model = tiny_model()
    pixels, grid = images(model.config)
    ids, mask = image_batch(model.config)
    ids[1, 2] = 7  # one image token fewer than the 10 features
    with pytest.raises(ValueError, match="9 image tokens .* give 10 features"):
        model(ids, mask, pixels, grid)
    with pytest.raises(ValueError, match="10 image tokens .* give 0 features"):
        model(image_batch(model.config)[0])


def test_encode_images_shape_and_embed_splices_in_order():
    model = tiny_model()
    pixels, grid = images(model.config)
    ids, _ = image_batch(model.config)
    with torch.no_grad():
        features = model.encode_images(pixels, grid)
        embeds = model.embed(ids, pixels, grid)
    assert features.shape == (10, model.config.hidden_size)
    torch.testing.assert_close(embeds[ids == model.config.image_token_id], features)
    torch.testing.assert_close(embeds[0, :3], model.model.embed_tokens.weight[ids[0, :3]])


def test_left_padding_positions_are_running_count_minus_one():
    model = tiny_model()
    ids = torch.randint(0, TEXT_HIGH, (1, 6), generator=torch.Generator().manual_seed(6))
    padded = torch.cat([torch.full((1, 3), model.config.pad_token_id), ids], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4, 5]])
    assert torch.equal(DreamVL.default_position_ids(mask, 0, 9, mask.device), expected)
    assert torch.equal(DreamVL.default_position_ids(None, 2, 3, mask.device), torch.tensor([[2, 3, 4]]))
    with torch.no_grad():
        torch.testing.assert_close(model(padded, mask).logits[:, 3:], model(ids).logits, atol=1e-5, rtol=1e-5)


def test_attention_bias_rows_always_have_a_key():
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    prefix = torch.tensor([[True, True, False, False]] * 2)
    for mode in ATTENTION_MODES:
        bias = DreamVL.attention_bias(mode, mask, prefix, 2, 0, 4, torch.float32, mask.device)
        assert bias.shape == (2, 1, 4, 4)
        # Narrowed to fp16 the bias becomes -inf where masked; no row may be fully masked.
        assert not torch.softmax(bias.half().float(), dim=-1).isnan().any(), mode
    causal = DreamVL.attention_bias("causal", mask, None, 2, 0, 4, torch.float32, mask.device)
    assert torch.equal(
        causal[1, 0] == 0, torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]).bool()
    )
    assert (
        DreamVL.attention_bias("full", torch.ones_like(mask), None, 2, 0, 4, torch.float32, mask.device)
        is None
    )


@pytest.mark.parametrize("mode", ["prefix", "causal"])
def test_prefix_kv_cache_is_exact(mode):
    model = tiny_model()
    cfg = model.config
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, TEXT_HIGH, (2, 14), generator=g)
    ids[:, 2:6] = cfg.image_token_id
    ids[1, 2:6] = torch.randint(0, TEXT_HIGH, (4,), generator=g)
    ids[1, 8:12] = cfg.image_token_id  # row 1 keeps its image later, after two pads on the left
    ids[1, :2] = cfg.pad_token_id
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    n_prefix = 12
    prefix = torch.zeros_like(ids, dtype=torch.bool)
    prefix[:, :n_prefix] = True
    pixels, grid = images(cfg, grids=[(1, 4, 4), (1, 4, 4)])

    with torch.no_grad():
        full = model(ids, mask, pixels, grid, attention_mode=mode, prefix_mask=prefix).logits
        first = model(
            ids[:, :n_prefix],
            mask[:, :n_prefix],
            pixels,
            grid,
            attention_mode=mode,
            prefix_mask=prefix[:, :n_prefix],
            past_key_values=DynamicCache(),
            use_cache=True,
        )
        cache = first.past_key_values
        assert cache.get_seq_length() == n_prefix
        suffix = model(
            ids[:, n_prefix:], mask, attention_mode=mode, prefix_mask=prefix, past_key_values=cache
        )
        assert suffix.past_key_values is None and cache.get_seq_length() == n_prefix  # read-only use
        # Padded queries are left out: nothing reads their outputs.
        assert_close_where(first.logits, full[:, :n_prefix], mask[:, :n_prefix])
        torch.testing.assert_close(suffix.logits, full[:, n_prefix:], atol=1e-5, rtol=1e-5)

        # A second step with other suffix tokens reuses the same cache.
        other = ids.clone()
        other[:, n_prefix:] = (ids[:, n_prefix:] + 5) % TEXT_HIGH
        full_other = model(other, mask, pixels, grid, attention_mode=mode, prefix_mask=prefix).logits
        again = model(
            other[:, n_prefix:],
            mask,
            attention_mode=mode,
            prefix_mask=prefix,
            past_key_values=cache,
            use_cache=True,
        )
        torch.testing.assert_close(again.logits, full_other[:, n_prefix:], atol=1e-5, rtol=1e-5)
        assert again.past_key_values is cache and cache.get_seq_length() == ids.shape[1]


def test_frozen_vision_tower_builds_no_graph():
    model = tiny_model()
    pixels, grid = images(model.config)
    ids, mask = image_batch(model.config)
    seen = []
    model.visual.merger.register_forward_hook(lambda mod, inp, out: seen.append(out.requires_grad))

    model.visual.requires_grad_(False)
    model(ids, mask, pixels, grid).logits.sum().backward()
    assert seen[-1] is False and model.projector.linear_1.weight.grad is not None
    model.visual.requires_grad_(True)
    model(ids, mask, pixels, grid).logits.sum().backward()
    assert seen[-1] is True and model.visual.blocks[0].attn.qkv.weight.grad is not None


def test_gradient_checkpointing_recomputes_and_keeps_gradients():
    model = tiny_model().train()
    pixels, grid = images(model.config)
    ids, mask = image_batch(model.config)
    calls = {"lm": 0, "vision": 0}
    model.model.layers[0].self_attn.register_forward_hook(lambda *a: calls.__setitem__("lm", calls["lm"] + 1))
    model.visual.blocks[0].attn.register_forward_hook(
        lambda *a: calls.__setitem__("vision", calls["vision"] + 1)
    )

    def grads():
        model.zero_grad()
        model(ids, mask, pixels, grid, return_logits=False).last_hidden_state.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    assert calls == {"lm": 1, "vision": 1}
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    checkpointed = grads()
    assert calls == {"lm": 3, "vision": 3}  # forward + recompute in the backward
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5)
    model.gradient_checkpointing_disable()
    grads()
    assert calls == {"lm": 4, "vision": 4}


def test_rotary_tables_stay_float32_under_dtype_casts():
    model = tiny_model()
    reference = model.model.rotary_emb.inv_freq.clone()
    model.to(torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    for table in (model.model.rotary_emb.inv_freq, model.visual.rotary_pos_emb.inv_freq):
        assert table.dtype == torch.float32
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, reference, atol=0, rtol=0)


def test_output_fields():
    model = tiny_model()
    ids = torch.randint(0, TEXT_HIGH, (2, 5))
    with torch.no_grad():
        out = model(ids, return_logits=False)
        embeds = model.embed(ids)
        via_embeds = model(inputs_embeds=embeds)
    assert isinstance(out, DreamVLOutput) and out.logits is None and out.past_key_values is None
    assert out.last_hidden_state.shape == (2, 5, model.config.hidden_size)
    assert via_embeds.logits.shape == (2, 5, VOCAB)
    torch.testing.assert_close(via_embeds.last_hidden_state, out.last_hidden_state)
