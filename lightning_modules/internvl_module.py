"""`InternVLExpert`: one InternVL expert (or the dense baseline) as a LightningModule.

The model is transformers' native `InternVLForConditionalGeneration`, built in `configure_model` so that
a sharding strategy can wrap it before it is moved to the device. Under Lightning's `ModelParallelStrategy`
every vision-encoder layer and every decoder layer becomes its own FSDP2 `fully_shard` unit, then the
root module; under `FSDPStrategy` the strategy wraps the model with its own auto-wrap policy.

Training consumes the batch dict of `docs/architecture.md` (`input_ids`, `attention_mask`, `labels`,
`pixel_values`). Validation and test compute the loss and, for batches that carry
`prompt_input_ids`, greedy answers that are scored with `lightning_modules.metrics.build_metric` and
written as predictions jsonl with `lightning_modules.predictions.write_predictions`.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.distributed.fsdp import FSDPModule
from transformers import (
    AutoConfig,
    AutoProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    ProcessorMixin,
    get_cosine_schedule_with_warmup,
)

from lightning_modules.metrics import build_metric
from lightning_modules.predictions import records_from_batch, write_predictions
from lightning_modules.presets import (
    IM_END,
    PRESETS,
    build_model_config,
    check_image_seq_length,
    image_seq_length_of,
)

log = logging.getLogger(__name__)

# The three parts of the model that `train_parts` can select, by parameter-name prefix of
# `InternVLForConditionalGeneration` (transformers 5). `lm_head` is tied to the input embeddings in
# InternVL 2.5-1B, so it trains with the LLM.
MODEL_PARTS: dict[str, tuple[str, ...]] = {
    "vision": ("model.vision_tower.",),
    "projector": ("model.multi_modal_projector.",),
    "llm": ("model.language_model.", "lm_head."),
}


class InternVLExpert(LightningModule):
    """Full-parameter training and evaluation of one InternVL model.

    Args:
        model_name_or_path: Hugging Face id or local directory of an HF-native InternVL checkpoint
            (`model_type: internvl`). Original-layout checkpoints (`internvl_chat`) must first go through
            `lightning_modules/convert_checkpoint.py`. Mutually exclusive with `preset`.
        preset: name of an architecture preset (`lightning_modules.presets.PRESETS`), built with random
            weights. Needs `processor_name_or_path`.
        processor_name_or_path: directory or id of the `InternVLProcessor`; defaults to
            `model_name_or_path`.
        train_parts: which parts receive gradients, a subset of `vision`, `projector`, `llm`. All three by
            default (full-parameter training).
        learning_rate: peak AdamW learning rate.
        weight_decay: AdamW weight decay on matrices and embeddings; biases, norms and layer scales
            (1-D parameters) get none.
        warmup_ratio: share of the total optimiser steps with linear warmup from 0, followed by cosine decay
            to 0.
        adam_betas: AdamW betas.
        adam_eps: AdamW epsilon.
        gradient_checkpointing: recompute each layer's activations in the backward pass (less memory, about
            a third more compute).
        attn_implementation: transformers attention backend: `sdpa`, `eager` or `flash_attention_2`.
        max_new_tokens: longest greedy answer generated in validation and test, in tokens.
        expert_id: the expert this module trains, written into every prediction record (0 for the dense
            baseline).
        predictions_dir: where validation and test predictions go; defaults to `<log_dir>/predictions`.
        log_throughput: log `train/samples_per_sec` and `train/tokens_per_sec` (one small all-reduce per
            step).
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        preset: str | None = None,
        processor_name_or_path: str | None = None,
        train_parts: tuple[str, ...] = ("vision", "projector", "llm"),
        learning_rate: float = 4e-5,
        weight_decay: float = 0.05,
        warmup_ratio: float = 0.03,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        gradient_checkpointing: bool = False,
        attn_implementation: str = "sdpa",
        max_new_tokens: int = 32,
        expert_id: int = 0,
        predictions_dir: str | None = None,
        log_throughput: bool = True,
    ) -> None:
        super().__init__()
        problems = _validate_options(
            model_name_or_path, preset, processor_name_or_path, train_parts, warmup_ratio, max_new_tokens
        )
        if problems:
            raise ValueError("Invalid InternVLExpert options:\n  - " + "\n  - ".join(problems))
        self.save_hyperparameters()
        self.model: InternVLForConditionalGeneration | None = None
        self.processor: ProcessorMixin | None = None
        self._eval_records: list[dict[str, Any]] = []
        self._last_step_end: float | None = None
        self._checked_batch_stages: set[str] = set()

    # ------------------------------------------------------------------------------------------
    # Model construction
    # ------------------------------------------------------------------------------------------

    def load_processor(self) -> ProcessorMixin:
        """Load (once) and return the processor of this model."""
        if self.processor is None:
            path = self.hparams.processor_name_or_path or self.hparams.model_name_or_path
            self.processor = _load_pretrained(AutoProcessor, path, description="processor")
        return self.processor

    def build_model(self, load_weights: bool = True) -> InternVLForConditionalGeneration:
        """Build the model from the checkpoint or the preset, without any sharding.

        Args:
            load_weights: load the checkpoint's weights; `False` builds the checkpoint's architecture with
                random weights, for callers that load a state dict next (export, tests).

        Raises:
            FileNotFoundError: the checkpoint path does not exist.
            ValueError: the checkpoint is not an HF-native InternVL model, or its image-token count
                differs from the processor's.
        """
        processor = self.load_processor()
        name_or_path = self.hparams.model_name_or_path
        # Lightning's init context sets the default dtype (float32, or bfloat16 with "bf16-true").
        dtype = torch.get_default_dtype()
        if name_or_path is None:
            config = build_model_config(self.hparams.preset, processor.tokenizer)
            config._attn_implementation = self.hparams.attn_implementation
            model = InternVLForConditionalGeneration(config)
        else:
            config = _load_internvl_config(name_or_path)
            if load_weights:
                model = InternVLForConditionalGeneration.from_pretrained(
                    name_or_path, dtype=dtype, attn_implementation=self.hparams.attn_implementation
                )
            else:
                config._attn_implementation = self.hparams.attn_implementation
                model = InternVLForConditionalGeneration(config)
        check_image_seq_length(model.config, processor)
        model.to(dtype)
        _set_trainable_parts(model, self.hparams.train_parts)
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
        model.generation_config.eos_token_id = _stop_token_ids(processor)
        if self.hparams.gradient_checkpointing:
            # transformers 5.x renamed the method; `gradient_checkpointing_enable` is the 4.x name.
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def configure_model(self) -> None:
        """Build the model, then shard it when the strategy is `ModelParallelStrategy`.

        Runs on every rank, inside the strategy's init context, before the optimiser is created. It is
        idempotent because Lightning calls it again for `validate`/`test` after `fit`.
        """
        if self.model is not None:
            return
        model = self.build_model()
        # from_pretrained returns the model in eval mode, and Lightning keeps each submodule's mode
        # when fit starts, so without this a checkpoint with dropout would train without it.
        model.train()
        n_params = sum(p.numel() for p in model.parameters())
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rank_zero_info(
            f"InternVL model: {n_params / 1e6:.1f}M parameters, {n_trainable / 1e6:.1f}M trainable "
            f"({', '.join(self.hparams.train_parts)}), {image_seq_length_of(model.config)} image tokens per tile"
        )
        if self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy):
            _fully_shard_layers(model, self.device_mesh, str(self.trainer.precision))
        self.model = model

    # ------------------------------------------------------------------------------------------
    # Optimisation
    # ------------------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW on the trainable parameters, linear warmup then cosine decay, stepped every optimiser step."""
        decay, no_decay = [], []
        for parameter in self.model.parameters():
            if not parameter.requires_grad:
                continue
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.learning_rate,
            betas=tuple(self.hparams.adam_betas),
            eps=self.hparams.adam_eps,
        )
        total_steps = int(self.trainer.estimated_stepping_batches)
        if total_steps <= 0 or total_steps == math.inf:
            raise ValueError(
                f"Cannot size the cosine schedule: the trainer runs {total_steps} optimiser steps. "
                "HINT: set trainer.max_steps or trainer.max_epochs."
            )
        warmup_steps = math.ceil(self.hparams.warmup_ratio * total_steps)
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
        rank_zero_info(
            f"AdamW lr {self.hparams.learning_rate:g}, weight decay {self.hparams.weight_decay:g}, "
            f"{warmup_steps} warmup steps of {total_steps}"
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the total gradient L2 norm before clipping (all ranks join the norm's all-reduce)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2: reduce the per-shard norms
            norm = norm.full_tensor()
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------------------------------
    # Steps
    # ------------------------------------------------------------------------------------------

    def forward(self, batch: dict[str, Any]) -> Tensor:
        """Return the mean next-token loss over the `labels` that are not -100.

        Args:
            batch: `input_ids`, `attention_mask`, `labels` of shape (B, L); `pixel_values` (T, 3, H, W)
                or None.
        """
        output = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch.get("pixel_values"),
            labels=batch["labels"],
            use_cache=False,
        )
        return output.loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        self._check_batch(batch, "train")
        loss = self(batch)
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            self.log("train/lr", scheduler.get_last_lr()[0], on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        """Log samples/s and tokens/s over all ranks, from the wall time between two batch ends."""
        if not self.hparams.log_throughput:
            return
        now = time.perf_counter()
        if self._last_step_end is not None:
            seconds = now - self._last_step_end
            counts = torch.tensor(
                [batch["input_ids"].shape[0], batch["attention_mask"].sum().item()],
                dtype=torch.float64,
                device=self.device,
            )
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
            self.log("train/samples_per_sec", counts[0].item() / seconds, on_step=True, on_epoch=False)
            self.log("train/tokens_per_sec", counts[1].item() / seconds, on_step=True, on_epoch=False)
        self._last_step_end = now

    def on_validation_start(self) -> None:
        # Validation inside `fit` is not training throughput: restart the clock after it.
        self._last_step_end = None

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Log `val/loss`; return `{"answers": [...]}` (B greedy answers) for batches with prompts.

        The returned answers let callbacks such as the routing callback reuse them without decoding again.
        """
        return self._evaluation_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Log `test/loss`; return `{"answers": [...]}` for batches with prompts."""
        return self._evaluation_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Return one prediction record per question of an evaluation batch; the epoch end writes them all."""
        answers = self.generate_answers(batch)
        records = records_from_batch(batch, answers, [self.hparams.expert_id] * len(answers))
        self._eval_records.extend(records)
        return records

    def on_predict_epoch_end(self) -> None:
        self._finish_evaluation("predict")

    # ------------------------------------------------------------------------------------------
    # Generation and evaluation
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_answers(self, batch: dict[str, Any]) -> list[str]:
        """Greedy-decode one answer per prompt of an evaluation batch.

        Args:
            batch: `prompt_input_ids` and `prompt_attention_mask` of shape (B, Lp), left-padded and ending
                in `<|im_start|>assistant\\n`; `pixel_values` (T, 3, H, W) or None.

        Returns:
            B answers, decoded without special tokens and stripped of surrounding whitespace.
        """
        prompt_ids = batch["prompt_input_ids"]
        # Under FSDP every rank must run the same number of forward passes, because each one all-gathers
        # parameters. `synced_gpus` keeps finished ranks stepping until all ranks are done.
        synced = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        # transformers 5 computes the image features in `generate` before the first forward, outside
        # the root module's FSDP2 hooks, so the root's parameters (vision embeddings, projector) are
        # gathered here by hand.
        root_sharded = isinstance(self.model, FSDPModule)
        if root_sharded:
            self.model.unshard()
        try:
            sequences = self.model.generate(
                input_ids=prompt_ids,
                attention_mask=batch["prompt_attention_mask"],
                pixel_values=batch.get("pixel_values"),
                max_new_tokens=self.hparams.max_new_tokens,
                do_sample=False,
                num_beams=1,
                synced_gpus=synced,
            )
        finally:
            if root_sharded:
                self.model.reshard()
        new_tokens = sequences[:, prompt_ids.shape[1] :]  # (B, generated)
        texts = self.load_processor().tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [text.strip() for text in texts]

    def _evaluation_step(self, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        self._check_batch(batch, stage)
        batch_size = batch["input_ids"].shape[0]
        outputs: dict[str, Any] = {}
        if "labels" in batch:
            loss = self(batch)
            self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=batch_size)
            outputs["loss"] = loss
        if "prompt_input_ids" in batch:
            answers = self.generate_answers(batch)
            self._eval_records.extend(records_from_batch(batch, answers, [self.hparams.expert_id] * batch_size))
            outputs["answers"] = answers
        return outputs

    def _finish_evaluation(self, stage: str) -> None:
        """Gather the records of all ranks, log one score per benchmark and write the predictions."""
        records = self._eval_records
        self._eval_records = []
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[list[dict[str, Any]] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, records)
            records = [record for part in gathered for record in part]
        if not records:
            return
        # A distributed sampler repeats samples to even out the ranks; score every question once.
        unique = {(r["benchmark"], r["question_id"]): r for r in records}
        records = sorted(unique.values(), key=lambda r: (r["benchmark"], r["question_id"]))

        scores = score_records(records)
        # Lightning allows no `self.log` in prediction; its scores only go to the log line below.
        if stage != "predict":
            for benchmark, score in scores.items():
                # Every rank has the same gathered records, so no further sync is needed.
                name = f"{stage}/{benchmark}/{build_metric(benchmark).metric_name}"
                self.log(name, score, on_step=False, on_epoch=True, sync_dist=False)
        if self.trainer.sanity_checking:
            return
        if self.trainer.is_global_zero:
            path = self._predictions_path(stage)
            n_lines = write_predictions(path, records)
            summary = ", ".join(f"{name} {value:.4f}" for name, value in scores.items())
            rank_zero_info(f"{stage} step {self.global_step}: {summary}; {n_lines} predictions in {path}")

    def _predictions_path(self, stage: str) -> Path:
        directory = self.hparams.predictions_dir
        if directory is None:
            directory = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "predictions"
        return Path(directory) / f"{stage}-expert{self.hparams.expert_id}-step{self.global_step:07d}.jsonl"

    def _check_batch(self, batch: dict[str, Any], stage: str) -> None:
        """Check the first batch of each stage: image-token count and tiles must agree with the model."""
        if stage in self._checked_batch_stages:
            return
        self._checked_batch_stages.add(stage)
        pixel_values = batch.get("pixel_values")
        config: InternVLConfig = self.model.config
        n_image_tokens = int((batch["input_ids"] == config.image_token_id).sum())
        n_tiles = 0 if pixel_values is None else pixel_values.shape[0]
        per_tile = image_seq_length_of(config)
        if n_image_tokens != n_tiles * per_tile:
            raise ValueError(
                f"The first {stage} batch has {n_image_tokens} image tokens (id {config.image_token_id}) for "
                f"{n_tiles} image tiles, but the model expects {per_tile} tokens per tile "
                f"({n_tiles * per_tile} in all). HINT: build the batches with this model's processor "
                f"(image_seq_length={per_tile}) and keep whole images when truncating to the context length."
            )


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def score_records(records: list[dict[str, Any]]) -> dict[str, float]:
    """Score prediction records per benchmark with `build_metric`; return {benchmark: score in [0, 1]}."""
    by_benchmark: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_benchmark[record["benchmark"]].append(record)
    scores = {}
    for benchmark, group in sorted(by_benchmark.items()):
        metric = build_metric(benchmark)
        metric.update([r["answer"] for r in group], [r["gt_answers"] for r in group])
        scores[benchmark] = float(metric.compute())
    return scores


def _validate_options(
    model_name_or_path: str | None,
    preset: str | None,
    processor_name_or_path: str | None,
    train_parts: tuple[str, ...],
    warmup_ratio: float,
    max_new_tokens: int,
) -> list[str]:
    """Return every problem of the constructor options (an empty list when they are valid)."""
    problems = []
    if (model_name_or_path is None) == (preset is None):
        problems.append(
            f"give exactly one of model_name_or_path ({model_name_or_path!r}) and preset ({preset!r})"
        )
    if preset is not None and preset not in PRESETS:
        problems.append(f"unknown preset {preset!r}; valid presets: {', '.join(sorted(PRESETS))}")
    if preset is not None and processor_name_or_path is None:
        problems.append(
            f"preset {preset!r} needs processor_name_or_path (HINT: build one with "
            "lightning_modules.presets.build_small_processor)"
        )
    unknown = sorted(set(train_parts) - set(MODEL_PARTS))
    if unknown or not train_parts:
        problems.append(f"train_parts {list(train_parts)} must be a non-empty subset of {list(MODEL_PARTS)}")
    if not 0.0 <= warmup_ratio < 1.0:
        problems.append(f"warmup_ratio {warmup_ratio} must be in [0, 1)")
    if max_new_tokens < 1:
        problems.append(f"max_new_tokens {max_new_tokens} must be at least 1")
    return problems


def _looks_like_local_path(name_or_path: str) -> bool:
    """True for strings that cannot be a Hub id ("org/name"): absolute, relative-dot, home or deep paths."""
    return name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1


def _load_pretrained(auto_class: Any, name_or_path: str, description: str) -> Any:
    """Call `auto_class.from_pretrained(name_or_path)`, with errors that name the value and the fix."""
    if _looks_like_local_path(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(
            f"The {description} path {name_or_path!r} does not exist. HINT: check the path, or give a Hugging Face id "
            "such as OpenGVLab/InternVL3-1B-hf."
        )
    try:
        return auto_class.from_pretrained(name_or_path)
    except OSError as error:
        raise FileNotFoundError(
            f"Could not load the {description} from {name_or_path!r}: it is not a local directory and could not be "
            f"fetched from the Hugging Face Hub ({error}). HINT: pass an existing directory, or a Hub id "
            "with network access (unset HF_HUB_OFFLINE)."
        ) from error


def _load_internvl_config(name_or_path: str) -> InternVLConfig:
    """Load a checkpoint's config and check that it is an HF-native InternVL model."""
    config = _load_pretrained(AutoConfig, name_or_path, description="checkpoint config")
    if isinstance(config, InternVLConfig):
        return config
    model_type = getattr(config, "model_type", type(config).__name__)
    if model_type == "internvl_chat":
        hint = (
            "it is an original-layout InternVL checkpoint; convert it first with "
            f"`python lightning_modules/convert_checkpoint.py {name_or_path} OUTPUT_DIR` and load OUTPUT_DIR"
        )
    else:
        hint = "give an InternVL checkpoint (model_type 'internvl'), or a preset name instead"
    raise ValueError(
        f"Checkpoint {name_or_path!r} has model_type {model_type!r}, not 'internvl'. HINT: {hint}."
    )


def _set_trainable_parts(model: InternVLForConditionalGeneration, train_parts: tuple[str, ...]) -> None:
    """Freeze every parameter outside the selected parts (see `MODEL_PARTS`)."""
    prefixes = tuple(prefix for part in train_parts for prefix in MODEL_PARTS[part])
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(prefixes))


def _stop_token_ids(processor: ProcessorMixin) -> list[int]:
    """Token ids that end a greedy answer: `<|im_end|>` and the tokenizer's EOS and pad tokens."""
    tokenizer = processor.tokenizer
    candidates = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.eos_token_id, tokenizer.pad_token_id]
    stop_ids: list[int] = []
    for token_id in candidates:
        if token_id is not None and token_id != tokenizer.unk_token_id and token_id not in stop_ids:
            stop_ids.append(token_id)
    return stop_ids


def _fully_shard_layers(model: InternVLForConditionalGeneration, device_mesh: Any, precision: str) -> None:
    """Apply FSDP2 `fully_shard` to each vision and decoder layer, then to the root module.

    Each layer is one all-gather unit, so only a layer or two (the current one and the prefetched next
    one) plus the root's embeddings, projector and norms are unsharded at a time. With "bf16-mixed" the gathered parameters are cast
    to bfloat16 and gradients are reduced in float32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    names = device_mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and device_mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"The device mesh has tensor_parallel size {device_mesh['tensor_parallel'].size()}, but "
            "InternVLExpert shards with FSDP2 only. HINT: use ModelParallelStrategy(data_parallel_size=<number "
            "of devices>, tensor_parallel_size=1)."
        )
    mesh = device_mesh["data_parallel"] if "data_parallel" in names else device_mesh
    kwargs: dict[str, Any] = {"mesh": mesh}
    if precision.startswith("bf16-mixed"):
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.vision_tower.encoder.layer:
        fully_shard(layer, **kwargs)
    for layer in model.model.language_model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
