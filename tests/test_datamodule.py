"""Tests of the chat template, image decoding, collation and the training/evaluation DataModules."""

from __future__ import annotations

import io
import json
import pickle
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from clustering import split_dataset
from clustering.shards import MANIFEST, RollingShardWriter, write_json_atomic
from datamodules.chat import IGNORE_INDEX, ConversationEncoder, SampleTooLong
from datamodules.evaluation import EvalDataModule
from datamodules.images import decode_rgb
from datamodules.sources import DatasetEntry
from datamodules.splits import SplitSource, load_processor
from datamodules.synthetic import make_conversation, write_synthetic_dataset
from datamodules.training import ExpertDataModule, WeightedResampledShards

torch.set_num_threads(1)

IMAGE_TOKENS = 16  # image_seq_length of the internvl-tiny preset: (64 / 8)^2 * 0.5^2


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lightning_modules.presets import build_small_processor

    rng = np.random.default_rng(0)
    texts = [turn["value"] for _ in range(200) for turn in make_conversation(rng, 3)]
    directory = tmp_path_factory.mktemp("processor")
    build_small_processor(texts, directory, vocab_size=400)
    return directory


@pytest.fixture(scope="module")
def processor(processor_dir: Path):
    return load_processor(processor_dir)


def _split(data, output_dir: Path, *extra: str) -> dict:
    return split_dataset.main(data.split_arguments(output_dir, *extra))


CONVERSATION = [
    {"from": "human", "value": "<image>\nwhat color is the circle?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "is there a blue square?"},
    {"from": "gpt", "value": "no"},
]


# -- chat template -------------------------------------------------------------------------------


def test_labels_only_on_assistant_tokens(processor) -> None:
    encoder = ConversationEncoder(processor, max_length=512, system_message="Answer briefly.")
    tokenizer = processor.tokenizer

    encoded = encoder.encode_text(CONVERSATION, tiles=[1])

    text = tokenizer.decode(encoded.input_ids)
    image = "<img>" + "<IMG_CONTEXT>" * IMAGE_TOKENS + "</img>"
    assert text == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        f"<|im_start|>user\n{image}\nwhat color is the circle?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
        "<|im_start|>user\nis there a blue square?<|im_end|>\n"
        "<|im_start|>assistant\nno<|im_end|>\n"
    )
    supervised = encoded.labels != IGNORE_INDEX
    assert tokenizer.decode(encoded.input_ids[supervised]) == "red<|im_end|>no<|im_end|>"
    assert torch.equal(encoded.labels[supervised], encoded.input_ids[supervised])
    # Two separate spans: the labels are not one run from the first answer to the end.
    starts = (supervised[1:] & ~supervised[:-1]).sum().item()
    assert starts == 2
    context_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert (encoded.input_ids == context_id).sum().item() == IMAGE_TOKENS
    assert tokenizer.decode(encoded.prompt_ids).endswith(
        "is there a blue square?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not encoded.truncated


def test_prompt_matches_transformers_processor(processor) -> None:
    """Our image-token expansion equals InternVLProcessor's for the same prompt and image."""
    encoder = ConversationEncoder(processor, max_length=512)
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    pixel_values, tiles = encoder.encode_images([image])

    encoded = encoder.encode_text(CONVERSATION[:2], tiles)

    prompt = "<|im_start|>user\n<IMG_CONTEXT>\nwhat color is the circle?<|im_end|>\n<|im_start|>assistant\n"
    reference = processor(text=[prompt], images=[image], return_tensors="pt")
    assert encoded.prompt_ids.tolist() == reference["input_ids"][0].tolist()
    assert torch.allclose(pixel_values, reference["pixel_values"])
    assert pixel_values.shape == (1, 3, 64, 64)


def test_over_long_sample_cut_only_after_images(processor) -> None:
    full = ConversationEncoder(processor, max_length=512).encode_text(CONVERSATION, [1])
    image_end = full.input_ids.tolist().index(processor.tokenizer.convert_tokens_to_ids("</img>")) + 1
    first_answer = int((full.labels != IGNORE_INDEX).nonzero()[0])

    with pytest.raises(SampleTooLong, match="image tokens end at"):
        ConversationEncoder(processor, max_length=image_end - 1).encode_text(CONVERSATION, [1])
    with pytest.raises(SampleTooLong, match="before the first answer token"):
        ConversationEncoder(processor, max_length=first_answer).encode_text(CONVERSATION, [1])

    cut = ConversationEncoder(processor, max_length=first_answer + 1).encode_text(CONVERSATION, [1])
    assert cut.truncated
    assert len(cut.input_ids) == first_answer + 1
    assert (cut.labels != IGNORE_INDEX).sum().item() == 1


def test_placeholder_count_mismatch_raises(processor) -> None:
    encoder = ConversationEncoder(processor, max_length=512)
    with pytest.raises(ValueError, match="1 image placeholders after tokenization but 2 images"):
        encoder.encode_text(CONVERSATION, [1, 1])


# -- images --------------------------------------------------------------------------------------


def _encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("mode", "format"),
    [
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("L", "PNG"),
        ("1", "PNG"),
        ("I;16", "PNG"),
        ("CMYK", "JPEG"),
        ("RGB", "WEBP"),
    ],
)
def test_image_modes_arrive_as_rgb(mode: str, format: str) -> None:
    image = decode_rgb(_encode(Image.new(mode, (6, 4)), format))
    assert image.mode == "RGB"
    assert image.size == (6, 4)


def test_transparency_composited_on_white() -> None:
    transparent = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([0, 0, 0] * 256)
    assert decode_rgb(_encode(transparent, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    assert decode_rgb(_encode(palette, "PNG", transparency=0)).getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_applied() -> None:
    image = Image.new("RGB", (8, 4), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display.
    decoded = decode_rgb(_encode(image, "JPEG", exif=exif))
    assert decoded.size == (4, 8)


def test_truncated_png_raises() -> None:
    data = _encode(Image.new("RGB", (32, 32), (1, 2, 3)), "PNG")
    with pytest.raises(OSError):
        decode_rgb(data[: len(data) // 2])


# -- training DataModule ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train")
    data = write_synthetic_dataset(root / "data", n_records=24, n_experts=2)
    _split(data, root / "split", "--shard-max-count", "3")
    return root / "split"


def _module(split: Path, processor_dir: Path, **kwargs) -> ExpertDataModule:
    options = {"batch_size": 2, "num_workers": 0, "max_length": 256, "shuffle_buffer": 4}
    options.update(kwargs)
    module = ExpertDataModule(train_dir=str(split), processor=str(processor_dir), **options)
    module.prepare_data()
    module.setup("fit")
    return module


def test_training_batches_follow_the_format(train_split: Path, processor_dir: Path) -> None:
    module = _module(train_split, processor_dir, expert=1)

    batches = list(module.train_dataloader())

    assert len(batches) == 6  # 12 samples of expert 1, 2 per batch
    for batch in batches:
        assert sorted(batch) == ["attention_mask", "input_ids", "labels", "pixel_values"]
        assert batch["pixel_values"].shape == (2, 3, 64, 64)
        assert batch["pixel_values"].dtype == torch.float32
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
        assert batch["input_ids"].dtype == torch.long
        padding = batch["attention_mask"] == 0
        assert (batch["labels"][padding] == IGNORE_INDEX).all()
        assert (batch["input_ids"][padding] == module.processor.tokenizer.pad_token_id).all()
        assert (batch["labels"] != IGNORE_INDEX).any(dim=1).all()
    assert module.sample_share() == pytest.approx(0.5)
    assert module.skip_counts == {}


def test_expert_reads_only_its_own_shards(train_split: Path, processor_dir: Path) -> None:
    module = _module(train_split, processor_dir, expert=0)
    manifest = json.loads((train_split / MANIFEST).read_text())

    assert [shard["path"] for shard in module.selected_shards()] == [
        shard["path"] for shard in manifest["experts"][0]["shards"]
    ]
    dense = _module(train_split, processor_dir, expert=None)
    assert len(dense.selected_shards()) == 8
    assert dense.epoch_samples() == 24
    assert dense.sample_share() == 1.0


def _count_batches(
    module: ExpertDataModule, rank: int, world_size: int, workers: int
) -> tuple[int, int, list[str]]:
    pipeline = module.build_train_pipeline(rank, world_size)
    loader = DataLoader(pipeline, batch_size=None, num_workers=workers)
    batches = list(loader)
    return len(batches), len(pipeline), [str(len(b["input_ids"])) for b in batches]


@pytest.mark.parametrize("shard_max_count", ["1", "5"])
def test_two_ranks_get_equal_batch_counts(tmp_path: Path, processor_dir: Path, shard_max_count: str) -> None:
    """Equal counts with more shards than rank x worker slots (12) and with fewer (3)."""
    data = write_synthetic_dataset(tmp_path / "data", n_records=13, n_experts=1)
    _split(data, tmp_path / "split", "--shard-max-count", shard_max_count)
    module = _module(tmp_path / "split", processor_dir, expert=0, num_workers=2, batch_size=2)

    counts = [_count_batches(module, rank, world_size=2, workers=2) for rank in (0, 1)]

    # 13 samples over 2 ranks of batch 2 is ceil(3.25) = 4 batches, rounded up to 2 workers.
    assert counts[0][0] == counts[1][0] == 4
    assert counts[0][1] == counts[1][1] == module.batches_per_rank(world_size=2) == 4


def test_shards_split_by_rank_and_worker() -> None:
    urls = [f"shard-{i}" for i in range(8)]
    sampler = lambda rank: WeightedResampledShards(urls, [1.0] * 8, seed=0, rank=rank, world_size=2)  # noqa: E731

    slots = [sampler(rank).slot_shards(worker, 2)[0] for rank in (0, 1) for worker in (0, 1)]

    assert sorted(url for slot in slots for url in slot) == urls
    assert all(len(slot) == 2 for slot in slots)
    few = WeightedResampledShards(urls[:3], [1.0] * 3, seed=0, rank=1, world_size=2)
    assert few.slot_shards(0, 2)[0] == urls[:3]


def test_repeat_time_weights_sampling(tmp_path: Path) -> None:
    rows = []
    for name, repeat_time in (("alpha", 1.0), ("beta", 3.0)):
        rows += [
            {"path": f"{name}-{i}.tar", "samples": 10, "dataset": name, "repeat_time": repeat_time}
            for i in range(2)
        ]
    sampler = WeightedResampledShards(
        [row["path"] for row in rows],
        [row["samples"] * row["repeat_time"] for row in rows],
        seed=3,
        rank=0,
        world_size=1,
    )
    stream = iter(sampler)

    counts = Counter(next(stream)["url"].split("-")[0] for _ in range(8000))

    assert counts["beta"] / counts["alpha"] == pytest.approx(3.0, rel=0.1)


def _write_shard_split(directory: Path, samples: list[dict], n_experts: int = 1) -> None:
    writer = RollingShardWriter(directory, 0, max_count=100, max_size=1 << 30)
    dataset = DatasetEntry("handmade", Path("handmade.jsonl"), directory)
    for sample in samples:
        writer.write(sample, dataset)
    writer.close()
    manifest = {
        "n_experts": n_experts,
        "experts": [
            {
                "expert": 0,
                "samples": len(samples),
                "images": len(samples),
                "tokens_estimate": 0,
                "shards": [vars(shard) for shard in writer.shards],
            }
        ],
    }
    write_json_atomic(manifest, directory / MANIFEST)


def _handmade_sample(index: int, image_bytes: bytes, conversation: list[dict]) -> dict:
    meta = {
        "id": str(index),
        "conversations": conversation,
        "images": ["0.png"],
        "source": "handmade.jsonl",
        "line": index + 1,
        "dataset": "handmade",
        "repeat_time": 1.0,
        "expert": 0,
        "route_similarity": 1.0,
        "route_scores": [1.0],
    }
    return {"__key__": f"{index:09d}", "0.png": image_bytes, "json": json.dumps(meta).encode()}


def test_unreadable_and_over_long_samples_skipped_and_counted(
    tmp_path: Path, processor_dir: Path, caplog
) -> None:
    good = _encode(Image.new("RGB", (64, 64), (0, 128, 0)), "PNG")
    truncated = good[: len(good) // 2]
    long_conversation = [
        {"from": "human", "value": "<image>\n" + "why? " * 300},
        {"from": "gpt", "value": "because"},
    ]
    samples = [
        _handmade_sample(0, good, CONVERSATION),
        _handmade_sample(1, truncated, CONVERSATION),
        _handmade_sample(2, good, long_conversation),
        _handmade_sample(3, good, CONVERSATION),
    ]
    _write_shard_split(tmp_path / "split", samples)
    module = _module(
        tmp_path / "split",
        processor_dir,
        expert=0,
        batch_size=1,
        max_length=128,
        samples_per_epoch=20,
        shuffle_buffer=1,
    )

    with caplog.at_level("WARNING", logger="datamodules.collate"):
        batches = list(module.train_dataloader())

    assert len(batches) == 20
    counts = module.skip_counts
    assert set(counts) == {"unreadable image", "over max_length"}
    assert counts["unreadable image"] >= 1
    assert counts["over max_length"] >= 1
    # WebDataset's batcher reads one sample ahead, so the encoder may have seen one more.
    assert module.sample_encoder.skips.seen - (20 + sum(counts.values())) in (0, 1)
    # Warnings are rate-limited: one at each power of two of the running total.
    warnings = [r for r in caplog.records if "skipped a sample" in r.getMessage()]
    total = sum(counts.values())
    assert len(warnings) == int(np.floor(np.log2(total))) + 1
    assert (
        "handmade.jsonl line 2" in warnings[0].getMessage()
        or "handmade.jsonl line 3" in warnings[0].getMessage()
    )


def test_prepare_data_builds_split_and_processor(tmp_path: Path) -> None:
    data = write_synthetic_dataset(tmp_path / "data", n_records=8, n_experts=2)
    source = SplitSource(
        clustering_results_dir=str(data.clustering_dir),
        input_jsonl=str(data.jsonl),
        images_dir=str(data.images_dir),
        features=str(data.features),
        feature_keys=str(data.keys),
        shard_max_count=2,
    )
    split = tmp_path / "runs" / "split"
    split.mkdir(parents=True)
    (split / "expert-0").mkdir()  # an interrupted run: shards directory without a manifest
    processor_path = tmp_path / "runs" / "processor"

    module = ExpertDataModule(
        train_dir=str(split),
        processor=str(processor_path),
        expert=0,
        num_workers=0,
        batch_size=2,
        max_length=256,
        preset="internvl-tiny",
        train_source=source,
    )
    module.prepare_data()
    module.setup("fit")

    manifest = json.loads((split / MANIFEST).read_text())
    assert manifest["written"] == 8
    assert (processor_path / "tokenizer.json").is_file()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["processor", "split"]
    assert len(list(module.train_dataloader())) == 2
    module.prepare_data()  # a second call finds both and leaves them as they are
    assert json.loads((split / MANIFEST).read_text()) == manifest


def test_missing_split_without_source_raises(tmp_path: Path, processor_dir: Path) -> None:
    module = ExpertDataModule(train_dir=str(tmp_path / "nothing"), processor=str(processor_dir))
    with pytest.raises(FileNotFoundError, match="no source to build it from"):
        module.prepare_data()


def test_invalid_arguments_reported_together(processor_dir: Path) -> None:
    with pytest.raises(ValueError) as error:
        ExpertDataModule(
            train_dir="x", processor=str(processor_dir), batch_size=0, num_workers=-1, max_length=0
        )
    message = str(error.value)
    assert "batch_size must be >= 1, got 0" in message
    assert "num_workers must be >= 0, got -1" in message
    assert "max_length must be >= 1, got 0" in message


# -- evaluation DataModule -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    data = write_synthetic_dataset(root / "data", n_records=7, n_experts=2, max_turns=1)
    lines = [json.loads(line) for line in data.jsonl.read_text().splitlines()]
    lines[3]["conversations"][0]["value"] += " please answer with one word only"
    for index, record in enumerate(lines):
        record["question_id"] = f"q{index}"
        record["question"] = record["conversations"][0]["value"].replace("<image>\n", "")
        record["gt_answers"] = [record["conversations"][1]["value"], "alt"]
        record["benchmark"] = "synthetic"
        record["question_type"] = "color"
    data.jsonl.write_text("".join(json.dumps(record) + "\n" for record in lines))
    _split(data, root / "split", "--shard-max-count", "2")
    return root / "split"


def test_eval_batches_carry_questions_and_routes(eval_split: Path, processor_dir: Path) -> None:
    module = EvalDataModule(
        eval_dir=str(eval_split), processor=str(processor_dir), batch_size=4, num_workers=0, order="input"
    )
    module.prepare_data()
    module.setup("test")

    batches = list(module.test_dataloader())

    assert [len(batch["question_id"]) for batch in batches] == [4, 3]
    ids = [qid for batch in batches for qid in batch["question_id"]]
    assert ids == [f"q{i}" for i in range(7)]
    batch = batches[0]
    assert batch["expert"].tolist() == [0, 1, 0, 1]
    assert batch["route_scores"].shape == (4, 2)
    assert (batch["route_scores"].argmax(1) == batch["expert"]).all()
    assert batch["gt_answers"][0][1] == "alt"
    assert batch["benchmark"] == ["synthetic"] * 4
    assert batch["question_type"] == ["color"] * 4
    assert batch["pixel_values"].shape == (4, 3, 64, 64)
    prompts, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    assert prompts.shape == mask.shape
    # Left padding: every prompt ends in the last column with the assistant header.
    assert mask[:, -1].all()
    assert not mask[0, 0]  # question 0 is shorter than question 3, so it starts with padding
    tokenizer = module.processor.tokenizer
    for row in range(4):
        text = tokenizer.decode(prompts[row][mask[row].bool()])
        assert text.endswith(f"{batch['question'][row]}<|im_end|>\n<|im_start|>assistant\n")
        answer_ids = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        assert tokenizer.decode(answer_ids) == batch["gt_answers"][row][0] + "<|im_end|>"


def test_eval_expert_order_groups_routes(eval_split: Path, processor_dir: Path) -> None:
    module = EvalDataModule(eval_dir=str(eval_split), processor=str(processor_dir), batch_size=4, num_workers=0)
    module.setup("test")

    batches = list(module.test_dataloader())

    ids = [qid for batch in batches for qid in batch["question_id"]]
    routes = [expert for batch in batches for expert in batch["expert"].tolist()]
    # Expert 0's questions first, each expert's in input order; still every question once.
    assert ids == ["q0", "q2", "q4", "q6", "q1", "q3", "q5"]
    assert routes == [0, 0, 0, 0, 1, 1, 1]


def test_eval_rejects_unknown_order(eval_split: Path, processor_dir: Path) -> None:
    with pytest.raises(ValueError, match="order must be one of"):
        EvalDataModule(eval_dir=str(eval_split), processor=str(processor_dir), order="random")


def test_eval_selects_routed_experts(eval_split: Path, processor_dir: Path) -> None:
    module = EvalDataModule(
        eval_dir=str(eval_split), processor=str(processor_dir), experts=[1], num_workers=0
    )
    module.setup("validate")

    ids = [qid for batch in module.val_dataloader() for qid in batch["question_id"]]

    assert ids == ["q1", "q3", "q5"]


def test_eval_over_long_question_raises(eval_split: Path, processor_dir: Path) -> None:
    module = EvalDataModule(
        eval_dir=str(eval_split), processor=str(processor_dir), max_length=30, num_workers=0
    )
    module.setup("test")
    with pytest.raises(ValueError, match="Evaluation question q0 does not fit"):
        next(iter(module.test_dataloader()))


def test_training_module_validates_on_routed_questions(
    train_split: Path, eval_split: Path, processor_dir: Path
) -> None:
    module = _module(train_split, processor_dir, expert=0, val_dir=str(eval_split))
    ids = [qid for batch in module.val_dataloader() for qid in batch["question_id"]]
    assert ids == ["q0", "q2", "q4", "q6"]


def test_train_pipeline_pickles_for_spawned_workers(train_split: Path, processor_dir: Path) -> None:
    """DataLoader workers started with the spawn method receive the pipeline pickled."""
    module = _module(train_split, processor_dir, expert=0, num_workers=2)
    pipeline = module.build_train_pipeline(rank=1, world_size=2)

    restored = pickle.loads(pickle.dumps(pipeline))

    assert len(restored) == len(pipeline) == 4
    assert len(list(iter(restored))) == 2  # in the main process one "worker" yields its share


def test_world_comes_from_trainer(train_split: Path, processor_dir: Path) -> None:
    module = _module(train_split, processor_dir, expert=0, num_workers=1)
    module.trainer = SimpleNamespace(global_rank=1, world_size=3)

    assert module._world() == (1, 3)
    assert len(module.train_dataloader()) == module.batches_per_rank(world_size=3) == 2


def test_multi_image_sample_gets_tokens_per_image(processor) -> None:
    encoder = ConversationEncoder(processor, max_length=512)
    images = [Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("L", (32, 48), 128).convert("RGB")]
    conversation = [
        {"from": "human", "value": "<image>\n<image>\nsame colour?"},
        {"from": "gpt", "value": "no"},
    ]

    pixel_values, tiles = encoder.encode_images(images)
    encoded = encoder.encode_text(conversation, tiles)

    assert pixel_values.shape == (2, 3, 64, 64)
    assert tiles == [1, 1]
    tokenizer = processor.tokenizer
    ids = encoded.input_ids.tolist()
    assert ids.count(tokenizer.convert_tokens_to_ids("<img>")) == 2
    assert ids.count(tokenizer.convert_tokens_to_ids("</img>")) == 2
    assert ids.count(tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")) == 2 * IMAGE_TOKENS
    assert tokenizer.decode(encoded.input_ids[encoded.labels != IGNORE_INDEX]) == "no<|im_end|>"


def test_dynamic_tiles_expand_image_tokens(processor) -> None:
    encoder = ConversationEncoder(processor, max_length=2048, dynamic_tiles=True, max_tiles=4)
    wide = Image.new("RGB", (256, 64), (0, 0, 255))

    pixel_values, tiles = encoder.encode_images([wide])
    encoded = encoder.encode_text(CONVERSATION[:2], tiles)

    # A 4:1 image is cut into 4 tiles plus a thumbnail, as InternVL's dynamic resolution does.
    assert tiles == [5]
    assert pixel_values.shape == (5, 3, 64, 64)
    context_id = processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert (encoded.input_ids == context_id).sum().item() == 5 * IMAGE_TOKENS
