"""Tests for dvlx.processing.action_tokens (bins, ids, round trips, official layout) and
DreamVL.resize_token_embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import AddedToken, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE
from transformers import Qwen2Tokenizer

from dvlx.backbone import DreamVL, preset_config
from dvlx.processing import Tokenizer, build_tiny_tokenizer
from dvlx.processing.action_tokens import ActionTokenizer, action_token
from dvlx.processing.tokenizer import DREAM_ADDED_TOKENS, EOS_TOKEN


@pytest.fixture()
def tok() -> Tokenizer:
    return build_tiny_tokenizer()


def official_layout_tokenizer() -> Tokenizer:
    """Byte-level BPE with only the byte alphabet, then Dream's added tokens in the official order, so
    `<|mask|>` is the last id, as in the Dream-VL tokenizer before the action tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = BackendTokenizer(BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in DREAM_ADDED_TOKENS])
    hf = Qwen2Tokenizer(
        tokenizer_object=backend, unk_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
        bos_token=None,
    )
    return Tokenizer(hf, source="official_layout_tokenizer()")


def test_ensure_tokens_adds_once_and_ids_come_from_the_strings(tok):
    before = len(tok)
    actions = ActionTokenizer(tok)
    with pytest.raises(ValueError, match="ensure_tokens"):
        _ = actions.token_ids
    assert actions.ensure_tokens() == 256
    assert len(tok) == before + 256
    assert ActionTokenizer(tok).ensure_tokens() == 0
    assert len(tok) == before + 256
    expected = [tok.convert_tokens_to_ids(action_token(k)) for k in range(256)]
    assert actions.token_ids.tolist() == expected
    assert tok.encode("<|action_7|><|action_200|>") == [expected[7], expected[200]]


def test_a_tokenizer_with_some_action_tokens_is_an_error(tok):
    tok.add_tokens([action_token(0), action_token(1)])
    with pytest.raises(ValueError, match="2 of the 256 action tokens"):
        ActionTokenizer(tok).ensure_tokens()


@pytest.mark.parametrize("num_bins", [256, 16])
def test_round_trip_within_half_a_bin(tok, num_bins):
    actions = ActionTokenizer(tok, num_bins)
    actions.ensure_tokens()
    x = torch.cat([torch.rand(4000) * 2 - 1, torch.tensor([-1.0, 1.0, 0.0, -0.9999, 0.9999])])
    x = torch.cat([x, actions.edges.float()])  # exactly on every edge
    ids = actions.encode(x.view(-1, 7 if x.numel() % 7 == 0 else 1))
    assert ids.dtype == torch.long
    back = actions.decode(ids).view(-1)
    half = actions.bin_width / 2
    assert float((back - x).abs().max()) <= half + 1e-6
    # Values outside [-1, 1] clip to the extreme tokens.
    extreme = actions.encode(torch.tensor([1.0, -1.0]))
    assert torch.equal(actions.encode(torch.tensor([5.0, -5.0])), extreme)


def test_bin_index_is_ascending_and_tokens_reversed(tok):
    actions = ActionTokenizer(tok)
    actions.ensure_tokens()
    x = torch.linspace(-1, 1, 1001)
    bins = actions.bin_index(actions.encode(x))
    assert bool((bins[1:] >= bins[:-1]).all())
    assert bins[0] == 0 and bins[-1] == 255
    ids = actions.token_ids
    assert actions.encode(torch.tensor([1.0])).item() == ids[0]
    assert actions.encode(torch.tensor([-1.0])).item() == ids[255]
    assert actions.index_of(torch.tensor([1.0, -1.0])).tolist() == [0, 255]


def test_decode_rejects_ids_outside_the_action_vocabulary(tok):
    actions = ActionTokenizer(tok)
    actions.ensure_tokens()
    good = actions.token_ids[:3]
    for bad in (tok.mask_token_id, tok.eos_token_id, len(tok) + 5, -1):
        with pytest.raises(ValueError, match="not action tokens"):
            actions.decode(torch.cat([good, torch.tensor([bad])]))
    assert actions.is_action(torch.tensor([int(good[0]), tok.mask_token_id, len(tok) + 5])).tolist() == [
        True, False, False
    ]


def test_official_layout_matches_the_reference_formula():
    tok = official_layout_tokenizer()
    mask = tok.mask_token_id
    actions = ActionTokenizer(tok)
    assert actions.ensure_tokens() == 256
    vocab = len(tok)
    # As in Dream-VLA: <|mask|> is followed by <|action_0|> .. <|action_255|>.
    assert tok.convert_tokens_to_ids("<|action_0|>") == mask + 1
    assert actions.token_ids.tolist() == list(range(mask + 1, mask + 257))
    assert actions.token_ids[-1] == vocab - 1

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-1.2, 1.2, 5000), np.linspace(-1, 1, 256), [-1.0, 0.0, 1.0]])
    bins = np.linspace(-1, 1, 256)
    centers = (bins[:-1] + bins[1:]) / 2
    ref_ids = vocab - np.digitize(np.clip(x, -1, 1), bins)
    ids = actions.encode(torch.from_numpy(x))
    assert ids.tolist() == ref_ids.tolist()
    ref_values = centers[np.clip(vocab - ref_ids - 1, 0, 254)]
    np.testing.assert_allclose(actions.decode(ids).numpy(), ref_values, atol=1e-7)
    # <|action_0|> is the top bin (gripper 1 -> 0.996), the middle value decodes to 0.
    top = actions.decode(torch.tensor([mask + 1])).item()
    assert top == pytest.approx(centers[-1]) and top > 0.99
    assert actions.decode(actions.encode(torch.tensor([0.0]))).item() == pytest.approx(0.0, abs=1e-7)


def tiny_model(tok: Tokenizer) -> DreamVL:
    torch.manual_seed(0)
    return DreamVL(preset_config("tiny", vocab_size=len(tok), **tok.special_ids()))


def test_resize_grows_keeps_rows_and_padding(tok):
    model = tiny_model(tok)
    old_size = model.config.vocab_size
    old_embed = model.model.embed_tokens.weight.detach().clone()
    old_head = model.lm_head.weight.detach().clone()
    model.model.embed_tokens.weight.requires_grad_(False)
    ActionTokenizer(tok).ensure_tokens()
    model.resize_token_embeddings(len(tok))

    new_size = len(tok)
    embed, head = model.model.embed_tokens, model.lm_head
    assert embed.weight.shape == (new_size, model.config.hidden_size)
    assert head.weight.shape == (new_size, model.config.hidden_size)
    assert embed.num_embeddings == head.out_features == new_size
    assert model.config.vocab_size == model.model.config.vocab_size == new_size
    assert embed.padding_idx == tok.pad_token_id
    assert not embed.weight.requires_grad and head.weight.requires_grad
    assert torch.equal(embed.weight[:old_size], old_embed)
    assert torch.equal(head.weight[:old_size], old_head)
    new_rows = torch.cat([embed.weight[old_size:], head.weight[old_size:]]).detach().flatten()
    std = model.config.initializer_range
    assert abs(float(new_rows.std()) - std) < 0.15 * std and abs(float(new_rows.mean())) < 0.1 * std

    ids = torch.tensor([[tok.mask_token_id, new_size - 1, new_size - 2]])
    out = model(ids)
    assert out.logits.shape == (1, 3, new_size)


def test_resize_shrinks_and_refuses_to_drop_special_ids(tok):
    model = tiny_model(tok)
    old_head = model.lm_head.weight.detach().clone()
    highest = max(tok.special_ids().values())
    model.resize_token_embeddings(highest + 1)
    assert model.lm_head.weight.shape[0] == highest + 1
    assert torch.equal(model.lm_head.weight, old_head[: highest + 1])
    with pytest.raises(ValueError, match="special id"):
        model.resize_token_embeddings(highest)
    with pytest.raises(ValueError, match="must be an int"):
        model.resize_token_embeddings(12.0)
