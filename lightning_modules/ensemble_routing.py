"""Routing arithmetic and multi-expert decoding shared by the routed ensemble and its tests.

Everything here works on tensors of one evaluation batch (the batch layout is in
``docs/architecture.md``): ``route_scores`` (B, K) are the cosines between each sample's CLIP
image feature and the experts' centroids, ``expert`` (B,) is the top-1 route.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from clustering.router import routing_weights

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


def resolve_routes(
    routed: torch.Tensor,
    route_scores: torch.Tensor | None,
    available: torch.Tensor,
    fallback: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map each sample's routed expert to the expert that will answer it.

    Args:
        routed: (B,) int64 top-1 expert ids.
        route_scores: (B, K) cosines; needed only when a routed expert is unavailable.
        available: (K,) bool, experts whose checkpoint is loaded.
        fallback: ``"fail"`` raises when a sample is routed to an unavailable expert;
            ``"next_nearest"`` sends it to the available expert with the highest route score.

    Returns:
        answering: (B,) int64 expert ids, all available.
        moved: (B,) bool, True where ``answering != routed``.
    """
    available = available.to(routed.device)
    missing = ~available[routed]  # (B,)
    if not bool(missing.any()):
        return routed.clone(), missing
    missing_ids = sorted({int(k) for k in routed[missing]})
    if fallback == "fail":
        raise RuntimeError(
            f"{int(missing.sum())} sample(s) are routed to experts {missing_ids}, whose checkpoints are "
            "missing. HINT: provide those checkpoints, or set fallback: next_nearest to answer them with "
            "the nearest available expert."
        )
    if fallback != "next_nearest":
        raise ValueError(f"fallback must be 'fail' or 'next_nearest', got {fallback!r}.")
    if route_scores is None:
        raise ValueError(
            "fallback next_nearest needs the batch's route_scores to find the nearest available expert, "
            "but the batch has none. HINT: build the evaluation shards with split_dataset.py, which stores them."
        )
    masked = route_scores.float().masked_fill(~available[None, :], float("-inf"))  # (B, K)
    nearest = masked.argmax(dim=1)
    answering = torch.where(missing, nearest, routed)
    return answering, missing


def count_image_tiles(input_ids: torch.Tensor, image_token_id: int, image_seq_length: int) -> list[int]:
    """Return the number of image tiles of each row: its image-context tokens / ``image_seq_length``.

    ``input_ids`` is (B, L). Raises ``ValueError`` if a row's count is not a multiple.
    """
    counts = (input_ids == image_token_id).sum(dim=1).tolist()
    tiles = []
    for row, count in enumerate(counts):
        if count % image_seq_length:
            raise ValueError(
                f"row {row} has {count} image-context tokens, not a multiple of image_seq_length="
                f"{image_seq_length}. HINT: encode the batch with the processor of the experts' checkpoints."
            )
        tiles.append(count // image_seq_length)
    return tiles


def select_samples(batch: Mapping[str, Any], indices: Sequence[int], tiles: Sequence[int]) -> dict[str, Any]:
    """Return the sub-batch of rows ``indices`` (in that order) of an evaluation batch.

    Tensors with a batch dimension are indexed, lists are picked, ``pixel_values`` (T, 3, H, W)
    keeps the tiles of the chosen rows (``tiles[i]`` tiles for row i, in batch order), and
    left-padded prompt columns that are padding in every chosen row are dropped.
    """
    batch_size = len(tiles)
    index_tensor = torch.as_tensor(list(indices), dtype=torch.long)
    sub: dict[str, Any] = {}
    for key, value in batch.items():
        if key == "pixel_values":
            continue
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch_size:
            sub[key] = value[index_tensor.to(value.device)]
        elif isinstance(value, (list, tuple)) and len(value) == batch_size:
            sub[key] = [value[i] for i in indices]
        else:
            sub[key] = value

    pixel_values = batch.get("pixel_values")
    if pixel_values is not None:
        offsets = [0]
        for count in tiles:
            offsets.append(offsets[-1] + count)
        if offsets[-1] != pixel_values.shape[0]:
            raise ValueError(
                f"the batch has {pixel_values.shape[0]} image tiles but its prompts hold image tokens for "
                f"{offsets[-1]}. HINT: check that the collate function and the processor agree."
            )
        rows = [torch.arange(offsets[i], offsets[i + 1]) for i in indices]
        tile_index = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        sub["pixel_values"] = pixel_values[tile_index.to(pixel_values.device)] if len(tile_index) else None

    mask = sub.get("prompt_attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape[0] > 0:
        used = mask.bool().any(dim=0)  # (Lp,)
        first = int(used.float().argmax()) if bool(used.any()) else mask.shape[1]
        sub["prompt_attention_mask"] = mask[:, first:]
        sub["prompt_input_ids"] = sub["prompt_input_ids"][:, first:]
    return sub


@torch.no_grad()
def mixture_greedy_decode(
    models: Sequence[PreTrainedModel | None],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None,
    weights: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
) -> torch.Tensor:
    """Greedy decoding from the mixture ``p(x_t | x_<t) = sum_k w_k p_k(x_t | x_<t)``.

    All experts read the same prompt and the same generated tokens, each with its own KV cache.
    At every step the next token is the argmax of the weighted sum of the experts' softmax
    distributions. Experts whose weight is 0 for every row (or that are None) are not run.
    Positions follow ``transformers``' ``generate``: the cumulative sum of the attention mask
    for the prompt, then one more per step, so a one-hot weight row decodes exactly the tokens
    that greedy ``generate`` decodes with that expert (up to floating-point ties).

    Args:
        models: K ``InternVLForConditionalGeneration`` models (None where unavailable), sharing
            one tokenizer.
        input_ids: (B, Lp) left-padded prompts.
        attention_mask: (B, Lp).
        pixel_values: (T, 3, H, W) image tiles of the batch, or None.
        weights: (B, K) mixture weights; rows sum to 1.
        max_new_tokens: maximum tokens to generate.
        eos_token_id: stop token id or ids; a row stops after producing one, and its later
            positions hold ``pad_token_id``.
        pad_token_id: filler for finished rows.

    Returns:
        (B, N) int64 generated tokens, N <= max_new_tokens, EOS included where produced.
    """
    batch_size = input_ids.shape[0]
    active = [k for k, model in enumerate(models) if model is not None and bool((weights[:, k] > 0).any())]
    if not active:
        raise ValueError("no expert has a positive weight for any row of the batch.")
    weights = weights.to(input_ids.device, torch.float32)
    stop_ids = torch.as_tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=input_ids.device
    )
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # (B, Lp)
    caches = {k: DynamicCache(config=models[k].config) for k in active}

    finished = torch.zeros(batch_size, dtype=torch.bool, device=input_ids.device)
    generated: list[torch.Tensor] = []
    step_input_ids, step_positions, step_pixels = input_ids, position_ids, pixel_values
    for _ in range(max_new_tokens):
        mixture = None
        for k in active:
            outputs = models[k](
                input_ids=step_input_ids,
                attention_mask=attention_mask,
                pixel_values=step_pixels,
                position_ids=step_positions,
                cache=caches[k],
                use_cache=True,
                logits_to_keep=1,
            )
            probs = torch.softmax(outputs.logits[:, -1].float(), dim=-1)  # (B, V)
            contribution = weights[:, k, None] * probs
            mixture = contribution if mixture is None else mixture + contribution
        next_tokens = mixture.argmax(dim=-1)  # (B,)
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_token_id), next_tokens)
        generated.append(next_tokens)
        finished |= torch.isin(next_tokens, stop_ids)
        if bool(finished.all()):
            break
        step_input_ids = next_tokens[:, None]  # (B, 1)
        step_positions = step_positions[:, -1:] + 1  # (B, 1)
        step_pixels = None  # images are read in the prefill step only
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, 1)], dim=1)
    return torch.stack(generated, dim=1)


@torch.no_grad()
def label_log_probs(model: PreTrainedModel, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the log-probability of each supervised token under ``model`` (teacher forcing).

    Args:
        model: an ``InternVLForConditionalGeneration``.
        batch: a batch with right-padded ``input_ids``, ``attention_mask``, ``labels`` (B, L)
            and ``pixel_values``.

    Returns:
        log_probs: (N,) float32, one entry per label != -100 after the causal shift, in row order.
        rows: (N,) int64 batch row of each entry.
    """
    outputs = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch.get("pixel_values"),
    )
    logits = outputs.logits[:, :-1].float()  # (B, L-1, V): position t predicts token t+1
    targets = batch["labels"][:, 1:]  # (B, L-1)
    supervised = targets != IGNORE_INDEX
    log_softmax = torch.log_softmax(logits, dim=-1)
    token_log_probs = log_softmax.gather(-1, targets.clamp_min(0)[..., None])[..., 0]  # (B, L-1)
    rows = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)
    return token_log_probs[supervised], rows[supervised]


def mixture_log_likelihood(token_log_probs: torch.Tensor, token_weights: torch.Tensor) -> float:
    """Return ``sum_t log sum_k w_tk p_k(x_t)`` from (N, K) log-probs and (N, K) weights."""
    log_weights = torch.log(token_weights.double())  # log 0 = -inf drops an expert
    return float(torch.logsumexp(log_weights + token_log_probs.double(), dim=1).sum())


DEFAULT_TEMPERATURE_GRID = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)


@dataclass
class TemperatureFit:
    """Result of a temperature search for soft routing."""

    temperature: float
    """The grid temperature with the highest mixture log-likelihood."""
    temperatures: list[float]
    """The grid, in the order searched."""
    log_likelihoods: list[float]
    """Total mixture log-likelihood of the held-out tokens at each temperature."""
    n_tokens: int
    """Number of supervised tokens scored."""
    n_sequences: int
    """Number of held-out sequences."""
    per_token: list[float] = field(default_factory=list)
    """Mean log-likelihood per token at each temperature."""


def fit_temperature(
    token_log_probs: torch.Tensor,
    token_route_scores: torch.Tensor,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURE_GRID,
    top_k: int | None = None,
    available: torch.Tensor | None = None,
    n_sequences: int = 0,
) -> TemperatureFit:
    """Pick the temperature T that maximises the mixture log-likelihood of held-out tokens.

    The weights depend on the image only, so each token t of a sequence gets that sequence's
    ``w(T) = softmax(T * route_scores)`` and the score is ``sum_t log sum_k w_k p_k(x_t | x_<t)``.
    Ties go to the smaller temperature.

    Args:
        token_log_probs: (N, K) log p_k of each held-out supervised token under each expert
            (``-inf`` or any value for unavailable experts, which ``available`` masks out).
        token_route_scores: (N, K) route scores of the sequence each token belongs to.
        temperatures: the grid to search, each >= 0.
        top_k: as in ``routing_weights``.
        available: (K,) bool mask of experts that may receive weight.
        n_sequences: number of sequences behind the tokens, recorded in the result.
    """
    if token_log_probs.shape != token_route_scores.shape or token_log_probs.ndim != 2:
        raise ValueError(
            f"token_log_probs {tuple(token_log_probs.shape)} and token_route_scores "
            f"{tuple(token_route_scores.shape)} must both be (N, K)."
        )
    if token_log_probs.shape[0] == 0:
        raise ValueError("no held-out tokens to fit the temperature on. HINT: pass batches with labels.")
    if not temperatures:
        raise ValueError("the temperature grid is empty.")
    log_probs = token_log_probs.double()
    if available is not None:
        # Unavailable experts get weight 0; a finite filler keeps 0 * filler out of the sum.
        log_probs = log_probs.masked_fill(~available.to(log_probs.device)[None, :], 0.0)
    log_likelihoods = []
    for temperature in temperatures:
        weights = routing_weights(token_route_scores, float(temperature), top_k, available)
        log_likelihoods.append(mixture_log_likelihood(log_probs, weights))
    best = max(range(len(temperatures)), key=lambda i: (log_likelihoods[i], -float(temperatures[i])))
    n_tokens = token_log_probs.shape[0]
    return TemperatureFit(
        temperature=float(temperatures[best]),
        temperatures=[float(t) for t in temperatures],
        log_likelihoods=log_likelihoods,
        n_tokens=n_tokens,
        n_sequences=n_sequences,
        per_token=[value / n_tokens for value in log_likelihoods],
    )
