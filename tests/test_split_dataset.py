"""Tests of clustering/split_dataset.py and the shard library behind it."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from clustering import split_dataset
from clustering.router import Router
from clustering.shards import (
    MANIFEST,
    PrecomputedFeatures,
    SplitError,
    SplitOptions,
    split_records,
)
from datamodules.sources import DatasetEntry
from datamodules.synthetic import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]


def _read_shards(split_dir: Path, expert: int) -> list[dict]:
    manifest = json.loads((split_dir / MANIFEST).read_text())
    urls = [str(split_dir / shard["path"]) for shard in manifest["experts"][expert]["shards"]]
    if not urls:
        return []
    return list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


def _append_lines(jsonl: Path, lines: list[str]) -> None:
    with open(jsonl, "a", encoding="utf-8") as handle:
        for line in lines:
            handle.write(line + "\n")


@pytest.fixture
def faulty_data(tmp_path: Path):
    """Twelve good records, then one of each kind of bad record (lines 13 to 18)."""
    data = write_synthetic_dataset(tmp_path / "data", n_records=12, n_experts=2)
    truncated = data.images_dir / "images" / "truncated.png"
    good_png = (data.images_dir / "images" / "000000.png").read_bytes()
    truncated.write_bytes(good_png[: len(good_png) // 2])
    conversation = [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "red"}]
    _append_lines(
        data.jsonl,
        [
            json.dumps({"id": "missing", "image": "images/nope.png", "conversations": conversation}),  # 13
            json.dumps(
                {"id": "truncated", "image": "images/truncated.png", "conversations": conversation}
            ),  # 14
            '{"id": "broken", "image": ',  # 15
            json.dumps({"id": "silent", "image": "images/000001.png"}),  # 16
            json.dumps(
                {
                    "id": "text",
                    "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
                }
            ),  # 17
            "",  # 18
        ],
    )
    # The truncated image needs a feature too, so that it fails on decoding and not on the lookup.
    keys = data.keys.read_text().splitlines() + ["images/truncated.png"]
    data.keys.write_text("\n".join(keys) + "\n")
    features = np.load(data.features)
    np.save(data.features, np.concatenate([features, features[:1]]))
    return data


def test_manifest_accounts_for_every_line(faulty_data, tmp_path: Path, capsys) -> None:
    out = tmp_path / "split"
    manifest = split_dataset.main(
        faulty_data.split_arguments(out, "--on-error", "skip", "--shard-max-count", "4")
    )
    n_lines = len(faulty_data.jsonl.read_text().splitlines())

    assert n_lines == 18
    assert manifest["total_records"] == n_lines
    written = sum(row["samples"] for row in manifest["experts"])
    assert written == 12
    assert written + len(manifest["skipped"]) == n_lines
    reasons = {entry["line"]: entry["reason"] for entry in manifest["skipped"]}
    assert reasons == {
        13: "missing image",
        14: "unreadable image",
        15: "malformed line",
        16: "no conversation",
        17: "text-only record",
        18: "blank line",
    }
    assert manifest["text_only_records"] == 1
    assert [row["samples"] for row in manifest["experts"]] == [6, 6]
    assert [row["images"] for row in manifest["experts"]] == [6, 6]
    assert all(row["tokens_estimate"] > 6 * 256 for row in manifest["experts"])
    for row in manifest["experts"]:
        assert sum(shard["samples"] for shard in row["shards"]) == row["samples"]
        assert all(shard["samples"] <= 4 for shard in row["shards"])
    assert json.loads((out / MANIFEST).read_text()) == manifest
    assert "expert 0: 6 samples" in capsys.readouterr().out


def test_on_error_fail_names_the_line(faulty_data, tmp_path: Path) -> None:
    lines = faulty_data.jsonl.read_text().splitlines()
    # Keep the good records and the malformed line only, so the malformed line is the first error.
    faulty_data.jsonl.write_text("\n".join(lines[:12] + [lines[14]]) + "\n")
    router = Router.from_dir(faulty_data.clustering_dir)
    features = PrecomputedFeatures(faulty_data.features, faulty_data.keys)
    dataset = DatasetEntry("data", faulty_data.jsonl, faulty_data.images_dir)

    with pytest.raises(SplitError, match=r"line 13: .*not valid JSON") as error:
        split_records([dataset], tmp_path / "split", router, features, SplitOptions(on_error="fail"))

    assert "--on-error skip" in str(error.value)
    assert not (tmp_path / "split" / MANIFEST).exists()
    assert not list((tmp_path / "split").rglob("*.partial"))


def test_cli_exits_with_line_number(faulty_data, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        split_dataset.main(faulty_data.split_arguments(tmp_path / "split"))

    assert exit_info.value.code == 2
    assert "line 13" in capsys.readouterr().err


def test_shards_round_trip_every_field(tmp_path: Path) -> None:
    data = write_synthetic_dataset(tmp_path / "data", n_records=10, n_experts=2)
    out = tmp_path / "split"
    manifest = split_dataset.main(data.split_arguments(out, "--shard-max-count", "3"))
    source_lines = data.jsonl.read_text().splitlines()
    features = np.load(data.features)
    routes = Router.from_dir(data.clustering_dir).route(features)
    scores = Router.from_dir(data.clustering_dir).scores(features)

    seen = 0
    for expert in range(2):
        for sample in _read_shards(out, expert):
            meta = json.loads(sample["json"])
            record = json.loads(source_lines[meta["line"] - 1])
            row = meta["line"] - 1
            assert sample["__key__"] == f"{row:09d}"
            assert meta["id"] == record["id"]
            assert meta["conversations"] == record["conversations"]
            assert meta["source"] == str(data.jsonl)
            assert meta["dataset"] == "data"
            assert meta["repeat_time"] == 1.0
            assert meta["images"] == ["0.png"]
            assert meta["image_sources"] == [record["image"]]
            assert sample["0.png"] == (data.images_dir / record["image"]).read_bytes()
            assert meta["expert"] == expert == routes.experts[row] == data.planted_experts[row]
            assert meta["route_similarity"] == pytest.approx(float(routes.similarity[row]))
            assert meta["route_scores"] == pytest.approx(scores[row].tolist())
            seen += 1
    assert seen == 10 == manifest["written"]


def test_same_inputs_give_identical_shards(tmp_path: Path) -> None:
    data = write_synthetic_dataset(tmp_path / "data", n_records=9, n_experts=3)
    first, second = tmp_path / "first", tmp_path / "second"
    split_dataset.main(data.split_arguments(first, "--shard-max-count", "2"))
    split_dataset.main(data.split_arguments(second, "--shard-max-count", "2"))

    def digests(root: Path) -> dict[str, str]:
        return {
            str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*.tar"))
        }

    assert len(digests(first)) == 6
    assert digests(first) == digests(second)


def test_existing_split_needs_overwrite(tmp_path: Path, capsys) -> None:
    data = write_synthetic_dataset(tmp_path / "data", n_records=4)
    out = tmp_path / "split"
    split_dataset.main(data.split_arguments(out))

    with pytest.raises(SystemExit):
        split_dataset.main(data.split_arguments(out))
    assert "--overwrite" in capsys.readouterr().err

    manifest = split_dataset.main(data.split_arguments(out, "--overwrite"))
    assert manifest["written"] == 4


def test_killed_run_leaves_no_finished_looking_partial_shard(tmp_path: Path) -> None:
    data = write_synthetic_dataset(tmp_path / "data", n_records=20, n_experts=1)
    out = tmp_path / "split"
    # The child process kills itself with SIGKILL in the middle of its 7th sample write, after the
    # first shard (3 samples) and the second (3 samples) were closed.
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        import webdataset
        from clustering import split_dataset
        original = webdataset.TarWriter.write
        calls = 0
        def write(self, obj):
            global calls
            calls += 1
            if calls == 7:
                self.stream.write(b"partial bytes")
                self.stream.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, obj)
        webdataset.TarWriter.write = write
        split_dataset.main({data.split_arguments(out, "--shard-max-count", "3")!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=120)

    assert result.returncode == -9
    assert not (out / MANIFEST).exists()
    finished = sorted(p.name for p in (out / "expert-0").glob("shard-*.tar"))
    partial = sorted(p.name for p in (out / "expert-0").glob("*.partial"))
    assert finished == ["shard-000000.tar", "shard-000001.tar"]
    assert partial == ["shard-000002.tar.partial"]
    for name in finished:
        with tarfile.open(out / "expert-0" / name) as archive:
            assert len([m for m in archive if m.name.endswith(".json")]) == 3


def test_text_only_records_go_to_fixed_expert(tmp_path: Path) -> None:
    data = write_synthetic_dataset(tmp_path / "data", n_records=4, n_experts=2)
    text_only = {
        "id": "t",
        "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
    }
    _append_lines(data.jsonl, [json.dumps(text_only)])
    out = tmp_path / "split"

    manifest = split_dataset.main(data.split_arguments(out, "--text-only", "1"))

    assert manifest["text_only_records"] == 1
    assert manifest["skipped"] == []
    assert [row["samples"] for row in manifest["experts"]] == [2, 3]
    stored = [json.loads(s["json"]) for s in _read_shards(out, 1) if json.loads(s["json"])["id"] == "t"]
    assert len(stored) == 1
    assert stored[0]["images"] == []
    assert stored[0]["route_similarity"] is None
    assert stored[0]["route_scores"] == [-1.0, 1.0]


def test_multi_image_record_routes_by_first_image(tmp_path: Path) -> None:
    data = write_synthetic_dataset(tmp_path / "data", n_records=4, n_experts=2)
    # Record 0 is planted on expert 0 and record 1 on expert 1; a record with [1, 0] follows image 1.
    record = {
        "id": "pair",
        "image": ["images/000001.png", "images/000000.png"],
        "conversations": [
            {"from": "human", "value": "<image>\n<image>\nsame colour?"},
            {"from": "gpt", "value": "no"},
        ],
    }
    _append_lines(data.jsonl, [json.dumps(record)])
    out = tmp_path / "split"

    split_dataset.main(data.split_arguments(out))

    pairs = [s for s in _read_shards(out, 1) if json.loads(s["json"])["id"] == "pair"]
    assert len(pairs) == 1
    assert json.loads(pairs[0]["json"])["images"] == ["0.png", "1.png"]
    assert pairs[0]["0.png"] == (data.images_dir / "images/000001.png").read_bytes()
    assert pairs[0]["1.png"] == (data.images_dir / "images/000000.png").read_bytes()


def test_placeholder_mismatch_is_skipped(tmp_path: Path) -> None:
    data = write_synthetic_dataset(tmp_path / "data", n_records=2, n_experts=1)
    record = {
        "id": "mismatch",
        "image": ["images/000000.png", "images/000001.png"],
        "conversations": [{"from": "human", "value": "<image>\nwhich?"}, {"from": "gpt", "value": "left"}],
    }
    _append_lines(data.jsonl, [json.dumps(record)])

    manifest = split_dataset.main(data.split_arguments(tmp_path / "split", "--on-error", "skip"))

    assert manifest["skipped"][0]["line"] == 3
    assert manifest["skipped"][0]["reason"] == "image placeholder count"


def test_missing_placeholder_is_prepended(tmp_path: Path) -> None:
    data = write_synthetic_dataset(tmp_path / "data", n_records=1, n_experts=1)
    record = json.loads(data.jsonl.read_text())
    record["conversations"][0]["value"] = record["conversations"][0]["value"].replace("<image>\n", "")
    data.jsonl.write_text(json.dumps(record) + "\n")
    out = tmp_path / "split"

    split_dataset.main(data.split_arguments(out))

    stored = json.loads(_read_shards(out, 0)[0]["json"])
    assert stored["conversations"][0]["value"].startswith("<image>\n")


def test_llava_json_input(tmp_path: Path) -> None:
    data = write_synthetic_dataset(tmp_path / "data", n_records=5, n_experts=2)
    records = [json.loads(line) for line in data.jsonl.read_text().splitlines()]
    records[2]["conversations"][0]["from"] = "user"
    records[2]["conversations"][1]["from"] = "assistant"
    llava = tmp_path / "data" / "llava.json"
    llava.write_text(json.dumps(records))
    args = data.split_arguments(tmp_path / "split")
    args[1] = str(llava)

    manifest = split_dataset.main(args)

    assert manifest["total_records"] == 5
    assert manifest["written"] == 5
    stored = {
        json.loads(s["json"])["line"]: json.loads(s["json"]) for s in _read_shards(tmp_path / "split", 0)
    }
    assert stored[3]["conversations"][0]["from"] == "human"
    assert stored[3]["conversations"][1]["from"] == "gpt"


def test_meta_mixture_records_name_and_repeat_time(tmp_path: Path) -> None:
    first = write_synthetic_dataset(tmp_path / "a", n_records=4, n_experts=2, seed=1)
    second = write_synthetic_dataset(tmp_path / "b", n_records=6, n_experts=2, seed=2)
    # Both datasets route with the first one's centroids, so features and keys are merged here.
    keys = [f"a/{k}" for k in first.keys.read_text().split()] + [
        f"b/{k}" for k in second.keys.read_text().split()
    ]
    for dataset, prefix in ((first, "a"), (second, "b")):
        lines = [json.loads(line) for line in dataset.jsonl.read_text().splitlines()]
        for line in lines:
            line["image"] = f"{prefix}/{line['image']}"
        dataset.jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    features = np.concatenate([np.load(first.features), np.load(first.features)[:2].repeat(3, axis=0)])
    np.save(tmp_path / "features.npy", features)
    (tmp_path / "keys.txt").write_text("\n".join(keys) + "\n")
    meta = {
        "alpha": {"root": str(tmp_path), "annotation": str(first.jsonl), "repeat_time": 1},
        "beta": {
            "root": str(tmp_path),
            "annotation": str(second.jsonl),
            "repeat_time": 2.5,
            "data_augment": False,
        },
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "split"

    manifest = split_dataset.main(
        [
            "--meta-path",
            str(tmp_path / "meta.json"),
            "--clustering-results-dir",
            str(first.clustering_dir),
            "--output-dir",
            str(out),
            "--features",
            str(tmp_path / "features.npy"),
            "--keys",
            str(tmp_path / "keys.txt"),
        ]
    )

    assert [(d["name"], d["repeat_time"], d["records"], d["written"]) for d in manifest["datasets"]] == [
        ("alpha", 1.0, 4, 4),
        ("beta", 2.5, 6, 6),
    ]
    assert manifest["total_records"] == 10
    for row in manifest["experts"]:
        # A shard never mixes datasets, so the DataModule can weight it by one repeat_time.
        assert sorted(shard["dataset"] for shard in row["shards"]) == ["alpha", "beta"]
        for shard in row["shards"]:
            assert shard["repeat_time"] == {"alpha": 1.0, "beta": 2.5}[shard["dataset"]]
    for sample in _read_shards(out, 0) + _read_shards(out, 1):
        meta_json = json.loads(sample["json"])
        assert meta_json["repeat_time"] == {"alpha": 1.0, "beta": 2.5}[meta_json["dataset"]]


def test_meta_rejects_invalid_repeat_time(tmp_path: Path) -> None:
    data = write_synthetic_dataset(tmp_path / "data", n_records=1)
    meta = {"bad": {"root": str(data.images_dir), "annotation": str(data.jsonl), "repeat_time": 0}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))

    from datamodules.sources import load_meta

    with pytest.raises(ValueError, match="'bad' has repeat_time=0"):
        load_meta(tmp_path / "meta.json")


def test_clip_model_path_matches_router(tmp_path: Path, tiny_clip_dir: Path) -> None:
    from clustering.features import embed_images, load_clip_image_encoder
    from datamodules.images import decode_rgb

    data = write_synthetic_dataset(tmp_path / "data", n_records=6, n_experts=2, feature_dim=16)
    out = tmp_path / "split"
    args = data.split_arguments(out)[:8] + ["--clip-model", str(tiny_clip_dir)]

    manifest = split_dataset.main(args)

    model, processor = load_clip_image_encoder(tiny_clip_dir, device="cpu")
    paths = sorted((data.images_dir / "images").glob("*.png"))
    embeddings = embed_images(model, processor, [decode_rgb(p.read_bytes()) for p in paths])
    expected = Router.from_dir(data.clustering_dir).route(embeddings).experts
    assert [row["samples"] for row in manifest["experts"]] == np.bincount(expected, minlength=2).tolist()
    for expert in range(2):
        for sample in _read_shards(out, expert):
            assert expected[json.loads(sample["json"])["line"] - 1] == expert
