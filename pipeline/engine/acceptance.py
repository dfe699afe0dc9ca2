"""The speculative-decoding acceptance rule, as pure tensor functions.

Greedy (temperature 0): a draft token is accepted while it equals the target's
argmax; the first mismatch is replaced by the target's argmax (recovered), and
when all k drafts match, the target's next argmax is appended (bonus).

Sampling (temperature > 0): draft token d ~ q is accepted with probability
min(1, p(d) / q(d)); at the first rejection a token is resampled from
norm(max(0, p - q)) (recovered); if all k are accepted a bonus token is drawn
from p at position k. This makes the output distribution exactly p
(Leviathan et al. 2023, Chen et al. 2023).

Both return `(num_accepted [B], output_tokens [B, k+1])`, where row i emits
`output_tokens[i, : num_accepted[i] + 1]` and the rest is `PLACEHOLDER_TOKEN`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PLACEHOLDER_TOKEN = -1


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen; applied identically to target and drafter."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def logits_to_probs(
    logits: torch.Tensor,  # [..., V] raw scores
    sampling: SamplingConfig,
) -> torch.Tensor:  # [..., V] float32 probabilities after temperature and top-p
    """Temperature then nucleus (top-p) filtering, as HF's TopPLogitsWarper does it."""
    scores = logits.float() / sampling.temperature
    if sampling.top_p < 1.0:
        sorted_scores, sorted_idx = torch.sort(scores, dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1.0 - sampling.top_p)
        remove_sorted[..., -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores.softmax(dim=-1)


def sample_from(
    probs: torch.Tensor,  # [..., V] rows sum to 1
    generator: torch.Generator | None,
) -> torch.Tensor:  # [...] long
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def accept_greedy(
    draft_tokens: torch.Tensor,  # [B, k] long
    target_logits: torch.Tensor,  # [B, k+1, V] target scores at [last, d1..dk]
) -> tuple[torch.Tensor, torch.Tensor]:  # num_accepted [B] long, output_tokens [B, k+1] long
    k = draft_tokens.shape[1]
    target_tokens = target_logits.argmax(dim=-1)  # [B, k+1]
    matches = draft_tokens == target_tokens[:, :k]  # [B, k]
    num_accepted = matches.long().cumprod(dim=1).sum(dim=1)  # [B]
    # Accepted drafts equal the target's argmax, so the output is the argmax up to and
    # including position num_accepted (the recovered or bonus token).
    return num_accepted, _mask_after(target_tokens, num_accepted)


def accept_sampled(
    draft_tokens: torch.Tensor,  # [B, k] long, drawn from draft_probs
    draft_probs: torch.Tensor,  # [B, k, V] q: drafter distribution at each draft position
    target_probs: torch.Tensor,  # [B, k+1, V] p: target distribution at [last, d1..dk]
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:  # num_accepted [B] long, output_tokens [B, k+1] long
    batch, k = draft_tokens.shape
    rows = torch.arange(batch, device=draft_tokens.device)
    p_draft = target_probs[:, :k].gather(-1, draft_tokens[..., None]).squeeze(-1)  # [B, k]
    q_draft = draft_probs.gather(-1, draft_tokens[..., None]).squeeze(-1)  # [B, k]
    uniform = torch.rand(p_draft.shape, generator=generator, device=p_draft.device)  # [B, k]
    accepted = uniform * q_draft < p_draft  # u < p/q without dividing by q
    num_accepted = accepted.long().cumprod(dim=1).sum(dim=1)  # [B]

    # Recovered token at the first rejection from norm(max(0, p - q)); bonus from p_k.
    p_next = target_probs[rows, num_accepted]  # [B, V]
    q_next = torch.cat([draft_probs, torch.zeros_like(target_probs[:, :1])], dim=1)[rows, num_accepted]  # [B, V]
    residual = (p_next - q_next).clamp_min(0)  # [B, V]; equals p_next on the bonus path
    mass = residual.sum(dim=-1, keepdim=True)
    # A rejection implies mass > 0; the fallback only guards against rounding.
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_next)
    next_token = sample_from(residual, generator)  # [B]

    output = torch.cat([draft_tokens, next_token[:, None]], dim=1)  # [B, k+1]
    output[rows, num_accepted] = next_token
    return num_accepted, _mask_after(output, num_accepted)


def _mask_after(
    tokens: torch.Tensor,  # [B, k+1]
    num_accepted: torch.Tensor,  # [B]
) -> torch.Tensor:  # [B, k+1] with PLACEHOLDER_TOKEN after position num_accepted
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    return tokens.masked_fill(positions[None, :] > num_accepted[:, None], PLACEHOLDER_TOKEN)
