"""Route source records to experts and write them as per-expert WebDataset shards plus a manifest.

This is the library behind ``clustering/split_dataset.py`` and the DataModules' `prepare_data`.

Layout of an output directory::

    <out>/expert-<k>/shard-<nnnnnn>.tar     one sample per source record
    <out>/manifest.json                     counts per expert and dataset, every skipped record

A sample contains ``<key>.json`` and its images as ``<key>.<i>.<ext>``, the bytes exactly as they were
read from disk. The json contains the conversation, the record's source file and line, its dataset
and repeat_time, and the route (``expert``, ``route_similarity``, ``route_scores``). Evaluation
records also carry ``question_id``, ``question``, ``gt_answers``, ``benchmark`` and
``question_type``. A record with several images is routed by its first image.

Shards are written as ``shard-<nnnnnn>.tar.partial`` and renamed when closed, and the manifest is
written last the same way, so a directory with a manifest is complete and an interrupted run
leaves no truncated archive under a final name. Tar headers carry fixed times and owners, so the
same inputs give byte-identical shards.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm
from webdataset import TarWriter

from clustering.router import Router
from datamodules.images import decode_rgb, member_suffix
from datamodules.sources import (
    REASON_BLANK,
    REASON_MISSING_FEATURE,
    REASON_MISSING_IMAGE,
    REASON_TEXT_ONLY,
    REASON_UNREADABLE_IMAGE,
    DatasetEntry,
    RawRecord,
    RecordError,
    SourceRecord,
    iter_raw_records,
    parse_record,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
PARTIAL_SUFFIX = ".partial"
TEXT_ONLY_SKIP = "skip"
# Text-only records have no image to route by. With a fixed expert they get this score row: the
# highest cosine (1) for their expert and the lowest (-1) for the rest, so soft routing agrees
# with the fixed top-1 choice.
TEXT_ONLY_SCORE, OTHER_SCORE = 1.0, -1.0

# Every tar member costs a 512-byte header plus its data rounded up to 512-byte blocks.
_TAR_BLOCK = 512


def expert_dir_name(expert: int) -> str:
    """Return the directory name of an expert's shards, ``expert-<k>``."""
    return f"expert-{expert}"


def shard_name(index: int) -> str:
    """Return the file name of a shard, ``shard-<nnnnnn>.tar``."""
    return f"shard-{index:06d}.tar"


def estimate_tokens(conversations: Sequence[dict[str, str]], n_images: int, image_tokens: int) -> int:
    """Estimate a sample's token count without a tokenizer.

    Text counts one token per 4 characters, rounded up (a rule of thumb for English BPE
    vocabularies), each turn adds 5 template tokens (``<|im_start|>``, the role, two newlines and
    ``<|im_end|>``), and each image adds `image_tokens` plus ``<img>`` and ``</img>``.
    """
    characters = sum(len(turn["value"]) for turn in conversations)
    return math.ceil(characters / 4) + 5 * len(conversations) + n_images * (image_tokens + 2)


def _tar_member_size(size: int) -> int:
    return _TAR_BLOCK + math.ceil(size / _TAR_BLOCK) * _TAR_BLOCK


# -- feature sources ------------------------------------------------------------------------------


class FeatureSource:
    """Gives the CLIP embedding of each record's routing image."""

    needs_images: bool = False

    def __call__(self, keys: Sequence[str], images: Sequence[Image.Image | None]) -> list[np.ndarray | None]:
        """Return one (D,) embedding per key, or None where this source has none."""
        raise NotImplementedError


class PrecomputedFeatures(FeatureSource):
    """Embeddings from ``extract_features.py``: ``features.npy`` (N, D) and ``keys.txt`` (N lines).

    A key is the image path as written in the source record. A record whose first image has no
    key gets no feature and is skipped with reason ``missing feature``.
    """

    def __init__(self, features_path: str | Path, keys_path: str | Path) -> None:
        self.features = np.load(features_path, mmap_mode="r", allow_pickle=False)
        keys = Path(keys_path).read_text(encoding="utf-8").splitlines()
        if self.features.ndim != 2 or len(keys) != len(self.features):
            raise ValueError(
                f"{features_path} has shape {self.features.shape} but {keys_path} has {len(keys)} keys; "
                "expected an (N, D) array and N keys. HINT: pass the features.npy and keys.txt of one "
                "extract_features.py run."
            )
        self.rows = {key: row for row, key in enumerate(keys)}

    def __call__(self, keys: Sequence[str], images: Sequence[Image.Image | None]) -> list[np.ndarray | None]:
        return [np.asarray(self.features[self.rows[key]]) if key in self.rows else None for key in keys]


class ClipFeatures(FeatureSource):
    """Embeddings computed on the fly with a CLIP image encoder (`clustering.features`)."""

    needs_images = True

    def __init__(self, clip_model: str, device: str | None = None, batch_size: int = 64) -> None:
        from clustering.features import embed_images, load_clip_image_encoder

        self.model, self.image_processor = load_clip_image_encoder(clip_model, device=device)
        self.batch_size = batch_size
        self._embed = embed_images

    def __call__(self, keys: Sequence[str], images: Sequence[Image.Image | None]) -> list[np.ndarray | None]:
        present = [image for image in images if image is not None]
        embeddings = iter(self._embed(self.model, self.image_processor, present, batch_size=self.batch_size))
        return [next(embeddings) if image is not None else None for image in images]


# -- shard writing --------------------------------------------------------------------------------


@dataclass
class ShardInfo:
    """One finished shard: its path relative to the output directory and its contents."""

    path: str
    samples: int
    bytes: int
    dataset: str
    repeat_time: float


class RollingShardWriter:
    """Write one expert's samples into numbered shards, each under a temporary name until closed.

    A new shard starts when the current one has `max_count` samples, when the next sample
    would take it past `max_size` bytes, or when the dataset changes. Every shard thus contains
    one dataset, so the DataModule can weight shards by that dataset's repeat_time.
    """

    def __init__(self, output_dir: Path, expert: int, max_count: int, max_size: int) -> None:
        self.output_dir = output_dir
        self.directory = output_dir / expert_dir_name(expert)
        self.max_count = max_count
        self.max_size = max_size
        self.shards: list[ShardInfo] = []
        self._writer: TarWriter | None = None
        self._stream: io.BufferedWriter | None = None
        self._partial: Path | None = None
        self._count = 0
        self._size = 0
        self._dataset: DatasetEntry | None = None

    def write(self, sample: dict[str, Any], dataset: DatasetEntry) -> None:
        """Append a sample (``__key__`` plus bytes members) to the current shard."""
        size = sum(_tar_member_size(len(value)) for key, value in sample.items() if key != "__key__")
        if self._writer is not None and (
            self._count >= self.max_count
            or self._size + size > self.max_size
            or dataset.name != self._dataset.name  # type: ignore[union-attr]
        ):
            self.close()
        if self._writer is None:
            self._open(dataset)
        assert self._writer is not None
        self._writer.write(sample)
        self._count += 1
        self._size += size

    def _open(self, dataset: DatasetEntry) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / shard_name(len(self.shards))
        self._partial = final.with_name(final.name + PARTIAL_SUFFIX)
        self._stream = open(self._partial, "wb")
        # Fixed mtime, owner and mode make the archive depend on the samples only.
        self._writer = TarWriter(self._stream, encoder=False, mtime=0.0, user="", group="", mode=0o444)
        self._count = 0
        self._size = 0
        self._dataset = dataset

    def close(self) -> None:
        """Finish the current shard: close it, flush it to disk and rename it to its final name."""
        if self._writer is None:
            return
        assert self._stream is not None and self._partial is not None and self._dataset is not None
        self._writer.close()
        self._stream.flush()
        os.fsync(self._stream.fileno())
        self._stream.close()
        final = self._partial.with_name(self._partial.name[: -len(PARTIAL_SUFFIX)])
        os.replace(self._partial, final)
        self.shards.append(
            ShardInfo(
                path=str(final.relative_to(self.output_dir)),
                samples=self._count,
                bytes=final.stat().st_size,
                dataset=self._dataset.name,
                repeat_time=self._dataset.repeat_time,
            )
        )
        self._writer = self._stream = self._partial = None

    def abort(self) -> None:
        """Drop the shard in progress, leaving only finished shards behind."""
        if self._stream is not None:
            self._stream.close()
        if self._partial is not None:
            self._partial.unlink(missing_ok=True)
        self._writer = self._stream = self._partial = None


# -- the split ------------------------------------------------------------------------------------


@dataclass
class SplitOptions:
    """Options of one split; every field is written to the manifest under ``arguments``."""

    shard_max_count: int = 2000
    """Maximum samples per shard."""
    shard_max_size: int = 1 << 30
    """Maximum bytes per shard (estimated from tar block sizes before writing)."""
    on_error: str = "fail"
    """`fail` stops at the first unusable record, `skip` skips and counts it."""
    text_only: str = TEXT_ONLY_SKIP
    """`skip`, or an expert id that receives every record without an image."""
    image_tokens: int = 256
    """Image tokens per image for the manifest's token estimate (256 for a 448 px InternVL tile)."""
    chunk_size: int = 256
    """Records read, embedded and routed together."""
    read_threads: int = 8
    """Threads that read and decode a chunk's images (PIL releases the GIL while decoding)."""

    def validate(self, n_experts: int) -> None:
        """Raise `ValueError` listing every invalid option."""
        problems = []
        if self.shard_max_count < 1:
            problems.append(f"shard_max_count must be >= 1, got {self.shard_max_count}")
        if self.shard_max_size < _TAR_BLOCK * 4:
            problems.append(
                f"shard_max_size must be at least {_TAR_BLOCK * 4} bytes, got {self.shard_max_size}"
            )
        if self.on_error not in ("fail", "skip"):
            problems.append(f"on_error must be 'fail' or 'skip', got {self.on_error!r}")
        if self.text_only != TEXT_ONLY_SKIP:
            if not self.text_only.isdigit() or int(self.text_only) >= n_experts:
                problems.append(
                    f"text_only must be 'skip' or an expert id in [0, {n_experts}), got {self.text_only!r}"
                )
        if self.image_tokens < 0:
            problems.append(f"image_tokens must be >= 0, got {self.image_tokens}")
        if self.chunk_size < 1:
            problems.append(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.read_threads < 1:
            problems.append(f"read_threads must be >= 1, got {self.read_threads}")
        if problems:
            raise ValueError("Invalid split options:\n  " + "\n  ".join(problems))


class SplitError(RuntimeError):
    """A record could not be used and the split runs with ``on_error="fail"``."""


@dataclass
class _Prepared:
    """A record whose images were all read: bytes per image, the routing image if decoded."""

    record: SourceRecord
    index: int
    image_bytes: list[bytes]
    first_image: Image.Image | None


@dataclass
class _Tally:
    samples: int = 0
    images: int = 0
    tokens_estimate: int = 0


@dataclass
class _DatasetTally:
    records: int = 0
    written: int = 0
    skipped: int = 0


@dataclass
class _State:
    skipped: list[dict[str, Any]] = field(default_factory=list)
    per_dataset: dict[str, _DatasetTally] = field(default_factory=dict)
    text_only: int = 0
    total: int = 0


def _read_images(record: SourceRecord, decode_first: bool) -> tuple[list[bytes], Image.Image | None]:
    """Read every image's bytes and check that each one decodes; return the decoded first image."""
    # NOTE: every image is decoded once here, so that unreadable images are caught at split time.
    # On millions of images this decoding is the split's main cost; `read_threads` spreads it.
    root = record.raw.dataset.root
    blobs = []
    first = None
    for position, relative in enumerate(record.images):
        path = root / relative
        try:
            data = path.read_bytes()
        except FileNotFoundError as error:
            raise RecordError(REASON_MISSING_IMAGE, f"image {path} not found") from error
        except OSError as error:
            raise RecordError(REASON_UNREADABLE_IMAGE, f"image {path} could not be read ({error})") from error
        try:
            image = decode_rgb(data)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise RecordError(
                REASON_UNREADABLE_IMAGE, f"image {path} could not be decoded ({error})"
            ) from error
        if position == 0 and decode_first:
            first = image
        blobs.append(data)
    return blobs, first


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _sample_json(
    prepared: _Prepared, members: list[str], expert: int, similarity: float | None, scores: list[float]
) -> bytes:
    record = prepared.record
    raw = record.raw
    payload: dict[str, Any] = {
        "id": record.id,
        "conversations": record.conversations,
        "images": members,
        "image_sources": record.images,
        "source": str(raw.dataset.annotation),
        "line": raw.line,
        "dataset": raw.dataset.name,
        "repeat_time": raw.dataset.repeat_time,
        "expert": expert,
        "route_similarity": similarity,
        "route_scores": scores,
    }
    payload.update(record.extra)
    return json.dumps(payload, ensure_ascii=False, sort_keys=True).encode("utf-8")


class _Splitter:
    """The writers and tallies of one split; `split_records` feeds it the records chunk by chunk."""

    def __init__(
        self,
        output_dir: Path,
        router: Router,
        features: FeatureSource,
        options: SplitOptions,
    ) -> None:
        self.output_dir = output_dir
        self.router = router
        self.features = features
        self.options = options
        self.text_only_expert = None if options.text_only == TEXT_ONLY_SKIP else int(options.text_only)
        self.writers = [
            RollingShardWriter(output_dir, k, options.shard_max_count, options.shard_max_size)
            for k in range(router.n_experts)
        ]
        self.tallies = [_Tally() for _ in range(router.n_experts)]
        self.state = _State()
        self.readers = ThreadPoolExecutor(max_workers=options.read_threads, thread_name_prefix="split-read")

    def skip(self, raw: RawRecord, error: RecordError, counts_as_error: bool = True) -> None:
        if counts_as_error and self.options.on_error == "fail":
            raise SplitError(
                f"{raw.dataset.annotation} line {raw.line}: {error.detail} ({error.reason}). "
                "HINT: fix the record, or pass --on-error skip to skip such records and list them in the manifest."
            )
        self.state.skipped.append(
            {
                "source": str(raw.dataset.annotation),
                "dataset": raw.dataset.name,
                "line": raw.line,
                "reason": error.reason,
                "detail": error.detail,
            }
        )
        self.state.per_dataset[raw.dataset.name].skipped += 1

    def write(self, prepared: _Prepared, expert: int, similarity: float | None, scores: list[float]) -> None:
        record = prepared.record
        key = f"{prepared.index:09d}"
        members = [f"{i}.{member_suffix(path)}" for i, path in enumerate(record.images)]
        sample: dict[str, Any] = {"__key__": key}
        for member, data in zip(members, prepared.image_bytes, strict=True):
            sample[member] = data
        sample["json"] = _sample_json(prepared, members, expert, similarity, scores)
        self.writers[expert].write(sample, record.raw.dataset)
        tally = self.tallies[expert]
        tally.samples += 1
        tally.images += len(members)
        tally.tokens_estimate += estimate_tokens(
            record.conversations, len(members), self.options.image_tokens
        )
        self.state.per_dataset[record.raw.dataset.name].written += 1

    def _read(self, record: SourceRecord) -> tuple[list[bytes], Image.Image | None] | RecordError:
        try:
            return _read_images(record, decode_first=self.features.needs_images)
        except RecordError as error:
            return error

    def process_chunk(self, raws: list[tuple[int, RawRecord]]) -> None:
        parsed: list[tuple[int, RawRecord, SourceRecord | RecordError]] = []
        for index, raw in raws:
            self.state.total += 1
            self.state.per_dataset[raw.dataset.name].records += 1
            try:
                parsed.append((index, raw, parse_record(raw)))
            except RecordError as error:
                parsed.append((index, raw, error))

        # Read and decode the images in threads; results come back in input order.
        with_images = [item for _, _, item in parsed if isinstance(item, SourceRecord) and item.images]
        reads = iter(self.readers.map(self._read, with_images))

        routable: list[_Prepared] = []
        for index, raw, item in parsed:
            if isinstance(item, RecordError):
                self.skip(raw, item, counts_as_error=item.reason != REASON_BLANK)
            elif not item.images:
                self.state.text_only += 1
                if self.text_only_expert is None:
                    error = RecordError(REASON_TEXT_ONLY, "the record has no image")
                    self.skip(raw, error, counts_as_error=False)
                else:
                    scores = [OTHER_SCORE] * self.router.n_experts
                    scores[self.text_only_expert] = TEXT_ONLY_SCORE
                    self.write(_Prepared(item, index, [], None), self.text_only_expert, None, scores)
            else:
                result = next(reads)
                if isinstance(result, RecordError):
                    self.skip(raw, result)
                else:
                    routable.append(_Prepared(item, index, *result))
        if not routable:
            return

        # Route every record of the chunk by its first image, in one batch.
        keys = [prepared.record.images[0] for prepared in routable]
        embeddings = self.features(keys, [prepared.first_image for prepared in routable])
        with_feature = []
        for prepared, embedding in zip(routable, embeddings, strict=True):
            if embedding is None:
                detail = f"no precomputed feature for image key {prepared.record.images[0]!r}"
                self.skip(prepared.record.raw, RecordError(REASON_MISSING_FEATURE, detail))
            else:
                with_feature.append((prepared, embedding))
        if not with_feature:
            return
        matrix = np.stack([embedding for _, embedding in with_feature])  # (n, D)
        scores = self.router.scores(matrix)  # (n, K)
        experts = scores.argmax(axis=1)
        for row, (prepared, _) in enumerate(with_feature):
            expert = int(experts[row])
            self.write(prepared, expert, float(scores[row, expert]), [float(s) for s in scores[row]])

    def close(self) -> None:
        self.readers.shutdown()
        for writer in self.writers:
            writer.close()

    def abort(self) -> None:
        self.readers.shutdown(cancel_futures=True)
        for writer in self.writers:
            writer.abort()


def _clear_output(output_dir: Path, overwrite: bool) -> None:
    """Remove stale partial files; with `overwrite`, also a previous split's shards and manifest."""
    previous = [output_dir / MANIFEST] if (output_dir / MANIFEST).exists() else []
    previous += sorted(output_dir.glob("expert-*"))
    if previous and not overwrite:
        raise FileExistsError(
            f"{output_dir} already contains a split ({', '.join(p.name for p in previous[:3])}"
            f"{', ...' if len(previous) > 3 else ''}). HINT: pass --overwrite to replace it, or choose "
            "another --output-dir."
        )
    for path in previous:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def write_json_atomic(payload: Any, path: Path) -> None:
    """Write JSON under a temporary name, flush it to disk and rename it into place."""
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def split_records(
    datasets: Sequence[DatasetEntry],
    output_dir: str | Path,
    router: Router,
    features: FeatureSource,
    options: SplitOptions | None = None,
    overwrite: bool = False,
    arguments: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Route every record of `datasets` and write per-expert shards and the manifest.

    Args:
        datasets: the annotation files to split, in order; sample keys number records across all.
        output_dir: created if missing.
        router: decides each record's expert from the embedding of its first image.
        features: gives those embeddings (precomputed or computed with CLIP).
        options: shard sizes and error policies.
        overwrite: replace an earlier split in `output_dir`; without it such a directory raises.
        arguments: extra entries for the manifest's ``arguments`` (the command line, for example).
        progress: show a progress bar over the records.

    Returns:
        The manifest (also written to ``<output_dir>/manifest.json``).

    Raises:
        SplitError: a record is unusable and ``options.on_error == "fail"``. Finished shards stay,
            the shard in progress is deleted and no manifest is written.
        FileExistsError: `output_dir` contains an earlier split and `overwrite` is False.
    """
    options = options or SplitOptions()
    options.validate(router.n_experts)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _clear_output(output_dir, overwrite)

    splitter = _Splitter(output_dir, router, features, options)
    for dataset in datasets:
        splitter.state.per_dataset.setdefault(dataset.name, _DatasetTally())

    def numbered() -> Iterator[tuple[int, RawRecord]]:
        index = 0
        for dataset in datasets:
            for raw in iter_raw_records(dataset):
                yield index, raw
                index += 1

    records = tqdm(numbered(), desc="split", unit="record", disable=not progress)
    try:
        for chunk in _chunks(records, options.chunk_size):
            splitter.process_chunk(chunk)
        splitter.close()
    except BaseException:
        splitter.abort()
        raise

    manifest = _build_manifest(splitter, datasets, options, arguments or {})
    write_json_atomic(manifest, output_dir / MANIFEST)
    written = sum(tally.samples for tally in splitter.tallies)
    log.info(
        "Split %d records into %d experts under %s: %d written, %d skipped",
        manifest["total_records"],
        router.n_experts,
        output_dir,
        written,
        len(manifest["skipped"]),
    )
    return manifest


def _build_manifest(
    splitter: _Splitter, datasets: Sequence[DatasetEntry], options: SplitOptions, arguments: dict[str, Any]
) -> dict[str, Any]:
    state = splitter.state
    experts = []
    for k, (tally, writer) in enumerate(zip(splitter.tallies, splitter.writers, strict=True)):
        experts.append(
            {
                "expert": k,
                "samples": tally.samples,
                "images": tally.images,
                "tokens_estimate": tally.tokens_estimate,
                "shards": [asdict(shard) for shard in writer.shards],
            }
        )
    dataset_rows = []
    for dataset in datasets:
        tally = state.per_dataset[dataset.name]
        dataset_rows.append(
            {
                "name": dataset.name,
                "annotation": str(dataset.annotation),
                "root": str(dataset.root),
                "repeat_time": dataset.repeat_time,
                "records": tally.records,
                "written": tally.written,
                "skipped": tally.skipped,
            }
        )
    return {
        "format_version": MANIFEST_VERSION,
        "n_experts": splitter.router.n_experts,
        "clustering_fingerprint": splitter.router.fingerprint,
        "total_records": state.total,
        "written": sum(tally.samples for tally in splitter.tallies),
        "experts": experts,
        "datasets": dataset_rows,
        "text_only_records": state.text_only,
        "skipped_by_reason": dict(sorted(Counter(entry["reason"] for entry in state.skipped).items())),
        "skipped": state.skipped,
        "arguments": {**asdict(options), **arguments},
    }


def load_manifest(split_dir: str | Path) -> dict[str, Any]:
    """Read ``<split_dir>/manifest.json``.

    Raises:
        FileNotFoundError: the directory has no manifest, so the split is missing or unfinished.
    """
    path = Path(split_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {split_dir} is not a finished split. HINT: run clustering/split_dataset.py "
            "into it (an interrupted run writes no manifest), or configure the DataModule's source so "
            "that prepare_data builds it."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def make_feature_source(
    clip_model: str | None,
    features_path: str | Path | None = None,
    keys_path: str | Path | None = None,
    device: str | None = None,
    batch_size: int = 64,
) -> FeatureSource:
    """Return precomputed features when both paths are given, else a CLIP encoder.

    Raises:
        ValueError: only one of `features_path` and `keys_path` is given, or neither they nor
            `clip_model` are.
    """
    if (features_path is None) != (keys_path is None):
        raise ValueError(
            f"features={features_path!r} and keys={keys_path!r}: pass both or neither. HINT: they are "
            "the features.npy and keys.txt written together by extract_features.py."
        )
    if features_path is not None:
        return PrecomputedFeatures(features_path, keys_path)  # type: ignore[arg-type]
    if not clip_model:
        raise ValueError(
            "No features and no CLIP model given. HINT: pass --features and --keys, or --clip-model."
        )
    return ClipFeatures(clip_model, device=device, batch_size=batch_size)
