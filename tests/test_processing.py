"""Tests for dvlx.processing: tokenizer loading and ids, image preprocessing parity, chat-template labels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dvlx.processing import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    TEMPLATES,
    ImageProcessor,
    Tokenizer,
    build_tiny_tokenizer,
    encode_conversation,
    generation_prompt,
)
from dvlx.processing.tokenizer import DREAM_ADDED_TOKENS

# The official Dream ids, only to prove the tiny tokenizer does not share them.
OFFICIAL_IDS = {
    "mask_token_id": 151666,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "pad_token_id": 151643,
    "eos_token_id": 151643,
    "bos_token_id": 151643,
}
OFFICIAL_NEWLINE_ID = 198
TEXT = (
    "<|im_start|>user\nWhat colour is the circle?<|im_end|>\n<|mask|><|mask|> héllo wörld 日本 42 ?!\n\n  x"
)
SYSTEM = "You are a helpful assistant."


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return build_tiny_tokenizer()


def backend_json(tokenizer: Tokenizer) -> dict:
    return json.loads(tokenizer.hf.backend_tokenizer.to_str())


def write_dream_layout(tokenizer: Tokenizer, folder: Path, drop: str | None = None, shift: int = 0) -> None:
    """Official Dream layout: vocab.json + merges.txt + tokenizer_config.json naming unshipped remote code.

    `drop` renames that added token (its id stays taken); `shift` moves every added id.
    """
    spec = backend_json(tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(spec["model"]["vocab"]), encoding="utf-8")
    merges = "".join(f"{a} {b}\n" for a, b in spec["model"]["merges"])
    (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
    added = {}
    for entry in spec["added_tokens"]:
        fields = {k: v for k, v in entry.items() if k != "id"}
        if fields["content"] == drop:
            fields["content"] = "<|unused|>"
        added[str(entry["id"] + shift)] = fields
    config = {
        "added_tokens_decoder": added,
        "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "tokenizer_class": "DreamTokenizer",
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "mask_token": "<|mask|>" if drop != "<|mask|>" else None,
        "errors": "replace",
        "model_max_length": 131072,
        "split_special_tokens": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


# ----------------------------------------------------------------------------------------------- tokenizer


def test_tiny_tokenizer_is_deterministic(tok):
    again = build_tiny_tokenizer()
    assert backend_json(again) == backend_json(tok)
    assert again.encode(TEXT) == tok.encode(TEXT)
    # A fresh interpreter has other hash seeds; the vocabulary must not depend on them.
    code = (
        "from dvlx.processing import build_tiny_tokenizer;"
        "print(build_tiny_tokenizer().hf.backend_tokenizer.to_str())"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root, env=env
    )
    assert json.loads(out.stdout) == backend_json(tok)


def test_tiny_tokenizer_size_and_vocabulary(tok):
    base = tok.hf.backend_tokenizer.get_vocab_size(with_added_tokens=False)
    assert 300 <= base <= 1000
    assert len(tok) == base + len(DREAM_ADDED_TOKENS)
    # Words of the synthetic datasets are single tokens (with their leading space).
    for word in ("red", "circle", "square", "triangle", "colour", "top", "left", "three", "picture"):
        assert len(tok.encode(" " + word)) == 1, word


def test_tiny_special_ids_are_resolved_by_string_and_differ_from_official(tok):
    ids = tok.special_ids()
    assert set(ids) == set(OFFICIAL_IDS)
    vocab = tok.hf.get_vocab()
    assert ids["mask_token_id"] == vocab["<|mask|>"]
    assert ids["image_token_id"] == vocab["<|image_pad|>"]
    assert ids["video_token_id"] == vocab["<|video_pad|>"]
    assert ids["vision_start_token_id"] == vocab["<|vision_start|>"]
    assert ids["vision_end_token_id"] == vocab["<|vision_end|>"]
    assert ids["vision_token_id"] == vocab["<|vision_pad|>"]
    assert ids["eos_token_id"] == ids["pad_token_id"] == ids["bos_token_id"] == vocab["<|endoftext|>"]
    assert tok.im_start_token_id == vocab["<|im_start|>"]
    assert tok.im_end_token_id == vocab["<|im_end|>"]
    for name, value in ids.items():
        assert value != OFFICIAL_IDS[name], name
    assert tok.newline_token_id != OFFICIAL_NEWLINE_ID
    assert tok.encode("\n") == [tok.newline_token_id]
    # Added tokens follow the learned vocabulary but not in the official order.
    base = tok.hf.backend_tokenizer.get_vocab_size(with_added_tokens=False)
    added = sorted(tok.hf.added_tokens_decoder.items())
    assert [i for i, _ in added] == list(range(base, base + len(DREAM_ADDED_TOKENS)))
    assert [t.content for _, t in added] != [token for token, _ in DREAM_ADDED_TOKENS]
    assert len({v for k, v in ids.items() if k not in ("pad_token_id", "bos_token_id")}) == 7


def test_encode_decode_round_trip_with_special_tokens(tok):
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert ids[0] == tok.im_start_token_id
    assert ids.count(tok.mask_token_id) == 2
    assert ids.count(tok.im_end_token_id) == 1
    plain = tok.decode(ids, skip_special_tokens=True)
    assert "<|mask|>" not in plain and "<|im_start|>" not in plain and "What colour" in plain
    assert tok.convert_tokens_to_ids("<|mask|>") == tok.mask_token_id
    with pytest.raises(ValueError, match="not-a-token"):
        tok.convert_tokens_to_ids("not-a-token")


def test_add_tokens_appends_single_token_ids():
    tok = build_tiny_tokenizer()
    before = len(tok)
    assert tok.add_tokens(["<ACT_0>", "<ACT_1>", "<ACT_2>"]) == 3
    assert len(tok) == before + 3
    assert tok.encode("<ACT_1><ACT_2>") == [before + 1, before + 2]
    assert tok.add_tokens(["<ACT_0>"]) == 0


def test_save_load_round_trip_tokenizer_json_layout(tmp_path):
    tok = build_tiny_tokenizer()
    tok.add_tokens(["<ACT_0>", "<ACT_1>"])
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "auto_map" not in config
    loaded = Tokenizer.from_pretrained(tmp_path)
    text = TEXT + "<ACT_1><ACT_0>"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.special_ids() == tok.special_ids()
    assert len(loaded) == len(tok)
    assert loaded.decode(loaded.encode(text)) == text


def test_load_official_dream_layout(tok, tmp_path):
    write_dream_layout(tok, tmp_path / "dream")
    loaded = Tokenizer.from_pretrained(tmp_path / "dream")
    assert loaded.encode(TEXT) == tok.encode(TEXT)
    assert loaded.special_ids() == tok.special_ids()
    assert len(loaded) == len(tok)
    # Saving it gives a folder that loads without the DreamTokenizer code.
    loaded.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert "auto_map" not in config and config["tokenizer_class"] != "DreamTokenizer"
    again = Tokenizer.from_pretrained(tmp_path / "saved")
    assert again.encode(TEXT) == tok.encode(TEXT)
    assert again.special_ids() == tok.special_ids()


def test_tokenizer_load_errors(tok, tmp_path):
    with pytest.raises(ValueError, match="missing_folder"):
        Tokenizer.from_pretrained(tmp_path / "missing_folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*vocab.json"):
        Tokenizer.from_pretrained(tmp_path / "empty")
    write_dream_layout(tok, tmp_path / "no_mask", drop="<|mask|>")
    with pytest.raises(ValueError, match=r"<\|mask\|>.*no_mask"):
        Tokenizer.from_pretrained(tmp_path / "no_mask")
    # Declared ids that do not follow the vocabulary cannot be honoured; loading must not shift them silently.
    write_dream_layout(tok, tmp_path / "gap", shift=5)
    with pytest.raises(ValueError, match="declared with id"):
        Tokenizer.from_pretrained(tmp_path / "gap")


# ------------------------------------------------------------------------------------------ image processor


def random_image(rng: np.random.Generator, height: int, width: int, mode: str = "RGB") -> Image.Image:
    rgba = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    return rgba if mode == "RGBA" else rgba.convert(mode)


@pytest.mark.parametrize(
    ("min_pixels", "max_pixels"),
    [(56 * 56, 28 * 28 * 1280), (28 * 28 * 4, 28 * 28 * 16), (28 * 28 * 64, 28 * 28 * 128)],
)
def test_image_processor_matches_transformers(min_pixels, max_pixels):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rng = np.random.default_rng(min_pixels)
    images = [
        random_image(rng, 30, 45),  # not a multiple of 28
        random_image(rng, 5, 7),  # below every min_pixels
        random_image(rng, 200, 130, "L"),  # grayscale
        random_image(rng, 96, 64, "RGBA"),  # transparency is composited onto white
        random_image(rng, 3, 500),  # long and thin, below 28 on one side
        random_image(rng, 28, 56),  # already a multiple of 28
        random_image(rng, 301, 233, "P"),  # palette image, above the small max_pixels
    ]
    ours = ImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)(images)
    reference = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)(
        images, return_tensors="np"
    )
    assert ours["image_grid_thw"].dtype == torch.long
    assert ours["pixel_values"].dtype == torch.float32
    assert ours["image_grid_thw"].tolist() == reference["image_grid_thw"].tolist()
    np.testing.assert_allclose(ours["pixel_values"].numpy(), reference["pixel_values"], rtol=0, atol=1e-5)
    areas = [int(h) * int(w) * 14 * 14 for _, h, w in ours["image_grid_thw"]]
    assert all(min_pixels <= a <= max_pixels for a in areas[:1] + areas[2:4] + areas[5:])


def test_patch_rows_are_in_merge_window_order():
    # A 56x56 image stays 56x56 (4x4 patches); each patch is filled with its own index.
    values = np.zeros((56, 56, 3), dtype=np.uint8)
    for r in range(4):
        for c in range(4):
            values[r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14] = 10 * (4 * r + c) + 5
    processor = ImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56)
    out = processor([Image.fromarray(values)])
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]]
    rows = out["pixel_values"].numpy()
    assert rows.shape == (16, 3 * 2 * 14 * 14)
    # Undo the normalisation of channel 0 to read back the patch index of every row.
    red = rows[:, : 2 * 14 * 14] * processor.image_std[0] + processor.image_mean[0]
    patch_index = np.round((red * 255 - 5) / 10).astype(int)
    assert (patch_index == patch_index[:, :1]).all()  # both frames and all pixels of a row: one patch
    expected = [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]  # 2x2 windows, row-major inside
    assert patch_index[:, 0].tolist() == expected
    assert processor.num_image_tokens(out["image_grid_thw"][0]) == 4


def test_image_processor_counts_shapes_and_errors():
    processor = ImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    rng = np.random.default_rng(0)
    out = processor([random_image(rng, 100, 60), random_image(rng, 20, 20)])
    grid = out["image_grid_thw"]
    assert out["pixel_values"].shape == (int(grid.prod(dim=1).sum()), 1176)
    for row in grid:
        assert processor.num_image_tokens(row) == int(row.prod()) // 4
        assert 4 <= processor.num_image_tokens(row) <= 16
    assert processor.grid_thw(100, 60) == tuple(grid[0].tolist())
    empty = processor([])
    assert empty["pixel_values"].shape == (0, 1176) and empty["image_grid_thw"].shape == (0, 3)
    with pytest.raises(ValueError, match="aspect ratio"):
        processor([random_image(rng, 1, 201)])
    with pytest.raises(ValueError, match="min_pixels"):
        ImageProcessor(min_pixels=100, max_pixels=10)


def test_image_processor_config_round_trip(tmp_path):
    processor = ImageProcessor(min_pixels=512 * 28 * 28, max_pixels=4096 * 28 * 28)
    processor.save_pretrained(tmp_path / "ours")
    assert ImageProcessor.from_pretrained(tmp_path / "ours") == processor
    # The official file (keys as shipped with Dream-VL-7B, remote-code keys included).
    official = {
        "min_pixels": 3136,
        "max_pixels": 3211264,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "processor_class": "DreamVLImageProcessor",
        "auto_map": {"AutoImageProcessor": "image_processing_dreamvl.DreamVLImageProcessor"},
    }
    (tmp_path / "official").mkdir()
    (tmp_path / "official" / "preprocessor_config.json").write_text(json.dumps(official))
    assert ImageProcessor.from_pretrained(tmp_path / "official") == ImageProcessor(3136, 3211264)
    # transformers writes the bounds as pixel counts inside `size`.
    sized = {"size": {"shortest_edge": 100352, "longest_edge": 401408}, "resample": 3, "do_resize": True}
    (tmp_path / "sized").mkdir()
    (tmp_path / "sized" / "preprocessor_config.json").write_text(json.dumps(sized))
    assert ImageProcessor.from_pretrained(tmp_path / "sized") == ImageProcessor(100352, 401408)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "preprocessor_config.json").write_text(json.dumps({"resample": 2}))
    with pytest.raises(ValueError, match=r"bad.*preprocessor_config.json.*'resample'"):
        ImageProcessor.from_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match="nowhere"):
        ImageProcessor.from_pretrained(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------ templates


def turn(tok: Tokenizer, role: str, content_ids: list[int]) -> list[int]:
    return tok.encode(f"<|im_start|>{role}\n") + content_ids + tok.encode("<|im_end|>\n")


def system_ids(tok: Tokenizer, text: str = SYSTEM) -> list[int]:
    return turn(tok, "system", tok.encode(text))


def ignored(n: int) -> list[int]:
    return [IGNORE_INDEX] * n


def test_plain_template(tok):
    conv = [
        {"from": "human", "value": "Describe the picture.\n<image>"},
        {"from": "gpt", "value": "A red circle at the top."},
    ]
    enc = encode_conversation(tok, conv, "plain", [5])
    caption = tok.encode("A red circle at the top.\n")
    assert enc.input_ids == [tok.image_token_id] * 5 + caption
    assert enc.labels == ignored(5) + caption
    assert caption[-1] == tok.newline_token_id
    # Two images in the human turn, plus eos targets.
    conv[0]["value"] = "<image> and <image>"
    enc = encode_conversation(tok, conv, "plain", [2, 3], num_eos=2)
    eos = [tok.eos_token_id] * 2
    assert enc.input_ids == [tok.image_token_id] * 5 + caption + eos
    assert enc.labels == ignored(5) + caption + eos
    with pytest.raises(ValueError, match="exactly a human turn then a gpt turn"):
        encode_conversation(tok, conv + conv[1:], "plain", [2, 3])
    with pytest.raises(ValueError, match="<image>"):
        encode_conversation(tok, [{"from": "human", "value": "hi"}, conv[1]], "plain", [])


def test_qwen_template_multi_turn_with_image(tok):
    conv = [
        {"from": "human", "value": "What colour is the circle?\n<image>"},
        {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "And the square?"},
        {"from": "gpt", "value": "Blue."},
    ]
    enc = encode_conversation(tok, conv, "qwen_2_5", [4])
    image = [tok.image_token_id] * 4
    # The single placeholder moves to the front of its turn, followed by "\n".
    user1 = turn(tok, "user", image + tok.encode("\nWhat colour is the circle?"))
    answer1 = turn(tok, "assistant", tok.encode("Red."))
    user2 = turn(tok, "user", tok.encode("And the square?"))
    answer2 = turn(tok, "assistant", tok.encode("Blue."))
    prompt = system_ids(tok) + user1
    assert enc.input_ids == prompt + answer1 + user2 + answer2
    assert enc.labels == ignored(len(prompt)) + answer1 + ignored(len(user2)) + answer2
    assert answer1[0] == tok.im_start_token_id and answer1[-2:] == [tok.im_end_token_id, tok.newline_token_id]
    # The same conversation with role/content keys encodes identically.
    roles = {"human": "user", "gpt": "assistant"}
    conv_rc = [{"role": roles[t["from"]], "content": t["value"]} for t in conv]
    assert encode_conversation(tok, conv_rc, "qwen_2_5", [4]) == enc


def test_qwen_template_multi_image_keeps_positions(tok):
    conv = [
        {"from": "human", "value": "Compare <image> with <image>. Which is red?"},
        {"from": "gpt", "value": "The first."},
    ]
    enc = encode_conversation(tok, conv, "qwen_2_5", [2, 3])
    content = (
        tok.encode("Compare ")
        + [tok.image_token_id] * 2
        + tok.encode(" with ")
        + [tok.image_token_id] * 3
        + tok.encode(". Which is red?")
    )
    prompt = system_ids(tok) + turn(tok, "user", content)
    answer = turn(tok, "assistant", tok.encode("The first."))
    assert enc.input_ids == prompt + answer
    assert enc.labels == ignored(len(prompt)) + answer


def test_qwen_template_text_only_system_turn_and_eos(tok):
    conv = [
        {"from": "system", "value": "Answer briefly."},
        {"from": "human", "value": "Is the sky blue?"},
        {"from": "gpt", "value": "Yes."},
    ]
    enc = encode_conversation(tok, conv, "qwen_2_5", [], num_eos=3, system_prompt="never used")
    prompt = system_ids(tok, "Answer briefly.") + turn(tok, "user", tok.encode("Is the sky blue?"))
    answer = turn(tok, "assistant", tok.encode("Yes."))
    eos = [tok.eos_token_id] * 3
    assert enc.input_ids == prompt + answer + eos
    assert enc.labels == ignored(len(prompt)) + answer + eos
    assert tok.image_token_id not in enc.input_ids
    custom = encode_conversation(tok, conv[1:], "qwen_2_5", [], system_prompt="Answer briefly.")
    assert custom.input_ids == enc.input_ids[:-3]


def test_qwen_template_drops_leading_non_user_turn(tok):
    tail = [{"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "Left."}]
    expected = encode_conversation(tok, tail, "qwen_2_5", [])
    dropped = encode_conversation(tok, [{"from": "gpt", "value": "Hello."}] + tail, "qwen_2_5", [])
    assert dropped == expected
    with_system = [{"from": "system", "value": SYSTEM}, {"from": "gpt", "value": "Hello."}] + tail
    assert encode_conversation(tok, with_system, "qwen_2_5", []) == expected


def test_qwen_template_prompt_structure_maskable(tok):
    conv = [
        {"from": "human", "value": "<image>\nHow many circles are there?\nCount them."},
        {"from": "gpt", "value": "Three."},
    ]
    clean = encode_conversation(tok, conv, "qwen_2_5", [3])
    exact = encode_conversation(tok, conv, "qwen_2_5", [3], prompt_structure_maskable=True)
    assert exact.input_ids == clean.input_ids
    answer = turn(tok, "assistant", tok.encode("Three."))
    prompt_len = len(clean.input_ids) - len(answer)
    assert clean.labels[prompt_len:] == exact.labels[prompt_len:] == answer
    assert clean.labels[:prompt_len] == ignored(prompt_len)
    structural = {tok.im_start_token_id, tok.im_end_token_id, tok.newline_token_id}
    prompt_ids = exact.input_ids[:prompt_len]
    for token, label in zip(prompt_ids, exact.labels[:prompt_len], strict=True):
        assert label == (token if token in structural else IGNORE_INDEX)
    # system: start, "\n", end, "\n"; user: start, "\n", "\n" after the image, "\n" inside, end, "\n".
    assert sum(label != IGNORE_INDEX for label in exact.labels[:prompt_len]) == 10
    assert all(
        label == IGNORE_INDEX
        for token, label in zip(exact.input_ids, exact.labels, strict=True)
        if token == tok.image_token_id
    )


def test_placeholder_count_and_argument_errors(tok):
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]
    with pytest.raises(ValueError, match=r"1 <image> placeholders but num_image_tokens has 2 entries"):
        encode_conversation(tok, conv, "qwen_2_5", [4, 4])
    with pytest.raises(ValueError, match=r"1 <image> placeholders but num_image_tokens has 0 entries"):
        encode_conversation(tok, conv, "plain", [])
    with pytest.raises(ValueError, match="did you mean 'qwen_2_5'"):
        encode_conversation(tok, conv, "qwen2.5", [4])
    with pytest.raises(ValueError, match="speaker 'bot'"):
        encode_conversation(tok, [{"from": "bot", "value": "x"}], "qwen_2_5", [])
    with pytest.raises(ValueError, match="num_eos"):
        encode_conversation(tok, conv, "qwen_2_5", [4], num_eos=-1)
    assert TEMPLATES == ("plain", "qwen_2_5") and IMAGE_PLACEHOLDER == "<image>"


def test_generation_prompt_is_the_training_prefix(tok):
    conv = [{"from": "human", "value": "<image>\nWhat shape is it?"}, {"from": "gpt", "value": "A square."}]
    enc = encode_conversation(tok, conv, "qwen_2_5", [6])
    header = tok.encode("<|im_start|>assistant\n")
    prompt = generation_prompt(tok, "<image>\nWhat shape is it?", "qwen_2_5", [6])
    first_target = next(i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX)
    assert prompt == enc.input_ids[: first_target + len(header)]
    assert prompt[-len(header) :] == header
    # Without a placeholder the image goes in front with "\n", as in training.
    assert generation_prompt(tok, "What shape is it?", "qwen_2_5", [6]) == prompt
    assert generation_prompt(tok, "ignored", "plain", [2, 3]) == [tok.image_token_id] * 5
