"""`RoutedEnsemble`: K trained experts answering one evaluation set, each sample by its route.

Each evaluation batch (``docs/architecture.md``) carries every sample's top-1 route ``expert`` and
its cosines ``route_scores`` to the K clusters, computed by ``clustering.router.Router`` from the
sample's CLIP image feature. Two modes:

- ``top1``: each sample is answered by its routed expert alone. The batch is grouped by expert and
  each expert greedy-decodes its group in one batched ``generate_answers`` call.
- ``soft``: every step decodes from the mixture ``sum_k w_k p_k(x_t | x_<t)`` with
  ``w = softmax(T * route_scores)``, optionally kept to the ``top_k`` largest weights. All
  experts read the same sequence, each with its own KV cache. ``T`` can be fitted on held-out
  sequences by the mixture log-likelihood (``fit_temperature_on``).

Run it with ``python cli.py validate --config configs/ensemble.yaml`` (or ``test``). It logs one
score per benchmark for the whole ensemble and for each expert's routed subset, the route counts
and the number of samples moved to a fallback expert, and writes a predictions jsonl file.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from clustering.router import Router
from clustering.shards import load_manifest
from lightning_modules.ensemble_routing import (
    DEFAULT_TEMPERATURE_GRID,
    TemperatureFit,
    count_image_tiles,
    fit_temperature,
    label_log_probs,
    mixture_greedy_decode,
    resolve_routes,
    routing_weights,
    select_samples,
)
from lightning_modules.export import SHARDED_METADATA, load_trained_expert
from lightning_modules.internvl_module import InternVLExpert, score_records
from lightning_modules.metrics import build_metric
from lightning_modules.predictions import records_from_batch, write_predictions
from lightning_modules.presets import IM_END, image_seq_length_of

log = logging.getLogger(__name__)

MODES = ("top1", "soft")
FALLBACKS = ("fail", "next_nearest")
ROUTE_SOURCES = ("expert", "route_scores")


def _is_exported(candidate: Path) -> bool:
    return candidate.is_dir() and (candidate / "config.json").is_file()


def _is_sharded(candidate: Path) -> bool:
    return candidate.is_dir() and (candidate / SHARDED_METADATA).is_file()


def _checkpoint_exists(path: str) -> bool:
    """True for a ``.ckpt`` file, a sharded checkpoint directory or an exported directory."""
    candidate = Path(path).expanduser()
    return candidate.is_file() or _is_exported(candidate) or _is_sharded(candidate)


def load_expert(path: str, expert_id: int, max_new_tokens: int | None = None) -> InternVLExpert:
    """Load one expert for evaluation, in eval mode on the CPU.

    Args:
        path: a Lightning checkpoint of ``InternVLExpert`` (a ``.ckpt`` file, or the sharded
            directory that ``ModelParallelStrategy`` writes), whose hyperparameters name the model
            and processor it was built from; or a ``save_pretrained`` directory that contains the
            model and its processor.
        expert_id: the position of this expert in the ensemble, written into its predictions.
        max_new_tokens: overrides the checkpoint's generation length when given.
    """
    candidate = Path(path).expanduser()
    if _is_exported(candidate):
        expert = InternVLExpert(model_name_or_path=str(candidate), expert_id=expert_id)
        expert.configure_model()
    else:
        expert = load_trained_expert(candidate)
        trained_as = expert.hparams.get("expert_id")
        if trained_as is not None and trained_as != expert_id:
            rank_zero_warn(
                f"Checkpoint {path} was trained as expert_id {trained_as} but sits at position {expert_id} of "
                f"the ensemble, so it answers cluster {expert_id}. HINT: list `checkpoints` in cluster order."
            )
        expert.hparams.expert_id = expert_id
    if max_new_tokens is not None:
        expert.hparams.max_new_tokens = max_new_tokens
    expert.eval()
    expert.requires_grad_(False)
    return expert


class RoutedEnsemble(LightningModule):
    """Evaluate K experts as one model, routing each sample by its CLIP feature's nearest centroid.

    Args:
        checkpoints: K expert checkpoints in cluster order: Lightning checkpoints of
            ``InternVLExpert`` (``.ckpt`` files or sharded FSDP directories) or exported
            ``save_pretrained`` directories with their processor. A path that does not
            exist is a missing expert (see ``fallback``).
        clustering_dir: the clustering results directory that routed the evaluation set; its
            number of clusters must equal ``len(checkpoints)``.
        mode: ``top1`` answers each sample with its routed expert; ``soft`` mixes all experts'
            next-token distributions at every step.
        temperature: T of the soft weights ``softmax(T * cos)``; T = 0 is the uniform mixture and a
            large T approaches top-1. Ignored in ``top1`` mode.
        top_k: in ``soft`` mode, keep only the k largest weights per sample; None keeps all.
        fit_temperature: in ``soft`` mode, before scoring, pick T from ``temperature_grid`` by
            the mixture log-likelihood of held-out sequences: those of ``fit_dir``, or in ``test``
            without ``fit_dir`` the datamodule's validation batches.
        temperature_grid: the candidate temperatures, each >= 0.
        fit_dir: an evaluation split (``split_dataset.py`` output) of held-out questions with
            answers, routed with the same clustering, for the temperature fit.
        fit_batches: the maximum number of batches read by the temperature fit.
        fallback: ``fail`` rejects missing checkpoints; ``next_nearest`` answers their samples with
            the available expert whose route score is highest and counts the moved samples.
        route_by: ``expert`` takes the route stored in the batch; ``route_scores`` routes again by
            the argmax of the stored cosines (the same decision when the shards were split with
            the same clustering).
        max_new_tokens: the maximum answer length in tokens; None keeps each checkpoint's setting
            (32 in soft mode).
        predictions_dir: where ``<stage>-ensemble-<mode>.jsonl`` is written; defaults to
            ``<log_dir>/predictions``.
    """

    def __init__(
        self,
        checkpoints: list[str],
        clustering_dir: str,
        mode: Literal["top1", "soft"] = "top1",
        temperature: float = 20.0,
        top_k: int | None = None,
        fit_temperature: bool = False,
        temperature_grid: tuple[float, ...] = DEFAULT_TEMPERATURE_GRID,
        fit_dir: str | None = None,
        fit_batches: int = 8,
        fallback: Literal["fail", "next_nearest"] = "fail",
        route_by: Literal["expert", "route_scores"] = "expert",
        max_new_tokens: int | None = None,
        predictions_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        router = Router.from_dir(clustering_dir)
        self.n_experts = router.n_experts
        self.clustering_fingerprint = router.fingerprint
        self.available_ids = [k for k, path in enumerate(checkpoints) if _checkpoint_exists(path)]
        self.missing_ids = [k for k in range(len(checkpoints)) if k not in self.available_ids]
        problems = self._validate_options(router)
        if problems:
            raise ValueError("Invalid RoutedEnsemble options:\n  - " + "\n  - ".join(problems))
        if self.missing_ids:
            rank_zero_warn(
                f"Expert checkpoints {[checkpoints[k] for k in self.missing_ids]} (experts {self.missing_ids}) are "
                "missing; their samples go to the nearest available expert (fallback: next_nearest)."
            )
        self.temperature = float(temperature)
        self.temperature_fit: TemperatureFit | None = None
        self.experts: nn.ModuleList | None = None
        self._slot: dict[int, int] = {}
        self._records: list[dict[str, Any]] = []

    def _validate_options(self, router: Router) -> list[str]:
        """Return every problem of the constructor options."""
        hp = self.hparams
        problems = []
        if len(hp.checkpoints) != router.n_experts:
            problems.append(
                f"got {len(hp.checkpoints)} expert checkpoints but {hp.clustering_dir} has {router.n_experts} "
                "clusters; give one checkpoint per cluster, in cluster order"
            )
        if hp.mode not in MODES:
            problems.append(f"mode must be one of {MODES}, got {hp.mode!r}")
        if hp.fallback not in FALLBACKS:
            problems.append(f"fallback must be one of {FALLBACKS}, got {hp.fallback!r}")
        if hp.route_by not in ROUTE_SOURCES:
            problems.append(f"route_by must be one of {ROUTE_SOURCES}, got {hp.route_by!r}")
        if hp.top_k is not None and not 1 <= hp.top_k <= len(hp.checkpoints):
            problems.append(
                f"top_k must be in [1, {len(hp.checkpoints)}] (the number of experts), got {hp.top_k}"
            )
        if not hp.temperature >= 0:
            problems.append(f"temperature must be >= 0, got {hp.temperature}")
        if hp.fit_temperature and (not hp.temperature_grid or min(hp.temperature_grid) < 0):
            problems.append(
                f"temperature_grid must be a non-empty list of values >= 0, got {hp.temperature_grid}"
            )
        if hp.fit_batches < 1:
            problems.append(f"fit_batches must be >= 1, got {hp.fit_batches}")
        if hp.max_new_tokens is not None and hp.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {hp.max_new_tokens}")
        if not self.available_ids:
            problems.append(f"none of the expert checkpoints exists: {hp.checkpoints}")
        elif self.missing_ids and hp.fallback == "fail":
            missing = ", ".join(f"expert {k}: {hp.checkpoints[k]}" for k in self.missing_ids)
            problems.append(
                f"expert checkpoints not found ({missing}). HINT: fix the paths, or set fallback: next_nearest "
                "to answer their samples with the nearest available expert"
            )
        return problems

    # ------------------------------------------------------------------------------------------
    # Model construction
    # ------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Check that the evaluation splits were routed by ``clustering_dir``. Runs on every rank.

        The routes are read from the split, so a split made with another clustering of the same K
        would send questions to experts trained on other clusters without any other sign.
        """
        datamodule = self.trainer.datamodule
        for split_dir in (getattr(datamodule, "eval_dir", None), self.hparams.fit_dir):
            if split_dir is not None:
                check_split_clustering(split_dir, self.clustering_fingerprint, self.hparams.clustering_dir)

    def configure_model(self) -> None:
        """Load the available experts (every rank loads all of them). Idempotent."""
        if self.experts is not None:
            return
        loaded = []
        for k in self.available_ids:
            loaded.append(load_expert(self.hparams.checkpoints[k], k, self.hparams.max_new_tokens))
            self._slot[k] = len(loaded) - 1
        _check_same_tokenizer(loaded, [self.hparams.checkpoints[k] for k in self.available_ids])
        self.experts = nn.ModuleList(loaded)
        rank_zero_info(
            f"Routed ensemble ({self.hparams.mode}): experts {self.available_ids} loaded"
            + (f", experts {self.missing_ids} missing" if self.missing_ids else "")
        )

    def expert(self, k: int) -> InternVLExpert:
        """Return the loaded expert of cluster ``k``."""
        return self.experts[self._slot[k]]

    @property
    def tokenizer(self) -> Any:
        """The tokenizer that all experts share."""
        return self.experts[0].load_processor().tokenizer

    def _available_mask(self) -> torch.Tensor:
        mask = torch.zeros(self.n_experts, dtype=torch.bool, device=self.device)
        mask[self.available_ids] = True
        return mask

    # ------------------------------------------------------------------------------------------
    # Routing and answering
    # ------------------------------------------------------------------------------------------

    def route_batch(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (routed, answering, moved), each (B,): the route, the expert that answers, and moved rows."""
        route_scores = batch.get("route_scores")
        if route_scores is not None:
            if route_scores.ndim != 2 or route_scores.shape[1] != self.n_experts:
                raise ValueError(
                    f"batch route_scores have shape {tuple(route_scores.shape)}, expected (B, {self.n_experts}). "
                    "HINT: evaluate shards split with the same clustering results as the ensemble."
                )
            if bool(torch.isnan(route_scores).any()):
                route_scores = None  # shards written without route scores; the collate fills in NaN
        if self.hparams.route_by == "route_scores":
            if route_scores is None:
                raise ValueError(
                    "route_by: route_scores needs finite batch['route_scores'], and the batch has none."
                )
            routed = route_scores.argmax(dim=1)
        else:
            routed = batch["expert"].to(self.device)
        if bool(((routed < 0) | (routed >= self.n_experts)).any()):
            raise ValueError(f"batch routes {routed.tolist()} fall outside [0, {self.n_experts}).")
        answering, moved = resolve_routes(routed, route_scores, self._available_mask(), self.hparams.fallback)
        return routed, answering, moved

    def answer_top1(self, batch: dict[str, Any], answering: torch.Tensor) -> list[str]:
        """Answer each row with expert ``answering[i]``, one batched generation per expert."""
        answers: list[str] = [""] * len(answering)
        tiles = self._tiles(batch)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        for k in self.available_ids:
            rows = torch.nonzero(answering == k).flatten().tolist()
            if not rows:
                if distributed:
                    # Generation under FSDP or with synced GPUs needs every rank to call each expert
                    # equally often, so a rank without rows for expert k decodes row 0 and drops it.
                    self.expert(k).generate_answers(select_samples(batch, [0], tiles))
                continue
            group_answers = self.expert(k).generate_answers(select_samples(batch, rows, tiles))
            for row, answer in zip(rows, group_answers, strict=True):
                answers[row] = answer
        return answers

    def answer_soft(self, batch: dict[str, Any], route_scores: torch.Tensor) -> list[str]:
        """Answer every row from the mixture of all available experts with the current temperature."""
        weights = routing_weights(route_scores, self.temperature, self.hparams.top_k, self._available_mask())
        models = [self.expert(k).model if k in self._slot else None for k in range(self.n_experts)]
        tokenizer = self.tokenizer
        max_new_tokens = (
            self.hparams.max_new_tokens or self.expert(self.available_ids[0]).hparams.max_new_tokens
        )
        tokens = mixture_greedy_decode(
            models,
            batch["prompt_input_ids"],
            batch["prompt_attention_mask"],
            batch.get("pixel_values"),
            weights,
            max_new_tokens=max_new_tokens,
            eos_token_id=_stop_token_ids(self.expert(self.available_ids[0]).model, tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )
        return [text.strip() for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)]

    def answer_batch(
        self, batch: dict[str, Any]
    ) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Answer an evaluation batch in the configured mode.

        Returns:
            answers: B strings.
            routed: (B,) the route of each row.
            answering: (B,) the expert that answered it (the top-1 available expert in soft mode).
            moved: (B,) bool, rows whose routed expert is missing.
        """
        routed, answering, moved = self.route_batch(batch)
        if self.hparams.mode == "top1":
            answers = self.answer_top1(batch, answering)
        else:
            route_scores = batch.get("route_scores")
            if route_scores is None or bool(torch.isnan(route_scores).any()):
                raise ValueError(
                    "soft mode needs batch['route_scores'] (B, K) and the batch has none or NaN. HINT: split "
                    "the evaluation set with split_dataset.py, which stores every sample's route scores."
                )
            answers = self.answer_soft(batch, route_scores)
        return answers, routed, answering, moved

    def _tiles(self, batch: dict[str, Any]) -> list[int]:
        config = self.expert(self.available_ids[0]).model.config
        return count_image_tiles(
            batch["prompt_input_ids"], config.image_token_id, image_seq_length_of(config)
        )

    # ------------------------------------------------------------------------------------------
    # Evaluation loop
    # ------------------------------------------------------------------------------------------

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Return one prediction record per question of an evaluation batch."""
        answers, routed, answering, moved = self.answer_batch(batch)
        return self._records_for(batch, answers, routed, answering)

    def _records_for(
        self, batch: dict[str, Any], answers: list[str], routed: torch.Tensor, answering: torch.Tensor
    ) -> list[dict[str, Any]]:
        records = records_from_batch(batch, answers, answering.tolist())
        for record, route in zip(records, routed.tolist(), strict=True):
            record["routed_expert"] = route
            record["mode"] = self.hparams.mode
        return records

    def _evaluation_step(self, batch: dict[str, Any], stage: str) -> None:
        answers, routed, answering, moved = self.answer_batch(batch)
        self._records.extend(self._records_for(batch, answers, routed, answering))

    def _finish_evaluation(self, stage: str) -> None:
        """Gather all ranks' records, log combined and per-expert scores and route counts, write predictions.

        Every rank ends up with the same records, so the scores are computed on each rank and
        logged without a further reduction.
        """
        records = self._records
        self._records = []
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[list[dict[str, Any]] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, records)
            records = [record for part in gathered for record in part]
        # A distributed sampler repeats samples to even out the ranks; score each question once.
        unique = {(r["benchmark"], r["question_id"]): r for r in records}
        records = sorted(unique.values(), key=lambda r: (r["benchmark"], r["question_id"]))
        if not records:
            return

        summary = self.summarize(records)
        for key, value in summary.items():
            self.log(f"{stage}/{key}", value, on_step=False, on_epoch=True, sync_dist=False)
        moved = int(summary["moved_samples"])
        if moved:
            rank_zero_warn(
                f"{moved} of {len(records)} {stage} samples were routed to missing experts {self.missing_ids} "
                "and answered by the nearest available expert."
            )
        if self.trainer.sanity_checking:
            return
        if self.trainer.is_global_zero:
            path = self._predictions_path(stage)
            write_predictions(path, records)
            scores = ", ".join(
                f"{key} {value:.4f}" for key, value in summary.items() if "/expert_" not in key
            )
            rank_zero_info(f"{stage} routed ensemble ({self.hparams.mode}): {scores}; predictions in {path}")

    def summarize(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Score prediction records as the ensemble logs them.

        Returns a flat dict of: ``<benchmark>/<metric>`` over all records;
        ``<benchmark>/expert_<k>/<metric>`` over the records answered by expert k;
        ``route_count/expert_<k>`` (samples routed to k); ``moved_samples`` (samples whose routed
        expert was missing); and ``temperature`` in soft mode.
        """
        summary: dict[str, float] = {}
        for benchmark, score in score_records(list(records)).items():
            summary[f"{benchmark}/{_metric_name(benchmark)}"] = score
        by_expert: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for record in records:
            by_expert[record["expert"]].append(record)
        for k, group in sorted(by_expert.items()):
            for benchmark, score in score_records(group).items():
                summary[f"{benchmark}/expert_{k}/{_metric_name(benchmark)}"] = score
        route_counts = Counter(record["routed_expert"] for record in records)
        for k in range(self.n_experts):
            summary[f"route_count/expert_{k}"] = float(route_counts.get(k, 0))
        summary["moved_samples"] = float(sum(r["routed_expert"] != r["expert"] for r in records))
        if self.hparams.mode == "soft":
            summary["temperature"] = self.temperature
        return summary

    def _predictions_path(self, stage: str) -> Path:
        directory = self.hparams.predictions_dir
        if directory is None:
            directory = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "predictions"
        return Path(directory) / f"{stage}-ensemble-{self.hparams.mode}.jsonl"

    # ------------------------------------------------------------------------------------------
    # Temperature fit
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def fit_temperature_on(
        self, batches: Iterable[dict[str, Any]], max_batches: int | None = None
    ) -> TemperatureFit:
        """Pick T from ``temperature_grid`` by the mixture log-likelihood of held-out sequences and use it.

        Args:
            batches: evaluation batches with ``input_ids``, ``attention_mask``, ``labels``,
                ``pixel_values`` and ``route_scores``; their answers are scored by teacher forcing.
            max_batches: stop after this many batches; None reads them all.
        """
        log_prob_parts, score_parts = [], []
        n_sequences = 0
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            batch = move_data_to_device(batch, self.device)
            route_scores = batch.get("route_scores")
            if route_scores is None or bool(torch.isnan(route_scores).any()):
                raise ValueError("the temperature fit needs finite batch['route_scores'] (B, K).")
            columns, rows = [], None
            for k in range(self.n_experts):
                if k in self._slot:
                    token_log_probs, rows = label_log_probs(self.expert(k).model, batch)
                    columns.append(token_log_probs)
                else:
                    columns.append(None)
            filler = torch.zeros_like(next(c for c in columns if c is not None))
            log_prob_parts.append(torch.stack([filler if c is None else c for c in columns], dim=1))  # (N, K)
            score_parts.append(route_scores[rows])  # (N, K)
            n_sequences += route_scores.shape[0]
        if not log_prob_parts:
            raise ValueError("no held-out batches to fit the temperature on.")
        fit = fit_temperature(
            torch.cat(log_prob_parts),
            torch.cat(score_parts),
            self.hparams.temperature_grid,
            self.hparams.top_k,
            self._available_mask(),
            n_sequences=n_sequences,
        )
        self.temperature = fit.temperature
        self.temperature_fit = fit
        table = ", ".join(f"T={t:g}: {ll:.4f}" for t, ll in zip(fit.temperatures, fit.per_token, strict=True))
        rank_zero_info(
            f"Fitted soft-routing temperature T={fit.temperature:g} on {fit.n_sequences} sequences "
            f"({fit.n_tokens} tokens); mean log-likelihood per token: {table}"
        )
        return fit

    def on_validation_start(self) -> None:
        """Fit the soft-routing temperature on ``fit_dir`` when asked to."""
        if not self._fits_temperature() or self.trainer.sanity_checking:
            return
        if self.hparams.fit_dir is None:
            raise RuntimeError(
                "fit_temperature is on without fit_dir, so T would be fitted on the validation split that is "
                "then scored. HINT: set fit_dir to a held-out evaluation split, run `cli.py test` (which fits on "
                "the validation split and scores the test split), or set fit_temperature: false."
            )
        self._fit_and_broadcast(self._fit_dir_dataloader())

    def on_test_start(self) -> None:
        """Fit the soft-routing temperature on ``fit_dir`` or the datamodule's validation batches."""
        if not self._fits_temperature():
            return
        if self.hparams.fit_dir is not None:
            self._fit_and_broadcast(self._fit_dir_dataloader())
            return
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "val_dataloader"):
            raise RuntimeError(
                "fit_temperature needs fit_dir or a datamodule with a val_dataloader of held-out sequences."
            )
        val_loader = datamodule.val_dataloader()
        test_loader = self.trainer.test_dataloaders
        test_datasets = [
            loader.dataset for loader in (test_loader if isinstance(test_loader, list) else [test_loader])
        ]
        if any(getattr(val_loader, "dataset", None) is dataset for dataset in test_datasets):
            raise RuntimeError(
                f"fit_temperature: {type(datamodule).__name__} returns the same dataset for validation and test, "
                "so T would be fitted on the test questions. HINT: set fit_dir to a held-out evaluation split."
            )
        self._fit_and_broadcast(val_loader)

    def _fits_temperature(self) -> bool:
        return bool(self.hparams.fit_temperature) and self.hparams.mode == "soft"

    def _fit_and_broadcast(self, batches: Iterable[dict[str, Any]]) -> None:
        fit = self.fit_temperature_on(batches, max_batches=self.hparams.fit_batches)
        # Ranks may read different shards; all use rank 0's choice.
        self.temperature = float(self.trainer.strategy.broadcast(fit.temperature, src=0))

    def _fit_dir_dataloader(self) -> Iterable[dict[str, Any]]:
        """Return a DataLoader over the held-out split ``fit_dir``, encoded with the experts' processor."""
        from datamodules.chat import ConversationEncoder
        from datamodules.collate import EvalSampleEncoder
        from datamodules.evaluation import EvalShardDataset

        processor = self.expert(self.available_ids[0]).load_processor()
        datamodule = self.trainer.datamodule
        encoder = ConversationEncoder(
            processor,
            max_length=getattr(datamodule, "max_length", 8192),
            system_message=getattr(datamodule, "system_message", None),
        )
        dataset = EvalShardDataset(self.hparams.fit_dir, EvalSampleEncoder(encoder, self.n_experts))
        batch_size = getattr(datamodule, "batch_size", 8)
        return dataset.dataloader(batch_size, num_workers=0, pad_token_id=processor.tokenizer.pad_token_id)


def check_split_clustering(split_dir: str | Path, fingerprint: str, clustering_dir: str) -> None:
    """Raise when the split at ``split_dir`` was routed by a clustering other than ``clustering_dir``.

    Compares the ``clustering_fingerprint`` that `split_dataset.py` records in the manifest with the
    fingerprint of the router loaded from ``clustering_dir``. A manifest without one (an older split)
    is accepted with a warning, because its routes cannot be checked.
    """
    manifest = load_manifest(split_dir)
    recorded = manifest.get("clustering_fingerprint")
    if recorded is None:
        rank_zero_warn(
            f"{split_dir}/manifest.json records no clustering fingerprint, so its routes cannot be checked "
            f"against {clustering_dir}. HINT: re-run clustering/split_dataset.py to record one."
        )
        return
    if recorded != fingerprint:
        used = manifest.get("arguments", {}).get("clustering_results_dir", "unknown")
        raise ValueError(
            f"{split_dir} was routed by another clustering ({used}, fingerprint {recorded}) than clustering_dir "
            f"{clustering_dir} (fingerprint {fingerprint}), so its questions would reach experts trained on other "
            f"clusters. HINT: split the evaluation set with --clustering-results-dir {clustering_dir}, the "
            "clustering the experts were trained on."
        )


def _stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Return the ids that end an answer: the model's generation EOS ids, or ``<|im_end|>``."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        return [tokenizer.convert_tokens_to_ids(IM_END)]
    return [eos] if isinstance(eos, int) else list(eos)


def _metric_name(benchmark: str) -> str:
    return build_metric(benchmark).metric_name


def _check_same_tokenizer(experts: Sequence[InternVLExpert], paths: Sequence[str]) -> None:
    """Raise ``ValueError`` unless every expert's tokenizer has the same vocabulary as the first's."""
    reference = experts[0].load_processor().tokenizer.get_vocab()
    for expert, path in zip(experts[1:], paths[1:], strict=True):
        vocabulary = expert.load_processor().tokenizer.get_vocab()
        if vocabulary != reference:
            raise ValueError(
                f"expert {path} has a tokenizer of {len(vocabulary)} tokens that differs from {paths[0]} "
                f"({len(reference)} tokens). The evaluation prompts are tokenized once, so all experts must "
                "share one tokenizer. HINT: train every expert from the same base checkpoint or processor."
            )
