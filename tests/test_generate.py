"""Masked-diffusion generation: schedules, token and position selection, the denoising loop (per-row
behaviour, cache exactness, restriction, EOS), answer decoding and the chat CLI. CPU, tiny sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from reference_generate import reference_generate

from dvlx import chat
from dvlx.backbone import DreamVL, preset_config
from dvlx.diffusion import ALGORITHMS, decode_generated, generate, schedule_counts
from dvlx.diffusion.generate import _finished
from dvlx.diffusion.sampling import (
    confidence,
    draw_tokens,
    filter_logits,
    origin_positions,
    reveal_counts,
    select_positions,
)
from dvlx.processing import ImageProcessor, build_tiny_tokenizer, generation_prompt

CONFIDENCE_ALGS = ("maskgit_plus", "topk_margin", "entropy")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = preset_config("tiny", vocab_size=len(tokenizer), **tokenizer.special_ids())
    return DreamVL(config).eval()


def _double(model: DreamVL) -> DreamVL:
    """A float64 copy: rows batched with padding then agree with rows alone far below any score gap."""
    copy = DreamVL(model.config).eval()
    copy.load_state_dict(model.state_dict())
    return copy.double()


def _prompt(tokenizer, question: str, colour: str = "red", size: int = 56) -> dict:
    processor = ImageProcessor()
    processed = processor([Image.new("RGB", (size, size), colour)])
    counts = [processor.num_image_tokens(row) for row in processed["image_grid_thw"]]
    ids = generation_prompt(tokenizer, question, "qwen_2_5", counts)
    return {"ids": ids, **processed}


def _batch(prompts: list[dict]) -> dict:
    """Left-padded batch of prompts with their images in row order."""
    length = max(len(p["ids"]) for p in prompts)
    input_ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, length - len(p["ids"]) :] = torch.tensor(p["ids"])
        mask[row, length - len(p["ids"]) :] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "pixel_values": torch.cat([p["pixel_values"] for p in prompts]),
        "image_grid_thw": torch.cat([p["image_grid_thw"] for p in prompts]),
    }


def _history(model, batch: dict, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Final sequences and a copy of the canvas after every step."""
    canvases: list[torch.Tensor] = []
    out = generate(model, **batch, stream=lambda step, seq: canvases.append(seq.clone()), **kwargs)
    return out, canvases


# ------------------------------------------------------------------------------------------- schedules
def _reference_counts(n: int, steps: int, eps: float = 1e-3) -> list[int]:
    """The reference's loop, written out: int(n * (1 - s / t)) on float32 tensors, all at the last step."""
    grid = torch.linspace(1, eps, steps + 1)
    remaining = torch.tensor(n)
    counts = []
    for i in range(steps):
        t, s = grid[i], grid[i + 1]
        k = int(remaining * (1 - s / t)) if i < steps - 1 else int(remaining)
        counts.append(k)
        remaining = remaining - k
    return counts


def test_original_schedule_reproduces_the_reference_quirk():
    assert schedule_counts(16, 16) == [0] + [1] * 14 + [2]
    for n, steps in [(16, 16), (128, 128), (64, 16), (32, 8), (3, 1), (8, 3), (5, 9)]:
        assert schedule_counts(n, steps, "original") == _reference_counts(n, steps)


@pytest.mark.parametrize("n, steps", [(16, 16), (10, 4), (64, 16), (7, 7), (128, 5)])
def test_even_schedule_reveals_every_step(n, steps):
    counts = schedule_counts(n, steps, "even")
    assert sum(counts) == n
    assert min(counts) >= 1 and max(counts) - min(counts) <= 1


def test_even_schedule_with_more_steps_than_slots():
    counts = schedule_counts(3, 5, "even")
    assert sum(counts) == 3 and counts.count(1) == 3


def test_reveal_counts_are_per_row():
    n = torch.tensor([16, 5, 0, 64])
    for schedule in ("original", "even"):
        counts = reveal_counts(n, 3, 8, schedule)
        alone = [int(reveal_counts(n[i : i + 1], 3, 8, schedule)[0]) for i in range(4)]
        assert counts.tolist() == alone
        assert counts[2] == 0 and bool((counts <= n).all())
    assert reveal_counts(n, 7, 8, "original").tolist() == n.tolist()


# --------------------------------------------------------------------------------- tokens, positions
def test_top_p_keeps_the_token_that_crosses_the_threshold():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    floor = torch.finfo(logits.dtype).min
    kept = filter_logits(logits, top_p=0.6) > floor
    assert kept.tolist() == [[True, True, False, False]]
    assert (filter_logits(logits, top_p=0.4) > floor).tolist() == [[True, False, False, False]]
    assert torch.equal(filter_logits(logits, top_p=1.0), logits)
    # The order of the vocabulary does not matter.
    shuffled = logits[:, [2, 0, 3, 1]]
    assert (filter_logits(shuffled, top_p=0.6) > floor).tolist() == [[False, True, False, True]]


def test_top_k_and_temperature():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, -1.0]])
    floor = torch.finfo(logits.dtype).min
    assert (filter_logits(logits, top_k=2) > floor).tolist() == [[False, True, False, True, False]]
    assert (filter_logits(logits, top_k=3) > floor).sum() == 3
    torch.testing.assert_close(filter_logits(logits, temperature=0.5), logits * 2)


def test_confidences():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]])
    tokens, chosen = draw_tokens(probs)
    assert tokens.tolist() == [0, 0] and chosen.tolist() == pytest.approx([0.7, 0.4])
    assert confidence(probs, chosen, "maskgit_plus").tolist() == pytest.approx([0.7, 0.4])
    assert confidence(probs, chosen, "topk_margin").tolist() == pytest.approx([0.5, 0.0], abs=1e-6)
    entropy = (probs * torch.log(probs)).sum(-1)
    torch.testing.assert_close(confidence(probs, chosen, "entropy"), entropy, atol=1e-6, rtol=0)


def test_select_positions_ranks_each_row_on_its_own():
    scores = torch.tensor(
        [[0.9, 0.1, 0.8, 0.7, 0.2], [0.99, 0.98, 0.97, 0.5, 0.4], [0.3, 0.2, 0.1, 0.0, 0.6]]
    )
    masked = torch.tensor(
        [[True, True, True, False, True], [False, False, True, True, True], [True, True, True, True, True]]
    )
    counts = torch.tensor([2, 1, 0])
    picked = select_positions(scores, masked, counts)
    # Row 0: the two best masked slots (slot 3 is revealed already); row 1: its best masked slot, not the
    # revealed slots 0 and 1; row 2: nothing, although its scores would win a batch-wide ranking.
    assert picked.tolist() == [
        [True, False, True, False, False],
        [False, False, True, False, False],
        [False] * 5,
    ]
    with pytest.raises(ValueError, match="counts"):
        select_positions(scores, masked, torch.tensor([5, 0, 0]))


def test_select_positions_with_alg_temp_samples_only_masked_slots():
    g = torch.Generator().manual_seed(0)
    scores = torch.tensor([[float("-inf"), -3.0, 0.0, -1e6, 2.0, 40.0]])
    masked = torch.tensor([[False, True, True, True, True, True]])
    hits = torch.zeros(6)
    for _ in range(200):
        picked = select_positions(scores, masked, torch.tensor([2]), alg_temp=1.0, generator=g)
        assert int(picked.sum()) == 2 and not bool(picked[0, 0])
        hits += picked[0].float()
    assert hits[5] == 200  # e^40 dominates: always drawn
    assert hits[4] > hits[2] > hits[1]  # the rest in order of score
    # A very small alg_temp behaves like top-k; a huge one like a uniform draw (no NaN, no error).
    picked = select_positions(scores, masked, torch.tensor([3]), alg_temp=1e-6, generator=g)
    assert picked.tolist() == [[False, False, True, False, True, True]]
    picked = select_positions(scores, masked, torch.tensor([5]), alg_temp=1e9, generator=g)
    assert picked.tolist() == [[False, True, True, True, True, True]]


def test_origin_positions_reveal_with_the_given_probability():
    g = torch.Generator().manual_seed(0)
    masked = torch.ones(50, 200, dtype=torch.bool)
    masked[:, ::2] = False
    picked = origin_positions(masked, 0.25, g)
    assert not bool((picked & ~masked).any())
    assert abs(picked.sum().item() / masked.sum().item() - 0.25) < 0.02
    assert torch.equal(origin_positions(masked, 1.0, g), masked)
    assert not bool(origin_positions(masked, 0.0, g).any())


# ------------------------------------------------------------------------------------------------ loop
@pytest.mark.parametrize("schedule", ["original", "even"])
@pytest.mark.parametrize("alg", [*CONFIDENCE_ALGS, "origin"])
def test_revealed_count_per_step_follows_the_schedule(model, tokenizer, alg, schedule):
    batch = _batch([_prompt(tokenizer, "What colour is it?"), _prompt(tokenizer, "Where?", "blue")])
    n, steps = 12, 6
    out, canvases = _history(
        model,
        batch,
        max_new_tokens=n,
        steps=steps,
        alg=alg,
        schedule=schedule,
        generator=torch.Generator().manual_seed(1),
    )
    prompt_length = batch["input_ids"].shape[1]
    mask_id = model.config.mask_token_id
    masked_counts = [(c[:, prompt_length:] == mask_id).sum(1) for c in canvases]
    revealed = [(n - masked_counts[0]).tolist()] + [
        (before - after).tolist() for before, after in zip(masked_counts, masked_counts[1:], strict=False)
    ]
    assert not bool((out[:, prompt_length:] == mask_id).any())
    if alg == "origin" and schedule == "original":
        # Independent coin flips: only the last step is forced to reveal everything left.
        assert [sum(r) for r in zip(*revealed, strict=True)] == [n, n]
    else:
        expected = schedule_counts(n, steps, schedule)
        expected = expected[: len(revealed)]
        assert revealed == [[k, k] for k in expected]


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_revealed_tokens_never_change(model, tokenizer, alg):
    batch = _batch([_prompt(tokenizer, "What colour is it?")])
    prompt_length = batch["input_ids"].shape[1]
    mask_id = model.config.mask_token_id
    out, canvases = _history(
        model,
        batch,
        max_new_tokens=16,
        steps=8,
        alg=alg,
        temperature=0.8,
        top_p=0.9,
        top_k=50,
        alg_temp=0.5,
        generator=torch.Generator().manual_seed(3),
    )
    final = out[0, prompt_length:]
    for canvas in canvases:
        slots = canvas[0, prompt_length:]
        revealed = slots != mask_id
        assert torch.equal(slots[revealed], final[revealed])
        assert torch.equal(canvas[0, :prompt_length], batch["input_ids"][0])
    assert not bool((final == mask_id).any())
    assert int(final.min()) >= 0 and int(final.max()) < model.config.vocab_size


@pytest.mark.parametrize("alg", CONFIDENCE_ALGS)
def test_greedy_is_deterministic(model, tokenizer, alg):
    batch = _batch([_prompt(tokenizer, "What colour is it?")])
    first = generate(
        model, **batch, max_new_tokens=10, steps=5, alg=alg, generator=torch.Generator().manual_seed(0)
    )
    second = generate(
        model, **batch, max_new_tokens=10, steps=5, alg=alg, generator=torch.Generator().manual_seed(9)
    )
    assert torch.equal(first, second)


@pytest.mark.parametrize("alg", ["maskgit_plus", "entropy"])
def test_rows_do_not_depend_on_each_other(tokenizer, model, alg):
    model = _double(model)
    a = _prompt(tokenizer, "What colour is the shape at the top left?")
    b = _prompt(tokenizer, "Where?", "blue", size=84)
    c = _prompt(tokenizer, "How many shapes are there in this picture?", "green")
    kwargs = dict(max_new_tokens=12, steps=6, alg=alg)
    alone = generate(model, **_batch([a]), **kwargs)
    with_b = generate(model, **_batch([a, b]), **kwargs)
    with_c = generate(model, **_batch([c, a]), **kwargs)
    n = kwargs["max_new_tokens"]
    assert torch.equal(with_b[0, -n:], alone[0, -n:])
    assert torch.equal(with_c[1, -n:], alone[0, -n:])
    assert torch.equal(generate(model, **_batch([b]), **kwargs)[0, -n:], with_b[1, -n:])


@pytest.mark.parametrize("mode", ["prefix", "causal"])
@pytest.mark.parametrize("steps", [12, 3, 1])
def test_prefix_cache_gives_the_same_tokens(model, tokenizer, mode, steps):
    batch = _batch([_prompt(tokenizer, "What colour is it?"), _prompt(tokenizer, "Where is it now?", "blue")])
    kwargs = dict(max_new_tokens=12, steps=steps, alg="maskgit_plus", attention_mode=mode)
    uncached = generate(model, **batch, **kwargs)
    cached = generate(model, **batch, use_cache=True, **kwargs)
    assert torch.equal(cached, uncached)


def test_cache_under_full_attention_is_allowed(model, tokenizer):
    batch = _batch([_prompt(tokenizer, "What colour is it?")])
    out = generate(
        model, **batch, max_new_tokens=8, steps=4, alg="entropy", use_cache=True, attention_mode="full"
    )
    assert not bool((out == model.config.mask_token_id).any())
    # A single step runs one full forward, which the cache does not change.
    one = dict(max_new_tokens=8, steps=1, alg="maskgit_plus", attention_mode="full")
    assert torch.equal(generate(model, **batch, use_cache=True, **one), generate(model, **batch, **one))


def test_restrict_to(model, tokenizer):
    batch = _batch([_prompt(tokenizer, "What colour is it?")])
    prompt_length = batch["input_ids"].shape[1]
    allowed = torch.tensor([5, 17, 42, tokenizer.eos_token_id])
    for alg in ("origin", "maskgit_plus"):
        out = generate(
            model,
            **batch,
            max_new_tokens=12,
            steps=4,
            alg=alg,
            temperature=1.0,
            restrict_to=allowed,
            generator=torch.Generator().manual_seed(0),
        )
        assert set(out[0, prompt_length:].tolist()) <= set(allowed.tolist())
    as_mask = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    as_mask[allowed] = True
    greedy = dict(max_new_tokens=12, steps=4, alg="maskgit_plus")
    assert torch.equal(
        generate(model, **batch, restrict_to=as_mask, **greedy),
        generate(model, **batch, restrict_to=allowed, **greedy),
    )
    with pytest.raises(ValueError, match="allows no token"):
        generate(model, **batch, restrict_to=torch.zeros_like(as_mask), **greedy)


def test_eos_stops_early_and_keeps_the_answer(model, tokenizer):
    batch = _batch([_prompt(tokenizer, "What colour is it?")])
    prompt_length = batch["input_ids"].shape[1]
    eos = tokenizer.eos_token_id
    kwargs = dict(
        max_new_tokens=8, steps=8, alg="maskgit_plus", schedule="even", restrict_to=torch.tensor([eos, 7])
    )
    full, full_steps = _history(model, batch, **kwargs)
    early, early_steps = _history(model, batch, eos_token_id=eos, **kwargs)
    assert len(early_steps) <= len(full_steps) == 8
    assert not bool((early == model.config.mask_token_id).any())
    answer = decode_generated(tokenizer, full, prompt_length)
    assert decode_generated(tokenizer, early, prompt_length) == answer


def test_finished_rows():
    mask, eos = 9, 2
    canvas = torch.tensor([[5, 2, 9, 9], [5, 9, 2, 9], [5, 6, 7, 8], [9, 9, 9, 9]])
    assert _finished(canvas, mask, torch.tensor([eos])).tolist() == [True, False, True, False]


def test_bad_inputs_are_rejected(model, tokenizer):
    batch = _batch([_prompt(tokenizer, "What colour is it?"), _prompt(tokenizer, "Where?")])
    right_padded = batch["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="LEFT padded"):
        generate(model, batch["input_ids"], right_padded, max_new_tokens=4, steps=2)
    with pytest.raises(ValueError, match="did you mean 'entropy'"):
        generate(model, batch["input_ids"], max_new_tokens=4, steps=2, alg="entropi")
    with pytest.raises(ValueError, match="steps"):
        generate(model, batch["input_ids"], max_new_tokens=4, steps=0)


def test_decode_generated_cuts_at_the_first_stop(tokenizer):
    prompt = tokenizer.encode("<|im_start|>assistant\n")
    rows = [
        "red<|im_end|>\nblue<|endoftext|>",
        "a red circle<|endoftext|><|endoftext|><|im_end|>",
        "no stop at all",
    ]
    ids = [prompt + tokenizer.encode(text) for text in rows]
    width = max(len(row) for row in ids)
    sequences = torch.tensor([row + [tokenizer.eos_token_id] * (width - len(row)) for row in ids])
    texts = decode_generated(tokenizer, sequences, len(prompt))
    assert texts[:2] == ["red", "a red circle"]
    assert texts[2].startswith("no stop at all") and "<|endoftext|>" not in texts[2]
    assert decode_generated(tokenizer, sequences, len(prompt), stop_strings=("blue",))[0] == "red<|im_end|>\n"


# ------------------------------------------------------------------------------ parity with the reference
def _reference(model, batch: dict, seed: int, **kwargs) -> torch.Tensor:
    """tests/reference_generate.py on the same weights: full recomputation every step, global RNG."""

    def logits_fn(canvas: torch.Tensor) -> torch.Tensor:
        pixels, grid = batch["pixel_values"], batch["image_grid_thw"]
        return model(input_ids=canvas, pixel_values=pixels, image_grid_thw=grid).logits

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return reference_generate(logits_fn, batch["input_ids"], model.config.mask_token_id, **kwargs)


PARITY_SETTINGS = [
    # (max_new_tokens, steps): the official evaluation shapes (steps = length, steps = 1) and one in between.
    (8, 8),
    (12, 4),
    (3, 1),
]
SAMPLING = {"greedy": {}, "sampled": dict(temperature=0.7, top_p=0.95, top_k=200)}
# dvlx draws `origin`'s reveal coins for every slot of the canvas, the reference one per still-masked slot,
# so from the second step on the two consume the random stream differently (same distribution).
ORIGIN_STREAM = pytest.mark.xfail(
    strict=True, reason="origin_positions draws a uniform per slot, the reference one per masked slot"
)


def _parity_cases():
    for alg in ALGORITHMS:
        for n, steps in PARITY_SETTINGS:
            marks = [ORIGIN_STREAM] if alg == "origin" and steps > 1 else []
            yield pytest.param(alg, n, steps, marks=marks, id=f"{alg}-{n}-{steps}")


@pytest.mark.parametrize("sampling", list(SAMPLING))
@pytest.mark.parametrize(("alg", "n", "steps"), list(_parity_cases()))
def test_tokens_match_the_reference_sampler_at_batch_size_1(model, tokenizer, alg, n, steps, sampling):
    """Same weights and prompt: dvlx's generator and the reference's global RNG seeded alike give the same
    tokens, greedy or sampled (temperature, top-p and top-k), for every algorithm."""
    batch = _batch([_prompt(tokenizer, "What colour is the shape at the top left?")])
    kwargs = dict(max_new_tokens=n, steps=steps, alg=alg, **SAMPLING[sampling])
    for seed in range(3):
        expected = _reference(model, batch, seed, **kwargs)
        got = generate(model, **batch, generator=torch.Generator().manual_seed(seed), **kwargs)
        assert torch.equal(got, expected), seed
        assert not bool((got == model.config.mask_token_id).any())


def test_reference_ranks_slots_across_the_batch_and_dvlx_per_row():
    """The documented batch > 1 difference: the reference gives a step's whole budget to the surest row."""
    mask_id, vocab, n = 0, 6, 4
    sure = torch.full((vocab,), -10.0)
    sure[3] = 10.0

    def logits_fn(canvas: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*canvas.shape, vocab)
        logits[0] = sure  # row 0 is certain everywhere, row 1 is uniform
        return logits

    prompt = torch.tensor([[1, 2], [1, 2]])
    canvases: list[torch.Tensor] = []
    with torch.random.fork_rng():
        torch.manual_seed(0)
        reference_generate(
            lambda x: (canvases.append(x.clone()), logits_fn(x))[1], prompt, mask_id, n, 2, "maskgit_plus"
        )
    # Step 0 reveals int(8 * (1 - s/t)) = 3 slots of the batch, all from row 0; row 1 waits for the last step.
    after_first = (canvases[1][:, 2:] != mask_id).sum(dim=1).tolist()
    assert after_first == [3, 0]
    # dvlx: each row reveals its own count, floor(4 * (1 - s/t)) = 1, whatever the other row's confidence.
    masked = torch.ones(2, n, dtype=torch.bool)
    counts = reveal_counts(masked.sum(dim=1), 0, 2)
    scores = torch.tensor([[0.99] * n, [1 / vocab] * n])
    assert select_positions(scores, masked, counts).sum(dim=1).tolist() == [1, 1]


# ------------------------------------------------------------------------------------------------ chat
@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, model, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("export")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ImageProcessor().save_pretrained(folder)
    Image.new("RGB", (64, 48), "green").save(folder / "picture.png")
    return folder


def test_chat_cli_streams_and_answers(export_dir, capsys):
    image = str(export_dir / "picture.png")
    argv = ["--model", str(export_dir), "--image", image, "What colour is it?", "--steps", "4"]
    mask_char = "\u2591"
    assert chat.main([*argv, "--max-new-tokens", "8", "--stream", "--mask-char", mask_char]) == 0
    lines = capsys.readouterr().out.splitlines()
    steps = [line for line in lines if line.startswith("[")]
    assert len(steps) == 4 and steps[0].startswith("[   1/4]")
    revealed = schedule_counts(8, 4)
    for step, line in enumerate(steps):
        assert line.count(mask_char) == 8 - sum(revealed[: step + 1])
    assert len(lines) == len(steps) + 1
    assert chat.main([*argv, "--max-new-tokens", "8", "--template", "plain", "--use-cache"]) == 0


def test_chat_cli_reports_missing_inputs(export_dir, tmp_path, capsys):
    assert chat.main(["--model", str(tmp_path / "nope"), "question"]) == 2
    assert "model folder" in capsys.readouterr().err
    assert chat.main(["--model", str(export_dir), "--image", str(tmp_path / "x.jpg"), "question"]) == 2
    assert "image file" in capsys.readouterr().err
    assert chat.main(["--model", str(tmp_path), "question"]) == 2
    assert "config" in capsys.readouterr().err
