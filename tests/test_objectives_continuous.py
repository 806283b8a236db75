"""The continuous action objectives (`l1`, `diffusion`, `flow_matching`) on a tiny Dream-VL."""

from __future__ import annotations

import pytest
import torch
from vla_batch import make_batch, tiny_backbone, tiny_spec

from dvlx.config import ObjectiveConfig
from dvlx.objectives import objective_class
from dvlx.objectives.diffusion import DDIMDiffusion
from dvlx.objectives.flow_matching import FlowMatching
from dvlx.objectives.heads import ActionChunkHead, NoisyActionProjector, SlotForward
from dvlx.objectives.l1 import L1Regression
from dvlx.processing import build_tiny_tokenizer

NAMES = ("l1", "diffusion", "flow_matching")
GENERATIVE = ("diffusion", "flow_matching")
# Prompts of different lengths, so the batch is right-padded and the prompt cache must re-align the rows.
INSTRUCTIONS = ["pick up the block", "open the drawer", "put the red bowl on the plate next to the stove"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def problem():
    tokenizer = build_tiny_tokenizer()
    spec = tiny_spec()
    batch = make_batch(tokenizer, spec, batch_size=3, instructions=INSTRUCTIONS)
    assert len(set(batch["attention_mask"].sum(dim=1).tolist())) == 3  # three lengths: right padding
    return tokenizer, spec, batch


def build(name: str, tokenizer, spec, attention: str = "full", seed: int = 0, **cfg):
    backbone = tiny_backbone(tokenizer, seed=seed, attention=attention)
    torch.manual_seed(seed + 1)
    objective = objective_class(name)(spec, backbone.config.hidden_size, ObjectiveConfig(name=name, **cfg))
    return backbone, objective


def row(batch: dict, b: int, images_per_row: int) -> dict:
    """Row b of a batch as a batch of one, unpadded; pixel rows are located through image_grid_thw."""
    patches = batch["image_grid_thw"].prod(dim=1)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), patches.cumsum(0)])
    first, last = b * images_per_row, (b + 1) * images_per_row
    length = int(batch["attention_mask"][b].sum())
    out = {k: v[b : b + 1] for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    for key in ("input_ids", "labels", "attention_mask", "action_slots", "proprio_slots", "prefix_mask"):
        out[key] = out[key][:, :length]
    out["pixel_values"] = batch["pixel_values"][int(starts[first]) : int(starts[last])]
    out["image_grid_thw"] = batch["image_grid_thw"][first:last]
    return out


def test_registry_names_the_classes():
    assert objective_class("l1") is L1Regression
    assert objective_class("diffusion") is DDIMDiffusion
    assert objective_class("flow_matching") is FlowMatching
    with pytest.raises(ValueError, match="did you mean 'flow_matching'"):
        objective_class("flow_match")


@pytest.mark.parametrize("name", NAMES)
def test_loss_is_finite_and_every_trainable_parameter_gets_a_gradient(problem, name):
    tokenizer, spec, batch = problem
    backbone, objective = build(name, tokenizer, spec)
    out = objective.loss(backbone, batch)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert objective.proprio_projector is not None
    for pname, p in objective.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, f"objective.{pname} got no gradient"
    # the LM head is not used by continuous objectives; everything else in the backbone trains
    for pname, p in backbone.named_parameters():
        if not pname.startswith("lm_head."):
            assert p.grad is not None, f"backbone.{pname} got no gradient"
    if name == "l1":
        assert set(out.metrics) == {"l1_current", "l1_future"}
    expected = {"l1": {"head"}, "diffusion": {"head", "action_projector", "time_embedding"},
                "flow_matching": {"head", "action_projector", "time_embedding"}}[name]
    assert expected | {"proprio_projector"} == {n for n, _ in objective.named_children()}


@pytest.mark.parametrize("name", NAMES)
def test_invalid_chunk_steps_do_not_count(problem, name):
    tokenizer, spec, batch = problem
    backbone, objective = build(name, tokenizer, spec)
    masked = dict(batch, action_valid=batch["action_valid"].clone())
    masked["action_valid"][0, -1] = False  # chunk steps past an episode's end
    masked["action_valid"][1, 1:] = False
    outputs = []
    objective.head.register_forward_hook(lambda module, args, out: outputs.append(out) or out.retain_grad())
    objective.loss(backbone, masked).loss.backward()
    grad = outputs[0].grad.abs().sum(dim=-1)  # [B, H]
    assert bool((grad[~masked["action_valid"]] == 0).all())
    assert bool((grad[masked["action_valid"]] > 0).all())


def overfit(name: str, steps: int, lr: float):
    """Trains backbone + objective on one batch with the noise and times fixed (a single batch in full)."""
    tokenizer = build_tiny_tokenizer()
    spec = tiny_spec(horizon=2, action_dim=3, cameras=("front",))
    batch = make_batch(tokenizer, spec, batch_size=2, instructions=INSTRUCTIONS[:2])
    backbone, objective = build(name, tokenizer, spec, head_blocks=1)
    params = list(backbone.parameters()) + list(objective.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # a linear decay lets the L1 loss settle instead of hopping around its minimum
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - i / steps)
    losses = []
    for _ in range(steps):
        torch.manual_seed(123)
        loss = objective.loss(backbone, batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        decay.step()
        losses.append(float(loss.detach()))
    return backbone, objective, batch, losses


def test_l1_overfits_a_batch_and_samples_the_targets():
    backbone, objective, batch, losses = overfit("l1", steps=60, lr=1e-3)
    assert losses[-1] < 0.03 < 0.3 < losses[0], losses
    sampled = objective.sample(backbone, batch)
    assert float((sampled - batch["actions"]).abs().max()) < 0.08


@pytest.mark.parametrize("name", GENERATIVE)
def test_generative_objectives_overfit_a_batch(name):
    _, _, _, losses = overfit(name, steps=60, lr=1e-3)
    assert losses[-1] < 0.01 * losses[0], losses


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("attention", ["full", "prefix"])
def test_sample_shape_and_rows_are_independent(problem, name, attention):
    tokenizer, spec, batch = problem
    backbone, objective = build(name, tokenizer, spec, attention=attention)
    noise = torch.randn(3, spec.horizon, spec.action_dim, generator=torch.Generator().manual_seed(0))
    together = objective.sample(backbone, batch, steps=3, noise=noise)
    assert together.shape == (3, spec.horizon, spec.action_dim) and together.dtype == torch.float32
    assert torch.isfinite(together).all()
    for b in range(3):
        alone = objective.sample(backbone, row(batch, b, len(spec.cameras)), steps=3, noise=noise[b : b + 1])
        torch.testing.assert_close(alone[0], together[b], atol=2e-5, rtol=0)
    assert not torch.allclose(together[0], together[1])


@pytest.mark.parametrize("name", GENERATIVE)
def test_prefix_cache_sampling_equals_full_recompute(problem, name):
    tokenizer, spec, batch = problem
    backbone, objective = build(name, tokenizer, spec, attention="prefix")
    cached = objective.sample(backbone, batch, steps=4, generator=torch.Generator().manual_seed(3))
    objective.cfg.use_cache = False
    plain = objective.sample(backbone, batch, steps=4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(cached, plain, atol=2e-5, rtol=0)


def test_cached_slot_states_equal_full_states(problem):
    """SlotForward's re-aligned prompt cache gives the full sequence's slot states (ragged prompts)."""
    tokenizer, spec, batch = problem
    backbone, objective = build("flow_matching", tokenizer, spec, attention="prefix")
    rows = torch.randn(3, spec.horizon * spec.action_dim, backbone.config.hidden_size)
    with torch.no_grad():
        cached = SlotForward(objective, backbone, batch, use_cache=True)
        assert cached.cached
        full = SlotForward(objective, backbone, batch, use_cache=False)(rows)
        torch.testing.assert_close(cached(rows), full, atol=1e-5, rtol=0)
        torch.testing.assert_close(cached(2 * rows), SlotForward(objective, backbone, batch)(2 * rows),
                                   atol=1e-5, rtol=0)
    full_attention = tiny_backbone(tokenizer)  # `full`: the prompt sees the slots, so no cache
    with torch.no_grad():
        assert not SlotForward(objective, full_attention, batch, use_cache=True).cached


@pytest.mark.parametrize("name", GENERATIVE)
def test_fixed_generator_is_deterministic(problem, name):
    tokenizer, spec, batch = problem
    backbone, objective = build(name, tokenizer, spec)
    # sampling needs the prompt layout only, not the targets
    prompt = {k: v for k, v in batch.items() if k not in ("actions", "action_valid", "labels")}
    first = objective.sample(backbone, prompt, steps=2, generator=torch.Generator().manual_seed(7))
    again = objective.sample(backbone, prompt, steps=2, generator=torch.Generator().manual_seed(7))
    other = objective.sample(backbone, prompt, steps=2, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_flow_sampler_follows_its_convention_end_to_end(problem):
    """A head whose output is the constant c makes the objective's sampler return noise - c."""
    tokenizer, spec, batch = problem
    backbone, objective = build("flow_matching", tokenizer, spec, attention="prefix")
    c = torch.tensor([0.5, -0.25, 1.0])
    with torch.no_grad():
        objective.head.mlp.linear_out.weight.zero_()
        objective.head.mlp.linear_out.bias.copy_(c)
    noise = torch.randint(-64, 65, (3, spec.horizon, spec.action_dim)).float() / 16
    for steps in (1, 4):
        assert torch.equal(objective.sample(backbone, batch, steps=steps, noise=noise), noise - c)


def test_default_steps_and_bad_configs(problem):
    tokenizer, spec, batch = problem
    backbone, flow = build("flow_matching", tokenizer, spec)
    calls = []
    head_forward = flow.head.forward
    flow.head.forward = lambda states: calls.append(1) or head_forward(states)
    flow.sample(backbone, batch, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 4  # flow matching samples with K = 4 unless told otherwise
    flow.cfg.steps = 2
    calls.clear()
    flow.sample(backbone, batch)
    assert len(calls) == 2
    _, ddim = build("diffusion", tokenizer, spec, train_timesteps=10)
    assert ddim.schedule.train_steps == 10
    with pytest.raises(ValueError, match="DDIM steps"):
        ddim.sample(backbone, batch, steps=11)
    with pytest.raises(ValueError, match="time_sampler"):
        build("flow_matching", tokenizer, spec, time_sampler="gaussian")
    bad = dict(batch, actions=batch["actions"][:, :, :2])
    with pytest.raises(ValueError, match=r"actions.*\[B, 4, 3\]"):
        flow.loss(backbone, bad)


def test_uniform_time_sampler_trains(problem):
    tokenizer, spec, batch = problem
    backbone, objective = build("flow_matching", tokenizer, spec, time_sampler="uniform")
    assert torch.isfinite(objective.loss(backbone, batch).loss)


def test_sampling_under_bf16_autocast_stays_float32(problem):
    tokenizer, spec, batch = problem
    backbone, objective = build("flow_matching", tokenizer, spec, attention="prefix")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = objective.sample(backbone, batch, steps=2, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_head_and_projector_shapes():
    head = ActionChunkHead(hidden_size=8, action_dim=3, blocks=2).requires_grad_(False)
    states = torch.randn(2, 4 * 3, 8)
    out = head(states)
    assert out.shape == (2, 4, 3)
    # step k sees exactly its own A slot states: changing step 1's states leaves the other steps alone
    changed = states.clone()
    changed[:, 3:6] += 1.0
    diff = (head(changed) - out).abs().sum(dim=(0, 2))
    assert float(diff[1]) > 0 and float(diff[0]) == 0 and float(diff[2:].sum()) == 0
    projector = NoisyActionProjector(hidden_size=8)
    assert projector(torch.randn(2, 4, 3)).shape == (2, 12, 8)
