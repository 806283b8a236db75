"""Masked diffusion: CART weights, corruption, shifted loss positions and the loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dvlx.diffusion import MaskedDiffusion, cart_weights, shifted_loss_positions

MASK_ID = 7  # deliberately not a real tokenizer id


def direct_cart(context: torch.Tensor, p: float) -> torch.Tensor:
    """The O(L^2) definition in float64: w_i = sum_{k != i, context_k} 0.5 p (1-p)^(|i-k|-1)."""
    length = context.shape[1]
    idx = torch.arange(length)
    dist = (idx[:, None] - idx[None, :]).abs().double()  # (L, L)
    table = torch.where(dist > 0, 0.5 * p * (1 - p) ** (dist - 1), torch.zeros((), dtype=torch.float64))
    return context.double() @ table


def dense_loss(hidden, head, targets, masked, attention_mask, weighting, p):
    """Dense reference: logits everywhere, shift, weights from `direct_cart`, count normalisation."""
    logits = head(hidden).double()  # (B, L, V)
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets[:, 1:], reduction="none")  # (B, L - 1)
    supervised = masked[:, 1:]
    if weighting == "cart":
        loss_pos = F.pad(supervised, (0, 1))
        context = ~loss_pos
        if attention_mask is not None:
            context &= attention_mask.bool()
        weights = direct_cart(context, p)[:, :-1]
    else:
        weights = torch.ones_like(ce)
    return (ce * weights)[supervised].sum() / supervised.sum()


def assert_relclose(ours: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    ours = ours.double()
    tiny = torch.finfo(torch.float32).tiny
    err = (ours - ref).abs()
    assert bool((err <= rtol * ref.abs() + tiny).all()), float((err / ref.abs().clamp(min=tiny)).max())


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9, 1.0])
def test_cart_weights_match_definition_short(p):
    gen = torch.Generator().manual_seed(0)
    density = torch.tensor([[0.1], [0.5], [0.9]])  # one row per context density
    for length in range(1, 71):
        context = torch.rand(3, length, generator=gen) < density
        assert_relclose(cart_weights(context, p), direct_cart(context, p), 1e-5)


@pytest.mark.parametrize("p", [0.1, 0.02])
def test_cart_weights_match_definition_long(p):
    gen = torch.Generator().manual_seed(1)
    context = torch.rand(2, 700, generator=gen) < 0.3
    context[1, 50:600] = False  # a long masked span makes weights span many orders of magnitude
    ours = cart_weights(context, p)
    assert ours.dtype == torch.float32 and ours.shape == (2, 700)
    assert_relclose(ours, direct_cart(context, p), 1e-5)


def test_cart_weights_reference_examples():
    length = 1001
    clean_around = torch.ones(1, length, dtype=torch.bool)
    clean_around[0, 500] = False
    assert cart_weights(clean_around)[0, 500].item() == pytest.approx(1.0, abs=1e-6)

    long_span = torch.ones(1, length, dtype=torch.bool)
    long_span[0, 100:900] = False
    w = cart_weights(long_span)[0]
    assert w[500].item() < 1e-15
    assert w[100].item() == pytest.approx(0.5 * (1 - 0.9**100), rel=1e-6)  # span edge: 100 clean on one side
    assert w[500].item() > 0.0

    assert cart_weights(torch.ones(2, 1, dtype=torch.bool)).eq(0).all()
    assert cart_weights(torch.zeros(1, 5, dtype=torch.bool)).eq(0).all()


def test_cart_weights_under_autocast_and_bad_input():
    context = torch.rand(2, 300, generator=torch.Generator().manual_seed(2)) < 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = cart_weights(context)
    assert ours.dtype == torch.float32
    assert_relclose(ours, direct_cart(context, 0.1), 1e-5)
    with pytest.raises(ValueError, match="context"):
        cart_weights(context.float())
    with pytest.raises(ValueError, match="`p`"):
        cart_weights(context, 0.0)


def test_shifted_loss_positions():
    masked = torch.tensor([[True, False, True, True], [False, False, False, True]])
    expected = torch.tensor([[False, True, True, False], [False, False, True, False]])
    assert torch.equal(shifted_loss_positions(masked), expected)


def test_config_validation():
    with pytest.raises(ValueError, match="Did you mean 'cart'"):
        MaskedDiffusion(mask_token_id=MASK_ID, weighting="crat")
    with pytest.raises(ValueError, match="eps"):
        MaskedDiffusion(mask_token_id=MASK_ID, eps=1.0)
    with pytest.raises(ValueError, match="cart_p"):
        MaskedDiffusion(mask_token_id=MASK_ID, cart_p=0.0)
    with pytest.raises(ValueError, match="ce_chunk_size"):
        MaskedDiffusion(mask_token_id=MASK_ID, ce_chunk_size=0)
    with pytest.raises(ValueError, match="mask_token_id"):
        MaskedDiffusion(mask_token_id=-1)


def test_corrupt_masks_only_maskable_at_rate_p():
    diffusion = MaskedDiffusion(mask_token_id=MASK_ID)
    batch, length = 64, 512
    ids = torch.randint(10, 100, (batch, length), generator=torch.Generator().manual_seed(3))
    maskable = torch.zeros(batch, length, dtype=torch.bool)
    maskable[:, 100:] = True
    t = torch.full((batch,), 0.3)
    out = diffusion.corrupt(ids, maskable, t=t, generator=torch.Generator().manual_seed(4))
    assert out.masked.dtype == torch.bool
    assert not (out.masked & ~maskable).any()
    assert torch.equal(out.noisy_ids[out.masked], torch.full_like(ids[out.masked], MASK_ID))
    assert torch.equal(out.noisy_ids[~out.masked], ids[~out.masked])
    expected = (1 - 1e-3) * 0.3 + 1e-3
    assert torch.allclose(out.p, torch.full((batch,), expected))
    rate = out.masked[maskable].float().mean().item()
    assert rate == pytest.approx(expected, abs=0.01)


def test_corrupt_sampled_t_reproducible_and_extremes():
    diffusion = MaskedDiffusion(mask_token_id=MASK_ID, eps=0.01)
    ids = torch.randint(10, 100, (256, 32), generator=torch.Generator().manual_seed(5))
    maskable = torch.rand(256, 32, generator=torch.Generator().manual_seed(6)) < 0.7
    a = diffusion.corrupt(ids, maskable, generator=torch.Generator().manual_seed(7))
    b = diffusion.corrupt(ids, maskable, generator=torch.Generator().manual_seed(7))
    c = diffusion.corrupt(ids, maskable, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.masked, b.masked) and torch.equal(a.t, b.t)
    assert not torch.equal(a.masked, c.masked)
    assert bool((a.p >= 0.01).all()) and bool((a.p < 1).all())
    assert torch.allclose(a.p, 0.99 * a.t + 0.01)
    assert a.t.std() > 0.2  # one t per sequence, spread over (0, 1)

    full = diffusion.corrupt(ids, maskable, t=torch.ones(256))
    assert torch.equal(full.masked, maskable)
    with pytest.raises(ValueError, match="maskable"):
        diffusion.corrupt(ids, maskable.long())
    with pytest.raises(ValueError, match="`t`"):
        diffusion.corrupt(ids, maskable, t=torch.ones(3))


def _problem(seed: int, batch=3, length=12, width=8, vocab=11):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, width, generator=gen, requires_grad=True)
    head = nn.Linear(width, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, width, generator=gen))
    targets = torch.randint(0, vocab, (batch, length), generator=gen)
    masked = torch.rand(batch, length, generator=gen) < 0.5
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[-1, -4:] = 0  # right padding, never maskable
    masked &= attention_mask.bool()
    return hidden, head, targets, masked, attention_mask


@pytest.mark.parametrize("weighting", ["cart", "none"])
def test_loss_matches_dense_computation(weighting):
    hidden, head, targets, masked, attention_mask = _problem(9)
    diffusion = MaskedDiffusion(mask_token_id=MASK_ID, weighting=weighting)
    out = diffusion.loss(hidden, head, targets, masked, attention_mask)
    ref = dense_loss(hidden, head, targets, masked, attention_mask, weighting, 0.1)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-6)
    assert out.n_supervised.item() == int(masked[:, 1:].sum())
    logits = head(hidden)[:, :-1]  # (B, L - 1, V)
    hits = (logits.argmax(-1) == targets[:, 1:])[masked[:, 1:]].sum()
    assert out.correct.item() == int(hits)
    assert 0.0 <= out.accuracy.item() <= 1.0


def test_padding_is_not_cart_context():
    hidden, head, targets, _, _ = _problem(10, batch=1, length=10)
    masked = torch.zeros(1, 10, dtype=torch.bool)
    masked[0, 6] = True  # loss position 5, right next to the padding at 6..9
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0, 0, 0]])
    diffusion = MaskedDiffusion(mask_token_id=MASK_ID)
    weights = diffusion.position_weights(shifted_loss_positions(masked), attention_mask)
    clean = torch.tensor([[1, 1, 1, 1, 1, 0, 1, 0, 0, 0]], dtype=torch.bool)
    assert_relclose(weights, direct_cart(clean, 0.1), 1e-6)

    out = diffusion.loss(hidden, head, targets, masked, attention_mask)
    ref = dense_loss(hidden, head, targets, masked, attention_mask, "cart", 0.1)
    padded_as_context = dense_loss(hidden, head, targets, masked, None, "cart", 0.1)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert abs(ref.item() - padded_as_context.item()) > 1e-3


def test_empty_mask_gives_zero_and_backward_works():
    hidden, head, targets, _, attention_mask = _problem(11)
    masked = torch.zeros_like(targets, dtype=torch.bool)
    masked[:, 0] = True  # position 0 is masked but never supervised
    out = MaskedDiffusion(mask_token_id=MASK_ID).loss(hidden, head, targets, masked, attention_mask)
    assert out.loss.item() == 0.0 and out.n_supervised.item() == 0 and out.accuracy.item() == 0.0
    out.loss.backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    assert head.weight.grad is not None and head.weight.grad.abs().sum().item() == 0.0


def test_lm_head_sees_only_loss_rows():
    hidden, head, targets, masked, attention_mask = _problem(12)
    masked[:, 0] = True
    seen: list[int] = []

    def recording_head(rows: torch.Tensor) -> torch.Tensor:
        seen.append(rows.shape[0])
        return head(rows)

    with torch.no_grad():
        out = MaskedDiffusion(mask_token_id=MASK_ID).loss(
            hidden, recording_head, targets, masked, attention_mask
        )
    assert sum(seen) == out.n_supervised.item() == int(masked[:, 1:].sum())
    assert out.n_supervised.item() < int(masked.sum())


def test_chunked_cross_entropy_matches_unchunked():
    hidden, head, targets, masked, attention_mask = _problem(13, batch=4, length=20)
    results = []
    for chunk in (3, 100_000):
        h = hidden.detach().clone().requires_grad_(True)
        head.zero_grad()
        out = MaskedDiffusion(mask_token_id=MASK_ID, ce_chunk_size=chunk).loss(
            h, head, targets, masked, attention_mask
        )
        out.loss.backward()
        results.append((out.loss.detach(), out.correct, h.grad.clone(), head.weight.grad.clone()))
    (l1, c1, g1, w1), (l2, c2, g2, w2) = results
    assert out.n_supervised.item() > 3 * 5  # several chunks were used
    assert torch.allclose(l1, l2, rtol=1e-6, atol=1e-7) and torch.equal(c1, c2)
    assert torch.allclose(g1, g2, rtol=1e-5, atol=1e-7)
    assert torch.allclose(w1, w2, rtol=1e-5, atol=1e-7)


def test_loss_under_autocast_is_finite():
    hidden, head, targets, masked, attention_mask = _problem(14)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = MaskedDiffusion(mask_token_id=MASK_ID).loss(hidden, head, targets, masked, attention_mask)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(hidden.grad).all()


def test_loss_rejects_mismatched_shapes():
    hidden, head, targets, masked, _ = _problem(15)
    diffusion = MaskedDiffusion(mask_token_id=MASK_ID)
    with pytest.raises(ValueError, match="targets"):
        diffusion.loss(hidden, head, targets[:, :-1], masked)
    with pytest.raises(ValueError, match="masked"):
        diffusion.loss(hidden, head, targets, masked.long())


def test_tiny_model_learns_with_masked_diffusion_loss():
    """Token i+1 is a function of token i, so a per-position model learns it wherever input i is clean."""
    vocab, width, length, batch = 12, 16, 24, 16
    torch.manual_seed(0)
    embed = nn.Embedding(vocab, width)
    head = nn.Linear(width, vocab)
    optimizer = torch.optim.Adam([*embed.parameters(), *head.parameters()], lr=0.05)
    diffusion = MaskedDiffusion(mask_token_id=vocab - 1)
    gen = torch.Generator().manual_seed(16)

    def batch_ids() -> torch.Tensor:
        start = torch.randint(0, vocab - 1, (batch, 1), generator=gen)
        return (start + torch.arange(length)) % (vocab - 1)  # (B, L)

    eval_ids = batch_ids()
    eval_corruption = diffusion.corrupt(
        eval_ids, torch.ones_like(eval_ids, dtype=torch.bool), t=torch.full((batch,), 0.2), generator=gen
    )

    def eval_loss() -> float:
        with torch.no_grad():
            noisy = embed(eval_corruption.noisy_ids)
            return diffusion.loss(noisy, head, eval_ids, eval_corruption.masked).loss.item()

    before = eval_loss()
    for _ in range(40):
        ids = batch_ids()
        corrupted = diffusion.corrupt(ids, torch.ones_like(ids, dtype=torch.bool), generator=gen)
        out = diffusion.loss(embed(corrupted.noisy_ids), head, ids, corrupted.masked)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    after = eval_loss()
    assert after < 0.3 * before, (before, after)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    context = torch.rand(3, 1000, generator=torch.Generator().manual_seed(17)) < 0.4
    assert_relclose(cart_weights(context.cuda()).cpu(), direct_cart(context, 0.1), 1e-5)

    diffusion = MaskedDiffusion(mask_token_id=MASK_ID)
    ids = torch.randint(10, 100, (4, 64), generator=torch.Generator().manual_seed(18))
    maskable = torch.ones_like(ids, dtype=torch.bool)
    on_cpu = diffusion.corrupt(ids, maskable, generator=torch.Generator().manual_seed(19))
    on_cuda = diffusion.corrupt(ids.cuda(), maskable.cuda(), generator=torch.Generator().manual_seed(19))
    assert on_cuda.masked.is_cuda and torch.equal(on_cuda.masked.cpu(), on_cpu.masked)

    hidden, head, targets, masked, attention_mask = _problem(20)
    ref = diffusion.loss(hidden, head, targets, masked, attention_mask).loss
    head = head.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = diffusion.loss(hidden.cuda(), head, targets.cuda(), masked.cuda(), attention_mask.cuda())
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(ref.item(), rel=2e-2)
