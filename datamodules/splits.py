"""Builders for the DataModules' `prepare_data`: a missing split and the small preset's processor.

Both are built in one process, into a temporary directory beside the target, and renamed into
place when complete, so a crash never leaves a half-built split or processor under the final name.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clustering.features import DEFAULT_CLIP_MODEL
from clustering.shards import MANIFEST, SplitOptions, load_manifest, make_feature_source, split_records
from datamodules.sources import DatasetEntry, iter_raw_records, load_meta

log = logging.getLogger(__name__)

# transformers writes one of these into every saved processor directory.
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


@dataclass
class SplitSource:
    """The inputs of `clustering/split_dataset.py`, for building a split inside `prepare_data`.

    Give either `input_jsonl` with `images_dir`, or `meta_path`. Embeddings come from `features`
    and `feature_keys` when both are set, else from `clip_model`.
    """

    clustering_results_dir: str
    """Output directory of the clustering (the router's centroids)."""
    input_jsonl: str | None = None
    """InternVL .jsonl or LLaVA .json annotation file."""
    images_dir: str | None = None
    """Directory the records' image paths are relative to (with `input_jsonl`)."""
    meta_path: str | None = None
    """InternVL mixture file, in place of `input_jsonl`."""
    clip_model: str = DEFAULT_CLIP_MODEL
    """CLIP checkpoint id or directory that embeds images when no features are given."""
    features: str | None = None
    """features.npy of extract_features.py."""
    feature_keys: str | None = None
    """keys.txt of extract_features.py (one key per row of `features`)."""
    shard_max_count: int = 2000
    """Maximum samples per shard."""
    on_error: str = "fail"
    """`fail` or `skip` unusable records."""
    text_only: str = "skip"
    """`skip` records without an image, or an expert id that receives them."""

    def datasets(self) -> list[DatasetEntry]:
        """Return the annotation files to split.

        Raises:
            ValueError: neither or both of `input_jsonl` and `meta_path` are set, or
                `images_dir` is missing with `input_jsonl`.
        """
        if (self.input_jsonl is None) == (self.meta_path is None):
            raise ValueError(
                f"SplitSource needs exactly one of input_jsonl ({self.input_jsonl!r}) and meta_path "
                f"({self.meta_path!r})."
            )
        if self.meta_path is not None:
            return load_meta(self.meta_path)
        if self.images_dir is None:
            raise ValueError(f"SplitSource with input_jsonl={self.input_jsonl!r} needs images_dir.")
        annotation = Path(self.input_jsonl)  # type: ignore[arg-type]
        return [DatasetEntry(name=annotation.stem, annotation=annotation, root=Path(self.images_dir))]


def is_split_complete(split_dir: str | Path) -> bool:
    """Return True when `split_dir` contains a manifest, which is written last."""
    return (Path(split_dir) / MANIFEST).is_file()


def ensure_split(split_dir: str | Path, source: SplitSource | None) -> dict[str, Any]:
    """Return the manifest of `split_dir`, building the split from `source` first when it is missing.

    The split is written into ``<split_dir>.partial-<pid>`` and renamed to `split_dir` when
    complete. An existing `split_dir` without a manifest (an interrupted run) is replaced.

    Raises:
        FileNotFoundError: the split is missing and no `source` is configured.
    """
    split_dir = Path(split_dir)
    if is_split_complete(split_dir):
        return load_manifest(split_dir)
    if source is None:
        raise FileNotFoundError(
            f"No finished split at {split_dir} (no {MANIFEST}) and no source to build it from. HINT: run "
            "clustering/split_dataset.py --output-dir "
            f"{split_dir}, or set the DataModule's source (input_jsonl or meta_path, clustering_results_dir)."
        )
    from clustering.router import Router

    datasets = source.datasets()
    router = Router.from_dir(source.clustering_results_dir)
    options = SplitOptions(
        shard_max_count=source.shard_max_count, on_error=source.on_error, text_only=source.text_only
    )
    features = make_feature_source(source.clip_model, source.features, source.feature_keys)
    staging = split_dir.with_name(f"{split_dir.name}.partial-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    log.info("Building the split %s from %s", split_dir, [str(d.annotation) for d in datasets])
    try:
        manifest = split_records(
            datasets, staging, router, features, options, arguments={"source": vars(source)}
        )
        if split_dir.exists():
            log.warning("Replacing %s, which has no %s (an interrupted split)", split_dir, MANIFEST)
            shutil.rmtree(split_dir)
        split_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, split_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return manifest


def is_processor_dir(path: str | Path) -> bool:
    """Return True when `path` is a directory with a saved processor in it."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in _PROCESSOR_FILES)


def iter_source_texts(source: SplitSource) -> Iterator[str]:
    """Yield every conversation turn's text of the source annotation files (malformed lines skipped)."""
    for dataset in source.datasets():
        for raw in iter_raw_records(dataset):
            if raw.data is None or not isinstance(raw.data.get("conversations"), list):
                continue
            for turn in raw.data["conversations"]:
                if isinstance(turn, dict) and isinstance(turn.get("value"), str):
                    yield turn["value"]


def iter_split_texts(split_dir: str | Path) -> Iterator[str]:
    """Yield every conversation turn's text stored in a split's shards, all experts, in manifest order."""
    split_dir = Path(split_dir)
    manifest = load_manifest(split_dir)
    for expert in manifest["experts"]:
        for shard in expert["shards"]:
            with tarfile.open(split_dir / shard["path"]) as archive:
                for member in archive:
                    if member.name.endswith(".json"):
                        handle = archive.extractfile(member)
                        assert handle is not None
                        for turn in json.load(handle)["conversations"]:
                            yield turn["value"]


def ensure_small_processor(
    processor_dir: str | Path, preset: str, split_dir: str | Path, source: SplitSource | None
) -> None:
    """Build and save the small preset's processor at `processor_dir` unless one is there already.

    The tokenizer is trained on the text of the whole training set (all experts). The text comes
    from the source annotations when `source` is set and from the split's shards otherwise. Every
    expert and the dense baseline thus get the same vocabulary, so their outputs can be mixed.
    """
    processor_dir = Path(processor_dir)
    if is_processor_dir(processor_dir):
        return
    from lightning_modules.presets import build_small_processor, get_preset

    texts = list(iter_source_texts(source)) if source is not None else list(iter_split_texts(split_dir))
    staging = processor_dir.with_name(f"{processor_dir.name}.partial-{os.getpid()}")
    try:
        build_small_processor(texts, staging, image_size=get_preset(preset).image_size, preset=preset)
        if is_processor_dir(processor_dir):
            # Another process finished first; both trained on the same text, so either copy is the same.
            return
        if processor_dir.exists():
            shutil.rmtree(processor_dir)
        processor_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, processor_dir)
        log.info("Built the %s processor from %d training texts at %s", preset, len(texts), processor_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def load_processor(name_or_path: str | Path) -> Any:
    """Load a processor with `AutoProcessor.from_pretrained` (a hub id or a local directory).

    Importing `lightning_modules.presets` first registers the small preset's processor class,
    so directories written by `build_small_processor` load as well.
    """
    from transformers import AutoProcessor

    import lightning_modules.presets  # noqa: F401  (registers the small preset's processor class)

    try:
        return AutoProcessor.from_pretrained(str(name_or_path))
    except OSError as error:
        raise OSError(
            f"Could not load a processor from {name_or_path!r}: {error}\nHINT: pass the checkpoint's id or "
            "directory, or set `preset` so prepare_data builds the small processor there."
        ) from error
