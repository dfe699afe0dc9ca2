"""Drafters built on a small HF causal LM: text-only, and MASSV (with a projector over the target's image features).

Text-only (the MASSV paper's baseline) reads the prompt with the image
placeholder tokens removed. MASSV keeps the placeholders and fills them with the
target's image features mapped into the drafter's embedding space by a 2-layer
MLP projector (LLaVA style); the features are computed once by the target.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.acceptance import SamplingConfig, logits_to_probs, sample_from
from pipeline.decoder import RaggedDecoder, embed_with_image_features, left_pad, right_pad
from pipeline.target import PreparedPrompt


class MassvProjector(nn.Module):
    """Maps target image features [N, in_features] to drafter embeddings [N, out_features]."""

    def __init__(self, in_features: int, out_features: int, hidden_features: int | None = None):
        super().__init__()
        hidden_features = hidden_features or out_features
        self.config = {"in_features": in_features, "hidden_features": hidden_features, "out_features": out_features}
        self.linear_1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden_features, out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class CausalLMDrafter:
    """Drafts with a causal LM over its own RaggedKVCache.

    State between steps: the cache holds the prompt and every committed token the
    drafter has read; `pending` holds committed tokens it has not read yet (one
    or two after a verify step, more after steps with k = 0). `propose` reads
    them in one ragged forward, then drafts k tokens, feeding back the first k-1.
    """

    def __init__(
        self,
        language_model: nn.Module,
        target_vocab_size: int,
        image_token_id: int | None,
        projector: MassvProjector | None = None,
        pad_token_id: int = 0,
        name: str = "drafter",
    ):
        self.model = language_model.eval()
        self.projector = projector.eval() if projector is not None else None
        self.target_vocab_size = target_vocab_size
        self.image_token_id = image_token_id
        self.pad_token_id = pad_token_id
        self.name = name
        self.decoder = RaggedDecoder(language_model)
        self.pending: list[list[int]] = []

    @property
    def kind(self) -> str:
        return "massv" if self.projector is not None else "text-only"

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def prefill(self, prompts: list[PreparedPrompt], image_features, first_tokens, append: bool = False) -> None:
        rows = [p.input_ids for p in prompts]
        features = None
        if self.projector is None:
            rows = [[t for t in r if t != self.image_token_id] for r in rows]
        elif image_features is not None:
            features = self.projector(image_features.to(self.device, self.model.dtype))
        ids, mask = left_pad(rows, self.pad_token_id, self.device)
        embeds = embed_with_image_features(self.model.get_input_embeddings(), ids, self.image_token_id, features)
        self.decoder.prefill(embeds, mask, append=append)
        self.pending = (self.pending if append else []) + [[t] for t in first_tokens.tolist()]

    @torch.no_grad()
    def propose(self, k, sampling: SamplingConfig, generator):
        """k >= 1 drafts per row; steps with k = 0 skip the drafter and it catches up here."""
        batch = len(self.pending)
        # Catch up: read the committed tokens not yet in the cache (ragged, right-padded).
        pending, counts = right_pad(self.pending, self.pad_token_id, self.device)
        logits = self.decoder.forward(pending)
        self.decoder.advance(counts)
        logits = logits[torch.arange(batch, device=self.device), (counts - 1).to(self.device)]
        self.pending = [[] for _ in range(batch)]
        tokens, probs = [], []
        for j in range(k):
            token, prob = self._choose(logits, sampling, generator)
            tokens.append(token)
            probs.append(prob)
            if j < k - 1:
                logits = self.decoder.forward(token[:, None])[:, 0]
                self.decoder.advance(torch.ones_like(counts))
        return torch.stack(tokens, dim=1), (torch.stack(probs, dim=1) if not sampling.greedy else None)

    def commit(self, num_accepted, output_tokens) -> None:
        """num_accepted [B] and output_tokens [B, k+1] on the host."""
        # After propose(k) the cache holds the k-1 drafts fed back; drop those after the first rejection.
        fed_drafts = max(output_tokens.shape[1] - 2, 0)
        kept_drafts = num_accepted.clamp_max(fed_drafts)
        self.decoder.rewind(fed_drafts - kept_drafts)
        kept, emitted = kept_drafts.tolist(), (num_accepted + 1).tolist()
        for i, row in enumerate(output_tokens.tolist()):
            self.pending[i].extend(row[kept[i] : emitted[i]])

    def select_rows(self, rows: torch.Tensor) -> None:
        self.decoder.select_rows(rows)
        self.pending = [self.pending[i] for i in rows.tolist()]

    def _choose(self, logits, sampling, generator):
        logits = _fit_vocab(logits.float(), self.target_vocab_size)
        if sampling.greedy:
            return logits.argmax(dim=-1), None
        probs = logits_to_probs(logits, sampling)
        return sample_from(probs, generator), probs


def _fit_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Cut or pad (with -inf) drafter logits [..., V_d] to the target's vocabulary size."""
    have = logits.shape[-1]
    if have >= vocab_size:
        return logits[..., :vocab_size]
    pad = logits.new_full((*logits.shape[:-1], vocab_size - have), float("-inf"))
    return torch.cat([logits, pad], dim=-1)
