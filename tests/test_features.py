"""CLIP image features: encoder loading, embed_images, and extract_features.py end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clustering import extract_features
from clustering.features import embed_images, load_clip_image_encoder

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 250, 0), (0, 0, 0), (120, 60, 200)]


def _make_images(directory: Path) -> list[str]:
    """Write six small PNGs (one in a subfolder) and return their paths relative to ``directory``."""
    names = []
    for index, colour in enumerate(COLOURS):
        name = f"sub/img{index}.png" if index == 5 else f"img{index}.png"
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", (40 + index, 36), colour)
        image.paste((255, 255, 255), (index * 3, 5, index * 3 + 10, 20))
        image.save(path)
        names.append(name)
    return names


def _record(image: str | list[str] | None, line: int) -> str:
    record: dict = {
        "id": f"r{line}",
        "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
    }
    if image is not None:
        record["image"] = image
    return json.dumps(record)


@pytest.fixture
def jsonl_dataset(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    images_dir = tmp_path / "images"
    names = _make_images(images_dir)
    (images_dir / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines = [
        _record(names[0], 1),
        _record(names[1], 2),
        _record(names[0], 3),  # shares image 0 with line 1
        _record([names[2], names[3]], 4),
        _record(None, 5),  # text-only
        "{not json",
        _record("missing.png", 7),
        _record("corrupt.png", 8),
        _record(names[4], 9),
        _record(names[5], 10),
        _record(names[3], 11),
    ]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    expected_keys = [names[0], names[1], names[2], names[3], names[4], names[5]]
    return jsonl, images_dir, expected_keys


def test_encoder_loads_full_clip_dir(tiny_clip_dir: Path) -> None:
    from transformers import CLIPModel

    model, processor = load_clip_image_encoder(tiny_clip_dir, device="cpu")
    assert model.config.projection_dim == 16
    assert model.dtype == torch.float32

    images = [Image.new("RGB", (50, 40), colour) for colour in COLOURS[:3]]
    embeds = embed_images(model, processor, images, batch_size=2)
    assert embeds.shape == (3, 16)
    assert embeds.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeds, axis=1), 1.0, rtol=1e-5)

    full = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        output = full.get_image_features(pixel_values=pixel_values)
    reference = output if torch.is_tensor(output) else output.pooler_output
    reference = torch.nn.functional.normalize(reference, dim=-1).numpy()
    np.testing.assert_allclose(embeds, reference, atol=1e-5)


def test_encoder_loads_vision_only_dir(tiny_clip_dir: Path, tmp_path: Path) -> None:
    model, processor = load_clip_image_encoder(tiny_clip_dir, device="cpu")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded, _ = load_clip_image_encoder(tmp_path, device="cpu")
    image = [Image.new("RGB", (32, 32), (10, 200, 30))]
    np.testing.assert_allclose(
        embed_images(reloaded, processor, image), embed_images(model, processor, image), atol=1e-6
    )


def test_encoder_rejects_non_clip(tmp_path: Path, tiny_clip_dir: Path) -> None:
    from transformers import BertConfig, CLIPImageProcessor

    BertConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    ).save_pretrained(tmp_path)
    CLIPImageProcessor.from_pretrained(tiny_clip_dir).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="BertConfig checkpoint, not CLIP"):
        load_clip_image_encoder(tmp_path, device="cpu")
    with pytest.raises(FileNotFoundError, match="absent not found. HINT: pass an existing directory"):
        load_clip_image_encoder(tmp_path / "absent", device="cpu")


def test_extract_jsonl_unique_rows(tmp_path: Path, tiny_clip_dir: Path, jsonl_dataset) -> None:
    jsonl, images_dir, expected_keys = jsonl_dataset
    out = tmp_path / "features"
    args = ["--input-jsonl", str(jsonl), "--images-dir", str(images_dir), "--output-dir", str(out)]
    metadata = extract_features.main(
        [
            *args,
            "--clip-model",
            str(tiny_clip_dir),
            "--batch-size",
            "2",
            "--num-workers",
            "2",
            "--chunk-size",
            "3",
        ]
    )

    features = np.load(out / "features.npy")
    keys = (out / "keys.txt").read_text().splitlines()
    assert keys == expected_keys
    assert features.shape == (6, 16)
    assert features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)

    model, processor = load_clip_image_encoder(tiny_clip_dir, device="cpu")
    reference = embed_images(model, processor, [Image.open(images_dir / key).convert("RGB") for key in keys])
    np.testing.assert_allclose(features, reference, atol=1e-5)

    failed = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert sorted(item["key"] for item in failed) == ["corrupt.png", "missing.png"]
    reasons = {item["key"]: item["reason"] for item in failed}
    assert reasons["missing.png"].startswith("missing image")
    assert reasons["corrupt.png"].startswith("unreadable image")

    assert metadata["images"] == 6
    assert metadata["failed"] == 2
    assert metadata["inputs"]["records"] == 10
    assert metadata["inputs"]["records_without_image"] == 1
    assert metadata["inputs"]["malformed"] == 1
    assert not (out / "chunks").exists()
    assert json.loads((out / "features_metadata.json").read_text())["images"] == 6


def test_extract_resumes_from_chunks(tmp_path: Path, tiny_clip_dir: Path, jsonl_dataset) -> None:
    jsonl, images_dir, _ = jsonl_dataset
    out = tmp_path / "features"
    args = [
        "--input-jsonl", str(jsonl), "--images-dir", str(images_dir), "--output-dir", str(out),
        "--clip-model", str(tiny_clip_dir), "--num-workers", "0", "--chunk-size", "3", "--keep-chunks",
    ]  # fmt: skip
    first = extract_features.main(args)
    assert first["chunks"] == 3
    assert first["chunks_reused"] == 0
    features = np.load(out / "features.npy")

    with pytest.raises(FileExistsError, match="already exists"):
        extract_features.main(args)

    # Simulate a crash during the second chunk: the final files and that chunk's marker are absent.
    for name in ("features.npy", "keys.txt", "failed.jsonl", "features_metadata.json"):
        (out / name).unlink()
    (out / "chunks" / "chunk-000001.keys.txt").unlink()
    second = extract_features.main(args)
    assert second["chunks_reused"] == 2
    assert second["images_processed_this_run"] == 3  # img3, missing.png, corrupt.png
    np.testing.assert_array_equal(np.load(out / "features.npy"), features)

    (out / "features.npy").unlink()
    changed = [*args[:-1], "--chunk-size", "2"]
    with pytest.raises(
        FileExistsError, match=r"different run \(differs in \['chunk_size', 'n_units', 'units_sha1'\]\)"
    ):
        extract_features.main(changed)
    third = extract_features.main([*changed, "--overwrite"])
    assert third["chunks"] == 4
    np.testing.assert_allclose(np.load(out / "features.npy"), features, atol=1e-6)


def test_missing_clip_dir_blocks_no_rerun(tmp_path: Path, tiny_clip_dir: Path, jsonl_dataset) -> None:
    jsonl, images_dir, _ = jsonl_dataset
    out = tmp_path / "features"
    args = ["--input-jsonl", str(jsonl), "--images-dir", str(images_dir), "--output-dir", str(out), "--num-workers", "0"]
    with pytest.raises(FileNotFoundError, match=r"CLIP model directory .*no-such-clip not found"):
        extract_features.main([*args, "--clip-model", str(tmp_path / "no-such-clip")])

    # Nothing of the failed run is left to refuse the corrected one.
    metadata = extract_features.main([*args, "--clip-model", str(tiny_clip_dir)])
    assert metadata["chunks_reused"] == 0


def test_extract_rejects_non_empty_dir(tmp_path: Path, tiny_clip_dir: Path, jsonl_dataset) -> None:
    jsonl, images_dir, _ = jsonl_dataset
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="is not empty"):
        extract_features.main(
            [
                "--input-jsonl",
                str(jsonl),
                "--images-dir",
                str(images_dir),
                "--output-dir",
                str(out),
                "--clip-model",
                str(tiny_clip_dir),
            ]
        )
    with pytest.raises(SystemExit):
        extract_features.main(["--input-jsonl", str(jsonl), "--output-dir", str(out)])


def test_extract_webdataset_shards(tmp_path: Path, tiny_clip_dir: Path) -> None:
    import io

    import webdataset as wds

    images_dir = tmp_path / "images"
    names = _make_images(images_dir)
    shards = tmp_path / "shards"
    shards.mkdir()
    layout = [[0, 1, 2], [3, 0, 4]]  # key "s0" of shard 1 repeats shard 0's first sample
    for shard_index, members in enumerate(layout):
        with wds.TarWriter(str(shards / f"shard-{shard_index:06d}.tar")) as writer:
            for image_index in members:
                key = f"s{image_index}"
                data = (images_dir / names[image_index]).read_bytes()
                writer.write({"__key__": key, "png": data, "json": json.dumps({"id": key}).encode()})
            writer.write({"__key__": "broken", "jpg": b"not an image"})

    out = tmp_path / "features"
    metadata = extract_features.main(
        ["--shards", str(shards / "shard-{000000..000001}.tar"), "--output-dir", str(out),
         "--clip-model", str(tiny_clip_dir), "--num-workers", "2", "--batch-size", "2"]
    )  # fmt: skip
    keys = (out / "keys.txt").read_text().splitlines()
    assert keys == ["s0.png", "s1.png", "s2.png", "s3.png", "s4.png"]
    assert metadata["duplicate_keys_dropped"] == 1
    assert metadata["failed"] == 2

    model, processor = load_clip_image_encoder(tiny_clip_dir, device="cpu")
    decoded = [Image.open(io.BytesIO((images_dir / names[i]).read_bytes())).convert("RGB") for i in range(5)]
    np.testing.assert_allclose(
        np.load(out / "features.npy"), embed_images(model, processor, decoded), atol=1e-5
    )


def test_extract_same_rows_any_worker_count(tmp_path: Path, tiny_clip_dir: Path, jsonl_dataset) -> None:
    """One chunk split over three workers gives the rows, keys and failures of a single process."""
    jsonl, images_dir, expected_keys = jsonl_dataset
    outputs = {}
    for workers in ("0", "3"):
        out = tmp_path / f"workers-{workers}"
        extract_features.main(
            ["--input-jsonl", str(jsonl), "--images-dir", str(images_dir), "--output-dir", str(out),
             "--clip-model", str(tiny_clip_dir), "--num-workers", workers, "--batch-size", "2"]
        )  # fmt: skip
        outputs[workers] = out
    assert (outputs["3"] / "keys.txt").read_text().splitlines() == expected_keys
    assert (outputs["3"] / "keys.txt").read_text() == (outputs["0"] / "keys.txt").read_text()
    assert (outputs["3"] / "failed.jsonl").read_text() == (outputs["0"] / "failed.jsonl").read_text()
    np.testing.assert_allclose(
        np.load(outputs["3"] / "features.npy"), np.load(outputs["0"] / "features.npy"), atol=1e-6
    )
