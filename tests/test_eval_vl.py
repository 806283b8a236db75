"""VL evaluation: answer normalisation and choice matching, JSONL and shard records, the
`python -m dvlx.eval vl` command end to end, and the lmms-eval plugin's request handling (without lmms-eval).
CPU, tiny sizes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from data_modules.shards import ShardWriter, write_image_text_sample
from dvlx.backbone import DreamVL, preset_config
from dvlx.diffusion import decode_generated, generate
from dvlx.eval import GenerationSettings, exact_match, lmms_plugin, match_choice, normalize_answer
from dvlx.eval import __main__ as eval_main
from dvlx.eval.vl import format_choices, read_jsonl
from dvlx.processing import ImageProcessor, build_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random DreamVL saved with its tokenizer and image processor, as an export folder holds them."""
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    DreamVL(preset_config("tiny", vocab_size=len(tokenizer), **tokenizer.special_ids())).save_pretrained(
        folder
    )
    tokenizer.save_pretrained(folder)
    ImageProcessor().save_pretrained(folder)
    return folder


def _write_jsonl(folder: Path, records: list[dict]) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for name, colour, size in (("red.png", "red", (56, 56)), ("blue.jpg", "blue", (84, 56))):
        Image.new("RGB", size, colour).save(folder / "images" / name)
    path = folder / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


RECORDS = [
    {"id": "q1", "image": "images/red.png", "question": "What colour is it?", "answer": "Red."},
    {"image": ["images/red.png", "images/blue.jpg"], "question": "Which is blue?", "answer": "the second"},
    {"question": "Is the sky blue?", "answer": "yes"},
    {"image": "images/blue.jpg", "question": "Colour?", "answer": "B", "choices": ["red", "blue", "green"]},
    {"image": "images/red.png", "question": "Shape?", "answer": "square", "choices": ["circle", "square"]},
]


# --------------------------------------------------------------------------------------------- scoring
def test_normalize_answer():
    assert normalize_answer("  The Red, circle!\n") == "red circle"
    assert normalize_answer("An apple; a pear.") == "apple pear"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert exact_match("A red circle.", "red circle") and not exact_match("red", "red circle")


def test_match_choice():
    choices = ["red circle", "blue square", "green"]
    assert match_choice("B", choices) == 1
    assert match_choice("(C) green", choices) == 2
    assert match_choice("A.", choices) == 0
    assert match_choice("The blue square.", choices) == 1  # the text, not a leading article read as "A"
    assert match_choice("I think it is green", choices) == 2
    assert match_choice("green or red circle", choices) is None  # ambiguous
    assert match_choice("D", choices) is None and match_choice("purple", choices) is None
    assert match_choice("b", choices) is None  # lower-case letters are words, not options


def test_format_choices():
    text = format_choices("Colour?", ["red", "blue"])
    assert text.splitlines()[:3] == ["Colour?", "A. red", "B. blue"]


def test_read_jsonl(tmp_path):
    records = list(read_jsonl(_write_jsonl(tmp_path, RECORDS)))
    assert [len(r.images) for r in records] == [1, 2, 0, 1, 1]
    assert records[0].id == "q1" and records[1].id == "questions.jsonl:2"
    assert [r.correct_choice for r in records] == [None, None, None, 1, 1]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"question": "Q"}, r"questions.jsonl:1: key 'answer'"),
        ({"question": "Q", "answer": "x", "image": "images/missing.png"}, "does not exist"),
        ({"question": "Q", "answer": "D", "choices": ["a", "b"]}, "key 'answer'"),
        ({"question": "Q", "answer": "a", "choices": "a,b"}, "key 'choices'"),
    ],
)
def test_read_jsonl_errors_name_the_line_and_key(tmp_path, record, message):
    with pytest.raises(ValueError, match=message):
        list(read_jsonl(_write_jsonl(tmp_path, [record])))


# ----------------------------------------------------------------------------------------- command line
def test_eval_cli_on_jsonl(export_dir, tmp_path, capsys):
    data = _write_jsonl(tmp_path, RECORDS)
    out = tmp_path / "report.json"
    argv = ["vl", "--model", str(export_dir), "--data", str(data), "--steps", "4", "--max-new-tokens", "8"]
    argv += ["--batch-size", "2", "--out", str(out), "--format-choices"]
    assert eval_main.main(argv) == 0
    assert "exact match" in capsys.readouterr().out
    report = json.loads(out.read_text())
    settings, metrics, samples = report["settings"], report["metrics"], report["samples"]
    assert settings["steps"] == 4 and settings["max_new_tokens"] == 8 and settings["alg"] == "maskgit_plus"
    assert settings["batch_size"] == 2 and settings["attention_mode"] == "full" and settings["format_choices"]
    assert metrics["num_samples"] == 5 and metrics["num_multiple_choice"] == 2
    assert 0.0 <= metrics["exact_match"] <= 1.0 and 0.0 <= metrics["multiple_choice_accuracy"] <= 1.0
    assert [s["id"] for s in samples][0] == "q1" and all(isinstance(s["prediction"], str) for s in samples)
    assert samples[3]["correct_choice"] == 1 and "A. red" in samples[3]["question"]
    assert metrics["exact_match"] == sum(exact_match(s["prediction"], s["answer"]) for s in samples) / 5

    # Batching (left padding) does not change the greedy answers; --limit keeps the first records.
    again = tmp_path / "again.json"
    argv = ["vl", "--model", str(export_dir), "--data", str(data), "--steps", "4", "--max-new-tokens", "8"]
    assert eval_main.main([*argv, "--batch-size", "1", "--limit", "3", "--out", str(again)]) == 0
    first = json.loads(again.read_text())["samples"]
    assert [s["prediction"] for s in first] == [s["prediction"] for s in samples[:3]]


def test_eval_cli_on_shards(export_dir, tmp_path):
    shards = tmp_path / "shards"
    with ShardWriter(str(shards), prefix="val", max_samples_per_shard=2) as writer:
        red = Image.new("RGB", (56, 56), "red")
        turns = [
            {"from": "human", "value": "<image>\nHow many shapes are there?"},
            {"from": "gpt", "value": "one"},
            {"from": "human", "value": "What colour is it?"},
            {"from": "gpt", "value": "red"},
        ]
        write_image_text_sample(writer, "000000", [red], turns, id="two-turns")
        write_image_text_sample(writer, "000001", [red], turns[:2], id="one-turn")
        write_image_text_sample(writer, "000002", [], [{"from": "human", "value": "Hi"}], id="no-answer")
    out = tmp_path / "report.json"
    argv = ["vl", "--model", str(export_dir), "--data", str(shards), "--steps", "2", "--max-new-tokens", "4"]
    assert eval_main.main([*argv, "--out", str(out), "--use-cache", "--attention", "prefix"]) == 0
    report = json.loads(out.read_text())
    assert [s["id"] for s in report["samples"]] == ["two-turns", "one-turn"]
    assert [s["answer"] for s in report["samples"]] == ["red", "one"]
    assert report["metrics"]["skipped"] == {"bad_record": 1}
    assert report["settings"]["use_cache"] and report["settings"]["attention_mode"] == "prefix"


def test_eval_cli_errors(export_dir, tmp_path, capsys):
    args = ["--steps", "1", "--max-new-tokens", "1"]
    assert eval_main.main(["vl", "--model", str(tmp_path / "none"), "--data", "x.jsonl", *args]) == 2
    assert "model folder" in capsys.readouterr().err
    assert eval_main.main(["vl", "--model", str(export_dir), "--data", str(tmp_path / "x.jsonl"), *args]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert eval_main.main(["vll"]) == 2
    assert "did you mean 'vl'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ lmms-eval
def test_plugin_imports_without_lmms_eval():
    assert lmms_plugin.HAS_LMMS_EVAL == (importlib.util.find_spec("lmms_eval") is not None)
    if not lmms_plugin.HAS_LMMS_EVAL:
        assert lmms_plugin.main(["--model", "dvlx"]) == 2


def test_plugin_generation_settings():
    defaults = GenerationSettings(steps=128, max_new_tokens=128)
    settings, stops = lmms_plugin.generation_settings(
        {
            "until": "\n\n",
            "max_new_tokens": 16,
            "steps": "16",
            "do_sample": False,
            "top_p": 1.0,
            "num_beams": 1,
        },
        defaults,
    )
    assert (settings.steps, settings.max_new_tokens, settings.top_p) == (16, 16, None)
    assert stops == ["\n\n", "<|im_end|>"] and settings.stop_strings == stops
    settings, stops = lmms_plugin.generation_settings({"use_cache": "False", "temperature": 0.2}, defaults)
    assert stops == ["<|endoftext|>", "<|im_end|>"] and not settings.use_cache and settings.temperature == 0.2
    with pytest.raises(ValueError, match="until"):
        lmms_plugin.generation_settings({"until": 3}, defaults)


def test_plugin_prompt_layouts(export_dir, tokenizer):
    processor = ImageProcessor.from_pretrained(export_dir)
    image = Image.new("RGB", (56, 56), "red")
    official, pixels, grid = lmms_plugin.request_prompt(tokenizer, processor, "Colour?", [image])
    training, _, _ = lmms_plugin.request_prompt(tokenizer, processor, "Colour?", [image], layout="training")
    placed, _, _ = lmms_plugin.request_prompt(
        tokenizer, processor, "<image>\nColour?", [image], layout="training"
    )
    assert placed == training
    n = processor.num_image_tokens(grid[0])
    image_id = tokenizer.image_token_id
    start = official.index(image_id)
    assert official[start : start + n] == [image_id] * n and pixels.shape[0] == int(grid.prod())
    # Training puts "\n" after the image tokens; the reference evaluation template does not.
    assert training[start + n] == tokenizer.newline_token_id != official[start + n]
    assert len(training) == len(official) + 1


def test_plugin_answers_requests_like_generate(export_dir, tokenizer):
    model = DreamVL.from_pretrained(export_dir).eval()
    processor = ImageProcessor.from_pretrained(export_dir)
    red, blue = Image.new("RGB", (56, 56), "red"), Image.new("RGB", (84, 56), "blue")
    requests = [
        ("What colour is it?", [red], {"max_new_tokens": 6, "steps": 3, "until": ["\n"]}),
        ("Compare them.", [red, blue], {"max_new_tokens": 4, "steps": 4}),
        ("And this one?", [blue], {"max_new_tokens": 6, "steps": 3, "until": ["\n"]}),
    ]
    defaults = GenerationSettings(batch_size=2)
    answers = lmms_plugin.answer_requests(model, tokenizer, processor, requests, defaults)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    # The second request alone, straight through generate + decode.
    ids, pixels, grid = lmms_plugin.request_prompt(tokenizer, processor, *requests[1][:2])
    sequences = generate(
        model,
        torch.tensor([ids]),
        pixel_values=pixels,
        image_grid_thw=grid,
        max_new_tokens=4,
        steps=4,
        alg="maskgit_plus",
    )
    assert answers[1] == decode_generated(tokenizer, sequences, len(ids), ["<|endoftext|>", "<|im_end|>"])[0]


def test_plugin_model_class(export_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown model_args"):
        lmms_plugin.DvlxLMMS(pretrained=str(export_dir), device="cpu", beams=2)
    lm = lmms_plugin.DvlxLMMS(
        pretrained=str(export_dir), device="cpu", steps=2, max_new_tokens=4, batch_size=2
    )
    with pytest.raises(NotImplementedError, match="loglikelihood"):
        lm.loglikelihood([])
    Image.new("RGB", (56, 56), "red").save(tmp_path / "red.png")
    docs = [{"image": Image.new("RGB", (56, 56), "blue")}, {"image": str(tmp_path / "red.png")}]
    lm.task_dict = {"demo": {"test": docs}}
    requests = [
        SimpleNamespace(args=("Colour?", {"until": ["\n"]}, lambda doc: [doc["image"]], i, "demo", "test"))
        for i in range(2)
    ]
    answers = lm.generate_until(requests)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
