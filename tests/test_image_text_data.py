"""Image-text data: shards, listing, collate, the streaming DataModule, faults, converter, synthetic data."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from data_modules.convert import main as convert_main
from data_modules.faults import FAULT_KINDS, FaultCounter, FaultTally
from data_modules.image_text import ImageTextDataModule, ImageTextStream, collate_image_text
from data_modules.shards import (
    ShardWriter,
    TruncatedShardError,
    iter_shard_samples,
    list_shards,
    read_meta,
    write_image_text_sample,
)
from data_modules.synthetic import COLOURS, caption_text, generate_captions, generate_vqa, question_type
from data_modules.synthetic import main as synthetic_main
from dvlx.processing import IGNORE_INDEX, ImageProcessor, build_tiny_tokenizer
from dvlx.processing.tokenizer import tiny_corpus

IMAGE_SIDE = 56


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def processor():
    # Pin every image to 56x56: 4x4 patches, 4 visual tokens per image.
    return ImageProcessor(min_pixels=IMAGE_SIDE * IMAGE_SIDE, max_pixels=IMAGE_SIDE * IMAGE_SIDE)


def _image(i: int) -> Image.Image:
    return Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), ((37 * i) % 256, (91 * i) % 256, 128))


def _conversation(caption: str, num_images: int = 1) -> list[dict]:
    return [
        {"from": "human", "value": "<image>" * num_images + "\nDescribe."},
        {"from": "gpt", "value": caption},
    ]


def _numbered_set(directory, n: int, per_shard: int, start: int = 0) -> list[str]:
    """Samples whose caption names the sample, so every batch row can be traced back to its sample."""
    captions = []
    with ShardWriter(directory, max_samples_per_shard=per_shard) as writer:
        for i in range(start, start + n):
            captions.append(f"sample {i}")
            write_image_text_sample(writer, f"k{i:05d}", [_image(i)], _conversation(captions[-1]), id=str(i))
    return captions


def _captions(batch, tokenizer) -> list[str]:
    out = []
    for row in batch["labels"]:
        out.append(tokenizer.decode([t for t in row.tolist() if t != IGNORE_INDEX]).strip())
    return out


def _module(tokenizer, processor, train, **kwargs) -> ImageTextDataModule:
    defaults = dict(batch_size=2, num_workers=0, shuffle_buffer=4, template="plain")
    dm = ImageTextDataModule(
        train=train, tokenizer=tokenizer, image_processor=processor, **{**defaults, **kwargs}
    )
    dm.setup()
    return dm


# ---- shards --------------------------------------------------------------------------------------


def test_writer_reader_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    written = {}
    with ShardWriter(tmp_path, prefix="part", max_samples_per_shard=3, meta={"source": "test"}) as writer:
        for i in range(8):
            files = {
                "json": json.dumps({"i": i}).encode(),
                "img0.jpg": rng.bytes(100 + i),
                "extra.npy": b"\0" * i,
            }
            writer.write(f"s{i}", files)
            written[f"s{i}"] = files
    meta = read_meta(tmp_path)
    assert meta["format"] == "dvlx.image_text" and meta["source"] == "test"
    assert meta["num_samples"] == 8
    assert [s["num_samples"] for s in meta["shards"]] == [3, 3, 2]
    assert [s["name"] for s in meta["shards"]] == [f"part-{i:06d}.tar" for i in range(3)]
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    read = {}
    for path in list_shards(str(tmp_path)):
        for sample in iter_shard_samples(path):
            read[sample["__key__"]] = {k: v for k, v in sample.items() if not k.startswith("__")}
    assert read == written


def test_writer_byte_limit_and_existing_output(tmp_path):
    with ShardWriter(tmp_path, max_bytes_per_shard=250) as writer:
        for i in range(4):
            writer.write(f"s{i}", {"bin": bytes(100)})
    assert [s["num_samples"] for s in read_meta(tmp_path)["shards"]] == [2, 2]
    with pytest.raises(FileExistsError, match="overwrite"):
        ShardWriter(tmp_path)
    with pytest.raises(ValueError, match="key"):
        ShardWriter(tmp_path, overwrite=True).write("a.b", {"json": b"{}"})


def test_image_text_sample_checks_placeholders(tmp_path):
    with ShardWriter(tmp_path) as writer:
        with pytest.raises(ValueError, match="placeholders"):
            write_image_text_sample(writer, "k0", [_image(0), _image(1)], _conversation("x"), id="0")
        write_image_text_sample(
            writer, "k1", [_image(0), (b"jpegbytes", "jpeg")], _conversation("x", 2), id="1"
        )
    (sample,) = iter_shard_samples(list_shards(str(tmp_path))[0])
    assert sample["img1.jpg"] == b"jpegbytes"
    assert Image.open(io.BytesIO(sample["img0.png"])).size == (IMAGE_SIDE, IMAGE_SIDE)
    assert json.loads(sample["json"]) == {"id": "1", "conversations": _conversation("x", 2), "num_images": 2}


def test_list_shards_variants_and_missing_paths(tmp_path):
    _numbered_set(tmp_path / "d", 6, per_shard=2)
    paths = [str(tmp_path / "d" / f"train-{i:06d}.tar") for i in range(3)]
    assert list_shards(str(tmp_path / "d")) == paths
    assert list_shards(str(tmp_path / "d" / "train-*.tar")) == paths
    assert list_shards(str(tmp_path / "d" / "train-{000000..000002}.tar")) == paths
    assert list_shards([paths[2], str(tmp_path / "d" / "train-00000[01].tar")]) == [paths[2], *paths[:2]]
    assert list_shards(paths[1]) == [paths[1]]
    missing = str(tmp_path / "d" / "train-000007.tar")
    with pytest.raises(FileNotFoundError, match="train-000003"):
        list_shards(str(tmp_path / "d" / "train-{000000..000007}.tar"))
    with pytest.raises(FileNotFoundError, match="train-000007"):
        list_shards([paths[0], missing])
    with pytest.raises(FileNotFoundError, match="nomatch"):
        list_shards(str(tmp_path / "d" / "nomatch-*.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="meta.json"):
        list_shards(str(tmp_path / "empty"))
    os.remove(paths[1])
    with pytest.raises(FileNotFoundError, match="train-000001"):
        list_shards(str(tmp_path / "d"))


def test_truncated_tar_yields_complete_samples_then_raises(tmp_path):
    _numbered_set(tmp_path, 4, per_shard=4)
    raw = (tmp_path / "train-000000.tar").read_bytes()
    members = tarfile.open(tmp_path / "train-000000.tar").getmembers()
    # Cut inside the data of sample 2's first file: samples 0 and 1 come out, the cut sample does not.
    # Cut exactly between members: tarfile cannot tell, so the last sample comes out with the files it has.
    for cut, keys_out, last_files in (
        (members[4].offset_data + 10, 2, {"img0.png", "json"}),
        (members[6].offset, 3, {"img0.png", "json"}),
        (members[5].offset, 3, {"img0.png"}),
    ):
        (tmp_path / "cut.tar").write_bytes(raw[:cut])
        samples = []
        with pytest.raises(TruncatedShardError):
            for sample in iter_shard_samples(str(tmp_path / "cut.tar")):
                samples.append(sample)
        assert [s["__key__"] for s in samples] == [f"k{i:05d}" for i in range(keys_out)]
        assert {k for k in samples[-1] if not k.startswith("__")} == last_files


# ---- collate -------------------------------------------------------------------------------------


def test_collate_pads_right_and_concatenates_images():
    samples = [
        {
            "input_ids": [5, 6, 7],
            "labels": [IGNORE_INDEX, 6, 7],
            "pixel_values": torch.ones(8, 1176),
            "image_grid_thw": torch.tensor([[1, 2, 4]]),
        },
        {
            "input_ids": [9],
            "labels": [9],
            "pixel_values": torch.zeros(0, 1176),
            "image_grid_thw": torch.zeros(0, 3, dtype=torch.long),
        },
        {
            "input_ids": [1, 2],
            "labels": [1, 2],
            "pixel_values": torch.full((4, 1176), 2.0),
            "image_grid_thw": torch.tensor([[1, 2, 2]]),
        },
    ]
    batch = collate_image_text(samples, pad_token_id=3, faults={"corrupt_image": 1})
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 3, 3], [1, 2, 3]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, 6, 7],
        [9, IGNORE_INDEX, IGNORE_INDEX],
        [1, 2, IGNORE_INDEX],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch["pixel_values"].shape == (12, 1176) and batch["pixel_values"][8:].eq(2).all()
    assert batch["image_grid_thw"].tolist() == [[1, 2, 4], [1, 2, 2]]
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["faults"] == {"corrupt_image": 1}
    text_only = collate_image_text(samples[1:2], pad_token_id=3)
    assert text_only["pixel_values"].shape == (0, 1176) and text_only["image_grid_thw"].shape == (0, 3)


def test_text_only_and_multi_image_samples(tmp_path, tokenizer, processor):
    with ShardWriter(tmp_path) as writer:
        write_image_text_sample(
            writer, "a", [], [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yes"}], id="a"
        )
        write_image_text_sample(writer, "b", [_image(1), _image(2)], _conversation("two", 2), id="b")
    dm = _module(
        tokenizer, processor, str(tmp_path), template="qwen_2_5", val=str(tmp_path), val_batch_size=2
    )
    (batch,) = list(dm.val_dataloader())
    assert batch["pixel_values"].shape == (2 * 16, processor.row_size)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    image_tokens = (batch["input_ids"] == tokenizer.image_token_id).sum(dim=1).tolist()
    assert image_tokens == [0, 8]
    assert not (batch["labels"] == tokenizer.image_token_id).any()


# ---- the streaming DataModule --------------------------------------------------------------------


@pytest.mark.parametrize("num_shards", [8, 2], ids=["shards-per-slot", "shared-shards"])
def test_ranks_get_equal_disjoint_covering_batches(tmp_path, tokenizer, processor, num_shards):
    captions = _numbered_set(tmp_path, 32, per_shard=32 // num_shards)
    per_rank = {}
    for rank in range(2):
        dm = _module(tokenizer, processor, str(tmp_path), num_workers=2, rank=rank, world_size=2)
        loader = dm.train_dataloader()
        assert len(loader) == dm.num_batches() == 32 // (2 * 2)
        batches = list(loader)
        assert len(batches) == len(loader)
        per_rank[rank] = [c for b in batches for c in _captions(b, tokenizer)]
        # The real workers produced exactly what each (rank, worker) slot stream gives.
        slots = [
            [c for b in loader.dataset.iter_worker(w, 2) for c in _captions(b, tokenizer)] for w in range(2)
        ]
        assert Counter(per_rank[rank]) == Counter(slots[0] + slots[1])
        assert not set(slots[0]) & set(slots[1])
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(captions)


def test_uneven_shards_wrap_around_within_slot(tmp_path, tokenizer, processor):
    # 3 shards of 10, 2 and 2 samples for 2 slots: one slot runs dry and repeats its own samples.
    captions = _numbered_set(tmp_path / "a", 10, per_shard=10)
    captions += _numbered_set(tmp_path / "b", 4, per_shard=2, start=10)
    shards = list_shards([str(tmp_path / "a"), str(tmp_path / "b")])
    dm = _module(tokenizer, processor, shards, batch_size=2, num_workers=2)
    assert dm.num_batches() == 7
    stream = dm.train_dataloader().dataset
    got = [[c for b in stream.iter_worker(w, 2) for c in _captions(b, tokenizer)] for w in range(2)]
    assert [len(g) for g in got] == [8, 6]  # 4 + 3 batches of 2
    assert not set(got[0]) & set(got[1])
    assert set(got[0]) | set(got[1]) <= set(captions)
    assert max(Counter(got[0] + got[1]).values()) > 1  # somebody wrapped around


def test_order_is_deterministic_and_changes_with_epoch(tmp_path, tokenizer, processor):
    _numbered_set(tmp_path, 24, per_shard=4)

    def order(epoch, seed=0):
        dm = _module(tokenizer, processor, str(tmp_path), num_workers=2, seed=seed, shuffle_buffer=6)
        dm.set_epoch(epoch)
        return [c for b in dm.train_dataloader() for c in _captions(b, tokenizer)]

    first = order(0)
    assert order(0) == first
    assert order(1) != first and sorted(order(1)) == sorted(first)
    assert order(0, seed=1) != first


def _faulty_set(directory, tokenizer) -> int:
    """Shards with one of each fault; returns the number of good samples."""
    good = 0
    with ShardWriter(directory, max_samples_per_shard=5) as writer:
        for i in range(10):
            if i == 2:
                write_image_text_sample(
                    writer, f"k{i}", [(b"not an image", "png")], _conversation("bad"), id=str(i)
                )
            elif i == 4:
                writer.write(f"k{i}", {"img0.png": b"no json beside me"})
            elif i == 6:
                record = {"id": str(i), "conversations": "not a list", "num_images": 0}
                writer.write(f"k{i}", {"json": json.dumps(record).encode()})
            elif i == 8:
                write_image_text_sample(writer, f"k{i}", [_image(i)], _conversation("long " * 80), id=str(i))
            else:
                write_image_text_sample(writer, f"k{i}", [_image(i)], _conversation(f"sample {i}"), id=str(i))
                good += 1
    # A third shard truncated after its first two samples.
    _numbered_set(os.path.join(directory, "extra"), 5, per_shard=5, start=100)
    raw = open(os.path.join(directory, "extra", "train-000000.tar"), "rb").read()
    members = tarfile.open(os.path.join(directory, "extra", "train-000000.tar")).getmembers()
    with open(os.path.join(directory, "cut-000000.tar"), "wb") as f:
        f.write(raw[: members[4].offset_data + 7])
    shutil.rmtree(os.path.join(directory, "extra"))
    meta = read_meta(directory)
    meta["shards"].append({"name": "cut-000000.tar", "num_samples": 5})
    meta["num_samples"] += 5
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f)
    return good + 2


def test_faults_are_skipped_counted_and_the_run_continues(tmp_path, tokenizer, processor, caplog):
    good = _faulty_set(str(tmp_path), tokenizer)
    dm = _module(
        tokenizer,
        processor,
        str(tmp_path),
        val=str(tmp_path),
        num_workers=2,
        max_length=64,
        fault_min_samples=1000,
    )
    tally = FaultTally()
    batches = list(dm.val_dataloader())
    for batch in batches:
        assert set(batch["faults"]) == set(FAULT_KINDS)
        tally.add(batch["faults"])
    assert tally.as_dict() == {
        "truncated_tar": 1,
        "corrupt_image": 1,
        "missing_key": 1,
        "bad_record": 1,
        "too_long": 1,
    }
    assert "truncated_tar=1" in tally.summary()
    assert sum(len(b["input_ids"]) for b in batches) == good
    # Warnings name shard, key and reason (read in this process: worker processes log on their own).
    with caplog.at_level(logging.WARNING):
        list(dm.val_dataloader().dataset.iter_worker(0, 1))
    messages = [r.getMessage() for r in caplog.records]
    assert any("cut-000000.tar" in m and "truncated_tar" in m for m in messages)
    assert any("train-000000.tar" in m and "k2" in m and "corrupt_image" in m for m in messages)
    # Training keeps producing full batches past the bad samples, wrapping around where a worker runs dry.
    train = list(dm.train_dataloader())
    assert len(train) == dm.num_batches() == 15 // 2 and all(len(b["input_ids"]) == 2 for b in train)


def test_a_complete_shard_short_of_its_meta_count_is_a_counted_fault(tmp_path, tokenizer, processor, caplog):
    captions = _numbered_set(tmp_path, 10, per_shard=5)
    # Rewrite the second shard as a well-formed tar that lacks its last two samples; meta.json still says 5.
    path = tmp_path / "train-000001.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    kept = [(m, data) for m, data in members if int(m.name.split(".")[0][1:]) < 8]
    with tarfile.open(path, "w") as tar:
        for member, data in kept:
            tar.addfile(member, io.BytesIO(data))
    dm = _module(tokenizer, processor, str(tmp_path), fault_min_samples=1000)
    tally = FaultTally()
    seen = []
    with caplog.at_level(logging.WARNING):
        for batch in dm.train_dataloader():
            tally.add(batch["faults"])
            seen += _captions(batch, tokenizer)
    assert tally.as_dict()["truncated_tar"] == 1
    # The epoch keeps its length (from meta.json), wrapping around for the two missing samples.
    assert set(seen) == set(captions[:8]) and len(seen) == 10
    assert any("train-000001.tar" in r.getMessage() and "meta.json entry says 5" in r.getMessage()
               for r in caplog.records)


def test_too_many_faults_raise_naming_the_shard(tmp_path, tokenizer, processor):
    with ShardWriter(tmp_path, max_samples_per_shard=100) as writer:
        for i in range(12):
            image = (b"garbage", "png") if i % 2 else _image(i)
            write_image_text_sample(writer, f"k{i}", [image], _conversation(f"sample {i}"), id=str(i))
    dm = _module(
        tokenizer, processor, str(tmp_path), num_workers=0, max_fault_fraction=0.2, fault_min_samples=6
    )
    with pytest.raises(RuntimeError, match="train-000000.tar"):
        list(dm.train_dataloader())


def test_fault_counter_take_and_limits():
    counter = FaultCounter(max_fault_fraction=0.5, min_samples=2)
    counter.seen(2)
    counter.record("too_long", "s.tar", "k", "long")
    assert counter.take()["too_long"] == 1 and counter.take()["too_long"] == 0
    counter.check("s.tar")
    counter.record("truncated_tar", "s.tar", None, "cut")  # shard-level: not a skipped sample
    counter.check("s.tar")
    counter.record("bad_record", "s.tar", "k2", "bad")
    with pytest.raises(RuntimeError, match="s.tar"):
        counter.check("s.tar")
    with pytest.raises(ValueError, match="unknown fault kind"):
        counter.record("nope", "s.tar", "k", "x")


def test_stream_rejects_missing_meta_counts(tmp_path, tokenizer, processor):
    _numbered_set(tmp_path, 4, per_shard=2)
    os.remove(tmp_path / "meta.json")
    with pytest.raises(ValueError, match="meta.json"):
        _module(tokenizer, processor, str(tmp_path / "train-*.tar"))
    with pytest.raises(ValueError, match="rank"):
        ImageTextStream(
            ["x.tar"],
            tokenizer=tokenizer,
            image_processor=processor,
            template="plain",
            batch_size=1,
            train=True,
            num_batches=1,
            rank=2,
            world_size=2,
        )


def test_prepare_data_generates_missing_train_set(tmp_path, tokenizer, processor):
    calls = []

    def generate():
        calls.append(1)
        generate_captions(tmp_path, num_train=8, num_val=2, image_size=IMAGE_SIDE, samples_per_shard=4)

    dm = ImageTextDataModule(
        train=str(tmp_path / "train"),
        tokenizer=tokenizer,
        image_processor=processor,
        batch_size=2,
        num_workers=0,
        generate=generate,
    )
    dm.prepare_data()
    dm.prepare_data()
    dm.setup()
    assert calls == [1] and dm.num_train_samples == 8 and len(list(dm.train_dataloader())) == 4


# ---- converter -----------------------------------------------------------------------------------


def test_llava_converter(tmp_path, tokenizer, processor, caplog):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    _image(1).save(images / "a.jpg", quality=90)
    _image(2).save(images / "sub" / "b.png")
    _image(3).save(images / "c.gif")
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    records = [
        {"id": "one", "image": "a.jpg", "conversations": _conversation("first"), "source": "x"},
        {"id": "two", "image": ["sub/b.png", "c.gif"], "conversations": _conversation("second", 2)},
        {
            "id": "text",
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
        },
        {"id": "gone", "image": "missing.jpg", "conversations": _conversation("x")},
        {"id": "mismatch", "image": "a.jpg", "conversations": _conversation("x", 2)},
        {"id": "broken", "image": "broken.jpg", "conversations": _conversation("x")},
        {"id": "empty", "image": "a.jpg"},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    out = tmp_path / "shards"
    with caplog.at_level(logging.INFO):
        code = convert_main(
            [
                "llava",
                "--json",
                str(tmp_path / "data.json"),
                "--images",
                str(images),
                "--out",
                str(out),
                "--samples-per-shard",
                "2",
            ]
        )
    assert code == 0
    messages = [r.getMessage() for r in caplog.records]
    for record_id, kind in (
        ("gone", "missing_image"),
        ("mismatch", "placeholder_mismatch"),
        ("broken", "unreadable_image"),
        ("empty", "missing_conversations"),
    ):
        assert any(f"id {record_id})" in m and kind in m and "data.json" in m for m in messages), kind
    assert any("converted 3 of 7 records" in m for m in messages)
    assert read_meta(out)["num_samples"] == 3
    samples = [s for p in list_shards(str(out)) for s in iter_shard_samples(p)]
    assert samples[0]["img0.jpg"] == (images / "a.jpg").read_bytes()
    assert samples[1]["img0.png"] == (images / "sub" / "b.png").read_bytes()
    assert Image.open(io.BytesIO(samples[1]["img1.png"])).format == "PNG"
    assert json.loads(samples[0]["json"])["source"] == "x"
    dm = _module(tokenizer, processor, str(out), template="qwen_2_5", val=str(out), val_batch_size=3)
    (batch,) = list(dm.val_dataloader())
    assert len(batch["input_ids"]) == 3 and batch["image_grid_thw"].shape == (3, 3)
    assert sum(batch["faults"].values()) == 0

    (tmp_path / "bad.jsonl").write_text(json.dumps(records[3]) + "\n{not json\n")
    assert (
        convert_main(
            [
                "llava",
                "--json",
                str(tmp_path / "bad.jsonl"),
                "--images",
                str(images),
                "--out",
                str(tmp_path / "none"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "none" / "meta.json").exists()


# ---- synthetic captions --------------------------------------------------------------------------


def test_synthetic_captions_deterministic_cached_and_answerable(tmp_path):
    first = generate_captions(
        tmp_path / "a", num_train=24, num_val=6, image_size=112, seed=3, samples_per_shard=10
    )
    assert first["cached"] is False
    assert (
        synthetic_main(
            [
                "captions",
                "--out",
                str(tmp_path / "b"),
                "--train",
                "24",
                "--val",
                "6",
                "--seed",
                "3",
                "--image-size",
                "112",
                "--samples-per-shard",
                "10",
            ]
        )
        == 0
    )
    for split in ("train", "val"):
        for path_a, path_b in zip(
            list_shards(first[split]), list_shards(str(tmp_path / "b" / split)), strict=True
        ):
            assert open(path_a, "rb").read() == open(path_b, "rb").read()
    mtime = os.path.getmtime(os.path.join(first["train"], "meta.json"))
    assert (
        generate_captions(
            tmp_path / "a", num_train=24, num_val=6, image_size=112, seed=3, samples_per_shard=10
        )["cached"]
        is True
    )
    assert os.path.getmtime(os.path.join(first["train"], "meta.json")) == mtime
    other_seed = generate_captions(
        tmp_path / "c", num_train=24, num_val=6, image_size=112, seed=4, samples_per_shard=10
    )
    assert (
        open(list_shards(other_seed["train"])[0], "rb").read()
        != open(list_shards(first["train"])[0], "rb").read()
    )

    vocabulary = set(" ".join(tiny_corpus()).lower().replace(".", " ").replace("?", " ").split())
    palette = np.array(list(COLOURS.values()), dtype=float)
    seen = Counter()
    for path in list_shards(first["train"]) + list_shards(first["val"]):
        for sample in iter_shard_samples(path):
            record = json.loads(sample["json"])
            caption = record["conversations"][1]["value"]
            assert caption == caption_text(record["colour"], record["shape"], record["position"])
            assert set(caption.split()) <= vocabulary
            image = np.asarray(Image.open(io.BytesIO(sample["img0.png"])).convert("RGB"), dtype=float)
            x, y = record["center"]
            nearest = list(COLOURS)[int(np.argmin(((palette - image[y, x]) ** 2).sum(axis=1)))]
            assert nearest == caption.split()[1]
            assert ("bottom" if y >= 56 else "top") in caption and ("right" if x >= 56 else "left") in caption
            # The shape is the only place with that colour: the corner opposite to it is background.
            assert np.abs(image[111 - y, 111 - x] - palette[list(COLOURS).index(nearest)]).max() > 40
            seen[record["colour"]] += 1
    assert len(seen) >= 4


def test_synthetic_vqa_answers_match_the_image(tmp_path, tokenizer, processor):
    result = generate_vqa(
        tmp_path, num_train=12, num_val=0, image_size=IMAGE_SIDE, seed=0, samples_per_shard=6
    )
    palette = np.array(list(COLOURS.values()), dtype=float)
    for path in list_shards(result["train"]):
        for sample in iter_shard_samples(path):
            record = json.loads(sample["json"])
            image = np.asarray(Image.open(io.BytesIO(sample["img0.png"])).convert("RGB"), dtype=float)
            by_position = {o["position"]: o for o in record["objects"]}
            for obj in record["objects"]:
                x, y = obj["center"]
                assert (
                    list(COLOURS)[int(np.argmin(((palette - image[y, x]) ** 2).sum(axis=1)))] == obj["colour"]
                )
            turns = record["conversations"]
            assert len(turns) == 2 and turns[0]["value"].startswith("<image>\n")
            assert question_type(turns[0]["value"]) == record["question_type"]
            for question, answer in zip(turns[0::2], turns[1::2], strict=True):
                q, a = question["value"].removeprefix("<image>\n"), answer["value"]
                if q.startswith("How many"):
                    assert a == ["zero", "one", "two", "three"][len(record["objects"])]
                elif q.startswith("What colour is the shape at the "):
                    assert by_position[q.removeprefix("What colour is the shape at the ")[:-1]]["colour"] == a
                elif q.startswith("What shape is at the "):
                    # Nouns keep their article (see synthetic._question).
                    assert "a " + by_position[q.removeprefix("What shape is at the ")[:-1]]["shape"] == a
                else:
                    colour, shape = q.removeprefix("Where is the ")[:-1].split()
                    where = by_position[a.removeprefix("the ")]
                    assert (where["colour"], where["shape"]) == (colour, shape)
    dm = _module(
        tokenizer, processor, result["train"], template="qwen_2_5", val=result["train"], val_batch_size=12
    )
    (batch,) = list(dm.val_dataloader())
    assert batch["input_ids"].shape[0] == 12 and sum(batch["faults"].values()) == 0


def test_length_grouping_batches_neighbours() -> None:
    from data_modules.image_text import _group_by_length

    rng_lengths = np.random.default_rng(0).integers(5, 100, size=64)
    samples = [{"input_ids": [0] * int(n)} for n in rng_lengths]
    plain = list(_group_by_length(iter(samples), 4, 0, np.random.default_rng(1)))
    grouped = list(_group_by_length(iter(samples), 4, 8, np.random.default_rng(1)))

    def padding(batches):
        return sum(
            max(len(s["input_ids"]) for s in b) * len(b) - sum(len(s["input_ids"]) for s in b)
            for b in batches
        )

    assert [len(b) for b in grouped] == [4] * 16
    assert sorted(len(s["input_ids"]) for b in grouped for s in b) == sorted(int(n) for n in rng_lengths)
    assert padding(grouped) < 0.5 * padding(plain)
    again = list(_group_by_length(iter(samples), 4, 8, np.random.default_rng(1)))
    assert [[len(s["input_ids"]) for s in b] for b in again] == [
        [len(s["input_ids"]) for s in b] for b in grouped
    ]


def test_vqa_blank_keeps_the_conversation_and_chance_is_the_majority_answer(tmp_path) -> None:
    from data_modules.synthetic import generate_vqa_blank, graded_answers, score_by_question_type

    vqa = generate_vqa(tmp_path / "vqa", num_train=40, num_val=0, image_size=IMAGE_SIDE, samples_per_shard=20)
    blank = generate_vqa_blank(tmp_path / "blank", num_train=40, num_val=0, image_size=IMAGE_SIDE,
                               samples_per_shard=20)
    pairs = graded_answers(vqa["train"])
    assert pairs == graded_answers(blank["train"]) and len(pairs) == 40
    for path in list_shards(blank["train"]):
        for sample in iter_shard_samples(path):
            image = np.asarray(Image.open(io.BytesIO(sample["img0.png"])))
            assert image.min() == image.max()
    # A report that always gives the most frequent answer of each type scores exactly chance.
    answers: dict[str, Counter] = {}
    for question, answer in pairs:
        answers.setdefault(question_type(question), Counter())[answer] += 1
    majority = {kind: counts.most_common(1)[0][0] for kind, counts in answers.items()}
    samples = [{"question": q, "answer": a, "exact_match": a == majority[question_type(q)]} for q, a in pairs]
    rows = score_by_question_type({"samples": samples}, vqa["train"])
    assert set(rows) == set(answers) | {"all"}
    for kind, row in rows.items():
        assert row["exact_match"] == pytest.approx(row["chance"]), kind
        assert row["n"] == (len(pairs) if kind == "all" else sum(answers[kind].values()))
        assert row["chance"] <= row["best_constant"] <= 1
    assert 0 < rows["all"]["chance"] < 1
    # Scored on the training pairs themselves, the training majority is the best constant answer.
    assert rows["all"]["best_constant"] == pytest.approx(rows["all"]["chance"])
