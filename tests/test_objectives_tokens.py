"""Tests for the objectives over action tokens: `discrete`, `discrete_diffusion` and `ar`."""

from __future__ import annotations

import pytest
import torch
from vla_batch import make_batch, tiny_backbone, tiny_spec

from dvlx.config import ObjectiveConfig
from dvlx.objectives.ar import AutoregressiveObjective
from dvlx.objectives.base import objective_class
from dvlx.objectives.discrete import DiscreteObjective
from dvlx.objectives.discrete_diffusion import DiscreteDiffusionObjective
from dvlx.processing import build_tiny_tokenizer
from dvlx.processing.action_tokens import ActionTokenizer

NAMES = ("discrete", "discrete_diffusion", "ar")
INSTRUCTIONS = ["pick up the block", "open the drawer and put the red cup inside the box", "lift"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    tokenizer = build_tiny_tokenizer()
    ActionTokenizer(tokenizer).ensure_tokens()
    return tokenizer


def backbone_for(tok, seed: int = 0, **overrides):
    """A tiny backbone built for the vocabulary without action tokens, then resized to the tokenizer."""
    backbone = tiny_backbone(tok, seed=seed, **overrides)
    backbone.resize_token_embeddings(len(tok))
    return backbone


def objective(name: str, tok, spec, **cfg):
    torch.manual_seed(1)
    return objective_class(name)(spec, 64, ObjectiveConfig(name=name, **cfg), tok)


def row(batch: dict, b: int, spec) -> dict:
    """Row b of a batch as a batch of one, trimmed to its own length (no padding)."""
    length = int(batch["attention_mask"][b].sum())
    cameras = len(spec.cameras)
    patches = batch["image_grid_thw"].prod(dim=1).tolist()
    start = sum(patches[: b * cameras])
    stop = start + sum(patches[b * cameras : (b + 1) * cameras])
    out = {}
    for key, value in batch.items():
        if key == "pixel_values":
            out[key] = value[start:stop]
        elif key == "image_grid_thw":
            out[key] = value[b * cameras : (b + 1) * cameras]
        elif value.dim() >= 2 and value.shape[1] == batch["input_ids"].shape[1]:
            out[key] = value[b : b + 1, :length]
        else:
            out[key] = value[b : b + 1]
    return out


def on_bin_centres(values: torch.Tensor, actions: ActionTokenizer) -> bool:
    centres = actions.centres.float()
    return bool(((values.flatten()[:, None] - centres[None, :]).abs().min(dim=1).values < 1e-6).all())


# ------------------------------------------------------------------------------------------- set-up
def test_registry_and_constructor_errors(tok):
    spec = tiny_spec()
    assert objective_class("discrete") is DiscreteObjective
    assert objective_class("discrete_diffusion") is DiscreteDiffusionObjective
    assert objective_class("ar") is AutoregressiveObjective
    assert AutoregressiveObjective.attention == "causal"
    for name in NAMES:
        with pytest.raises(ValueError, match=f"objectives/{name}.py: objective '{name}' needs the tokenizer"):
            objective_class(name)(spec, 64, ObjectiveConfig(name=name), None)
    bare = build_tiny_tokenizer()
    with pytest.raises(ValueError, match="ensure_tokens"):
        DiscreteObjective(spec, 64, ObjectiveConfig(name="discrete"), bare)
    obj = objective("discrete_diffusion", tok, spec)
    suffix = [tok.im_end_token_id, tok.newline_token_id]
    assert obj.response_ids.tolist() == ActionTokenizer(tok).token_ids.tolist() + suffix
    assert objective("discrete_diffusion", tok, spec, supervise_suffix=False).response_ids.shape == (256,)


# ------------------------------------------------------------------------------- loss and gradients
@pytest.mark.parametrize("name", NAMES)
def test_loss_is_finite_and_gradients_reach_heads_and_action_rows(tok, name):
    spec = tiny_spec()
    batch = make_batch(tok, spec, 3, instructions=INSTRUCTIONS)
    backbone = backbone_for(tok)
    obj = objective(name, tok, spec)
    torch.manual_seed(3)
    out = obj.loss(backbone, batch)
    assert out.loss.dim() == 0 and bool(torch.isfinite(out.loss))
    assert {"accuracy", "l1_current", "l1_future"} <= set(out.metrics)
    out.loss.backward()

    owned = list(obj.named_parameters())
    assert owned and all(n.startswith("proprio_projector.") for n, _ in owned)
    for param_name, param in owned:
        assert param.grad is not None and float(param.grad.abs().sum()) > 0, param_name
    action_ids = obj.action_ids
    head_rows = backbone.lm_head.weight.grad[action_ids]
    assert bool((head_rows.abs().sum(dim=1) > 0).all()), "every action row of lm_head is in the softmax"
    embed_rows = backbone.model.embed_tokens.weight.grad[action_ids].abs().sum(dim=1)  # [n]
    if name == "discrete":
        # Action tokens never enter the input: the slots hold <|mask|>.
        assert float(embed_rows.sum()) == 0
        assert float(backbone.model.embed_tokens.weight.grad[tok.mask_token_id].abs().sum()) > 0
    else:
        fed = set(torch.nonzero(embed_rows).flatten().tolist())
        targets = set(obj.action_tokens.index_of(batch["actions"]).flatten().tolist())
        assert fed and fed <= targets
    assert float(backbone.visual.patch_embed.proj.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("name", NAMES)
def test_invalid_chunk_steps_are_not_supervised(tok, name):
    spec = tiny_spec()
    batch = make_batch(tok, spec, 3, instructions=INSTRUCTIONS)
    batch["action_valid"][0, -2:] = False
    backbone = backbone_for(tok)
    # The suffix is read after the last (invalid) slot in `ar`, so it is left out here.
    obj = objective(name, tok, spec, supervise_suffix=False)
    losses = []
    for fill in (0.0, 0.77):
        changed = dict(batch, actions=batch["actions"].clone())
        changed["actions"][0, -2:] = fill
        torch.manual_seed(5)
        losses.append(obj.loss(backbone, changed).loss)
    assert torch.equal(losses[0], losses[1])
    changed["actions"][0, 0] = 0.77
    torch.manual_seed(5)
    assert not torch.equal(obj.loss(backbone, changed).loss, losses[0])


def test_suffix_supervision_uses_the_two_labels(tok):
    spec = tiny_spec()
    batch = make_batch(tok, spec, 3, instructions=INSTRUCTIONS)
    backbone = backbone_for(tok)
    with_suffix = objective("discrete", tok, spec)
    without = objective("discrete", tok, spec, supervise_suffix=False)
    suffix = with_suffix.suffix_positions(batch)
    assert suffix.sum(dim=1).tolist() == [2, 2, 2]
    assert set(batch["input_ids"][suffix].tolist()) == {tok.im_end_token_id, tok.newline_token_id}
    assert not torch.equal(with_suffix.loss(backbone, batch).loss, without.loss(backbone, batch).loss)
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.raises(ValueError, match="'labels'"):
        with_suffix.loss(backbone, unlabelled)
    assert torch.isfinite(without.loss(backbone, unlabelled).loss)


# ------------------------------------------------------------------------------------- overfitting
@pytest.mark.parametrize("name", NAMES)
def test_overfits_one_batch_and_samples_its_actions(tok, name):
    spec = tiny_spec(horizon=2, action_dim=2, cameras=("front",), image_size=28)
    batch = make_batch(tok, spec, 2, instructions=INSTRUCTIONS[:2])
    backbone = backbone_for(tok, num_hidden_layers=1)
    obj = objective(name, tok, spec)
    params = list(backbone.parameters()) + list(obj.parameters())
    lr, max_steps = (3e-3, 250) if name == "discrete_diffusion" else (1e-2, 120)
    optimiser = torch.optim.Adam(params, lr=lr)
    torch.manual_seed(0)
    recent = []
    for _ in range(max_steps):
        loss = obj.loss(backbone, batch).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        recent = (recent + [float(loss.detach())])[-10:]
        if len(recent) == 10 and sum(recent) / 10 < 0.03:
            break
    with torch.no_grad():
        final = sum(float(obj.loss(backbone, batch).loss) for _ in range(8)) / 8
    assert final < 0.05, f"{name}: loss {final} after overfitting"
    width = obj.action_tokens.bin_width
    for steps in ((1, spec.num_action_slots) if name == "discrete_diffusion" else (None,)):
        sampled = obj.sample(backbone, batch, steps=steps)
        assert sampled.shape == batch["actions"].shape
        assert float((sampled - batch["actions"]).abs().max()) <= width


# ----------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize(("name", "steps"), [("discrete", None), ("discrete_diffusion", 1),
                                             ("discrete_diffusion", 12), ("ar", None)])
def test_sample_shape_rows_independent_and_slots_rewritten(tok, name, steps):
    spec = tiny_spec()
    batch = make_batch(tok, spec, 3, instructions=INSTRUCTIONS)
    lengths = batch["attention_mask"].sum(dim=1)
    assert len(set(lengths.tolist())) == 3, "rows of different lengths exercise the right padding"
    backbone = backbone_for(tok).eval()
    obj = objective(name, tok, spec)
    together = obj.sample(backbone, batch, steps=steps)
    assert together.shape == (3, spec.horizon, spec.action_dim)
    assert on_bin_centres(together, obj.action_tokens)
    for b in range(3):
        assert torch.equal(obj.sample(backbone, row(batch, b, spec), steps=steps)[0], together[b]), b
    # Whatever the data put in the action slots, sampling starts from its own placeholders.
    scribbled = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["action_slots"], tok.pad_token_id))
    assert torch.equal(obj.sample(backbone, scribbled, steps=steps), together)


def input_lengths(backbone) -> list[int]:
    """Registers a hook on the first LM layer; the returned list collects each call's sequence length."""
    seen: list[int] = []
    backbone.model.layers[0].register_forward_hook(lambda module, args, output: seen.append(args[0].shape[1]))
    return seen


def test_ar_kv_cache_decoding_equals_full_recomputation(tok):
    spec = tiny_spec()
    batch = make_batch(tok, spec, 3, instructions=INSTRUCTIONS)
    backbone = backbone_for(tok).eval()
    seen = input_lengths(backbone)
    cached = objective("ar", tok, spec, use_cache=True).sample(backbone, batch)
    first = int(batch["action_slots"].float().argmax(dim=1).min())
    last = int(batch["action_slots"].nonzero()[:, 1].max())
    # One pass over the shared prompt, then one column at a time up to the last slot of any row.
    assert seen == [first] + [1] * (last - first)
    seen.clear()
    recomputed = objective("ar", tok, spec, use_cache=False).sample(backbone, batch)
    assert set(seen) == {batch["input_ids"].shape[1]}
    assert torch.equal(cached, recomputed)


def test_discrete_diffusion_prefix_cache_equals_recomputation(tok):
    spec = tiny_spec()
    batch = make_batch(tok, spec, 3, instructions=INSTRUCTIONS)
    backbone = backbone_for(tok, attention="prefix").eval()
    seen = input_lengths(backbone)
    length = batch["input_ids"].shape[1]
    keep = int(batch["action_slots"].float().argmax(dim=1).min()) - 1
    for steps in (3, spec.num_action_slots):
        seen.clear()
        cached = objective("discrete_diffusion", tok, spec, use_cache=True).sample(backbone, batch, steps)
        assert seen == [length] + [length - keep] * (steps - 1)
        seen.clear()
        plain = objective("discrete_diffusion", tok, spec, use_cache=False).sample(backbone, batch, steps)
        assert seen == [length] * steps
        assert torch.equal(cached, plain)
    # Under full attention the cache would not be exact, so it is not used.
    full = backbone_for(tok).eval()
    seen = input_lengths(full)
    objective("discrete_diffusion", tok, spec, use_cache=True).sample(full, batch, steps=3)
    assert seen == [length] * 3


def test_discrete_diffusion_steps_reveal_every_slot(tok):
    spec = tiny_spec()
    batch = make_batch(tok, spec, 3, instructions=INSTRUCTIONS)
    backbone = backbone_for(tok).eval()
    obj = objective("discrete_diffusion", tok, spec)
    seen = input_lengths(backbone)
    one = obj.sample(backbone, batch)  # default: one step
    assert len(seen) == 1
    seen.clear()
    many = obj.sample(backbone, batch, steps=spec.num_action_slots)
    # The even schedule reveals one slot per row per step, so every step runs.
    assert len(seen) == spec.num_action_slots
    for values in (one, many):
        assert values.shape == (3, spec.horizon, spec.action_dim)
        assert on_bin_centres(values, obj.action_tokens)
