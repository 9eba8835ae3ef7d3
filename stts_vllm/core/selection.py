"""Which units survive. One count function serves the processor (placeholder count, before
the video is seen) and the model (mask size, after scoring), so the two always agree.

Two selections share that count: `global` (the paper: the first step whole, then a top-k over
all other steps) and `per_step` (the same total, split into a fixed quota per step, ranked
within each step). A prompt that names each step with its own timestamp (Qwen3-VL) must know
every step's token count before the ViT runs, which only `per_step` can promise.
"""

from __future__ import annotations

import math

import torch

from stts_vllm.core.config import check_keep_ratio


def retained_count(num_steps: int, units_per_step: int, keep_ratio: float) -> int:
    """Units a video keeps: `round(keep * T * U)` (half up), never fewer than one whole step
    (the first step is always kept) and never more than all."""
    keep_ratio = check_keep_ratio(keep_ratio, "keep_ratio")
    total = num_steps * units_per_step
    wanted = math.floor(keep_ratio * total + 0.5)
    return min(total, max(units_per_step, wanted))


def step_quotas(num_steps: int, units_per_step: int, keep_ratio: float) -> list[int]:
    """Units each step keeps under `per_step` selection: the first step whole, the rest of
    `retained_count` split evenly over the other steps (earlier steps take the remainder).
    Sums to `retained_count`; no step exceeds `units_per_step`."""
    total = retained_count(num_steps, units_per_step, keep_ratio)
    if num_steps <= 1:
        return [total] * num_steps
    share, extra = divmod(total - units_per_step, num_steps - 1)
    return [units_per_step] + [share + (1 if i < extra else 0) for i in range(num_steps - 1)]


def _ranks_within_steps(scores: torch.Tensor) -> torch.Tensor:
    """`[T, U]` scores -> each unit's rank within its own step (0 = best; ties by position)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return ranks.scatter_(1, order, positions)


def retention_mask(
    scores: torch.Tensor, keep_ratio: float, selection: str = "global"
) -> torch.Tensor:
    """`[T, U]` scores -> `[T, U]` bool mask with `retained_count` units: the first step whole,
    then a top-k over the other steps (`global`) or within each of them (`per_step`).

    Equal scores are spread over time: among them a unit ranked higher within its own step
    goes first, then the earlier step. Exact ties are common, from identical content (flat
    or static regions) and from a saturated sigmoid (a scorer sure of many units scores them
    all exactly 1.0); taking them in position order would fill the first steps and leave
    the rest of the clip empty, which no draw or random choice during training ever did.
    """
    num_steps, units_per_step = scores.shape
    mask = torch.zeros(num_steps, units_per_step, dtype=torch.bool, device=scores.device)
    mask[0] = True
    if selection == "global":
        extra = retained_count(num_steps, units_per_step, keep_ratio) - units_per_step
        if extra > 0:
            rest = scores[1:]
            by_rank = torch.argsort(_ranks_within_steps(rest).reshape(-1), stable=True)
            by_score = torch.argsort(rest.reshape(-1)[by_rank], descending=True, stable=True)
            mask[1:].view(-1)[by_rank[by_score[:extra]]] = True
    elif selection == "per_step":
        if num_steps > 1:
            # step_quotas' split, built on the device: no host-to-device copy when serving
            quotas = step_quotas(num_steps, units_per_step, keep_ratio)[1:]
            share, extra = divmod(sum(quotas), len(quotas))
            steps = torch.arange(len(quotas), device=scores.device)
            quota = (share + (steps < extra).to(torch.long)).unsqueeze(-1)
            mask[1:] = _ranks_within_steps(scores[1:]) < quota
    else:
        raise ValueError(f"unknown selection {selection!r}; expected 'global' or 'per_step'")
    return mask


def sample_retention(
    scores: torch.Tensor,
    keep_ratio: float,
    selection: str = "global",
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-time exploration: draw the kept set instead of taking the top-k, and return
    its log-probability, so a score-function (REINFORCE) term can tell the scorer what
    dropping a unit cost the answer. The key bias alone never reports that cost: a dropped
    unit leaves no trace in the loss. Not the paper's recipe (it trains through the key bias
    only); off unless a training run asks for it, and never used when serving.

    The draw is Gumbel top-k over `logit(score) / temperature`, i.e. a Plackett-Luce sample of
    the same size and shape as `retention_mask` (first step whole; `global` or `per_step`).
    Returns the mask and the ordered draw's log-probability, averaged over the units drawn
    (differentiable in `scores`; zero when nothing is drawn).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = torch.logit(scores[1:].float().clamp(1e-6, 1.0 - 1e-6)) / temperature
    uniform = torch.rand(logits.shape, generator=generator).clamp(1e-12, 1.0 - 1e-12)
    noisy = logits.detach() + (-torch.log(-torch.log(uniform))).to(logits.device)
    first = noisy.new_ones(1, scores.shape[1])
    mask = retention_mask(torch.cat([first, noisy]), keep_ratio, selection)
    if selection == "global":
        rows, drawn = logits.reshape(1, -1), noisy.reshape(1, -1)
        picks = torch.tensor([int(mask[1:].sum())], device=logits.device)
    else:  # per_step: one Plackett-Luce draw per step, of that step's quota
        rows, drawn = logits, noisy
        picks = mask[1:].sum(dim=-1)
    if rows.numel() == 0 or int(picks.sum()) == 0:
        return mask, scores.sum() * 0.0
    return mask, _draw_log_prob(rows, drawn, mask[1:].reshape(rows.shape), picks)


def _draw_log_prob(
    logits: torch.Tensor, drawn: torch.Tensor, kept: torch.Tensor, picks: torch.Tensor
) -> torch.Tensor:
    """Plackett-Luce log-probability of drawing the `kept` units (`[R, N]` rows, `picks` per
    row) in descending order of their noisy values `drawn`, averaged over the units drawn.
    The kept units go first whatever the noise says: on an exact tie at the cut the mask
    (`retention_mask`, ties spread over steps) and a plain sort of `drawn` (ties by position)
    disagree, and the log-probability must be that of the set the mask kept."""
    order = torch.argsort(drawn, dim=-1, descending=True, stable=True)
    kept_first = torch.argsort((~kept.gather(-1, order)).to(torch.uint8), dim=-1, stable=True)
    ranked = logits.gather(-1, order.gather(-1, kept_first))
    # Position j of a draw picks one of the units not yet drawn: log p = l_j - logsumexp(l_j..).
    rest = torch.logcumsumexp(ranked.flip(-1), dim=-1).flip(-1)
    position = torch.arange(ranked.shape[-1], device=ranked.device)
    drawn_terms = (ranked - rest) * (position < picks.unsqueeze(-1))
    return drawn_terms.sum() / picks.sum()
