"""What the drafter kinds built on a small HF causal LM share: the model base class, decoding, loading checks.

`CausalLMDraftModel` is the one model class of such a kind, for decoding and training
alike: `prompt_tokens` says which prompt tokens the drafter reads, at which positions, `embed` turns them
(and the target's image features) into input embeddings, `forward` gives logits.
`CausalLMDrafter` decodes with any of them over its own RaggedKVCache (the engine's
Drafter protocol). The kinds: text_only.py and massv.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from drafters.put_off import PutOffDecoder
from pipeline.engine.acceptance import SamplingConfig, logits_to_probs, sample_from
from pipeline.engine.decoder import RaggedDecoder
from pipeline.engine.fused import FUSED
from pipeline.engine.padding import left_pad, right_pad
from pipeline.engine.prompts import PreparedPrompt
from pipeline.engine.target import TargetPrefill


class CausalLMDraftModel(nn.Module):
    """A small causal LM as a drafter; kinds override `prompt_tokens` and `embed`."""

    kind = "causal-lm"

    def __init__(self, language_model: nn.Module, image_token_id: int | None):
        super().__init__()
        self.language_model = language_model
        self.image_token_id = image_token_id

    def prompt_tokens(self, input_ids: list[int], positions: list[int]) -> tuple[list[int], list[int]]:
        """The prompt tokens this drafter reads and their positions, from the target's tokens and text-axis
        positions: all of them, where they are (so under M-RoPE text sits where the target's does)."""
        return input_ids, positions

    def embed(
        self,
        input_ids: torch.Tensor,  # [B, L]
        image_features: torch.Tensor | None,  # [image tokens in input_ids, target hidden]
    ) -> torch.Tensor:  # [B, L, drafter hidden]
        return self.language_model.get_input_embeddings()(input_ids)

    def forward(self, input_ids, attention_mask, image_features=None, position_ids=None) -> torch.Tensor:
        """Logits [B, L, V] of a right-padded batch (training), at positions [B, L] as `prompt_tokens` numbers
        them and the answers continue them."""
        embeds = self.embed(input_ids, image_features)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                   position_ids=position_ids).logits

    @classmethod
    def load(cls, path: Path, config: dict, target, trust_remote_code: bool = False) -> CausalLMDrafter:
        """The drafter at `path` ready to decode for `target` (its device and dtype); checks the vocabulary."""
        model = cls.from_pretrained(path, config, target.image_token_id, target.model.dtype, trust_remote_code)
        check_vocabulary(target.tokenizer, target.vocab_size, model.vocab_size,
                         tokenizer_or_none(cls.language_model_dir(path)), str(path))
        model.check_target(target.text_config.hidden_size, str(path))
        return CausalLMDrafter(model.to(target.device), target.vocab_size, target.pad_token_id, name=str(path))

    @classmethod
    def check(cls, path: Path, config: dict, target_tokenizer, target_text_config, name: str,
              trust_remote_code: bool = False) -> None:
        """Every check `load` makes, from config and tokenizer files only (no weights): for the job's preflight."""
        lm_dir = cls.language_model_dir(path)
        lm_config = AutoConfig.from_pretrained(lm_dir, trust_remote_code=trust_remote_code).get_text_config()
        check_vocabulary(target_tokenizer, target_text_config.vocab_size, lm_config.vocab_size,
                         tokenizer_or_none(lm_dir), name)
        cls.check_config(config, target_text_config.hidden_size, lm_config.hidden_size, name)

    @classmethod
    def language_model_dir(cls, path: Path) -> Path:
        return path

    @classmethod
    def check_config(cls, config: dict, target_hidden: int, drafter_hidden: int, name: str) -> None:
        """Raise ValueError when the drafter's own configuration does not fit this target."""

    def check_target(self, target_hidden: int, name: str) -> None:
        self.check_config(self.config, target_hidden, self.hidden_size, name)

    @property
    def config(self) -> dict:
        """The drafter_config.json of this kind."""
        return {"kind": self.kind}

    @property
    def vocab_size(self) -> int:
        return self.language_model.get_output_embeddings().weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.language_model.get_input_embeddings().weight.shape[1]


def load_language_model(path: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, use_safetensors=True, attn_implementation="sdpa", trust_remote_code=trust_remote_code
    )


class CausalLMDrafter:
    """Drafts with a CausalLMDraftModel over its own RaggedKVCache.

    State between steps: the cache holds the prompt and every committed token the
    drafter has read; `pending` holds committed tokens it has not read yet (one
    or two after a verify step, more after steps with k = 0). `propose` reads
    them in one ragged forward, then drafts k tokens, feeding back the first k-1.

    A batch's prefill is put off until a draft needs it (put_off.py).
    """

    reads_target_hidden_states = False

    def __init__(self, model: CausalLMDraftModel, target_vocab_size: int, pad_token_id: int = 0,
                 name: str = "drafter"):
        self.model = model.eval()
        self.target_vocab_size = target_vocab_size
        self.pad_token_id = pad_token_id
        self.name = name
        self.decoder = PutOffDecoder(RaggedDecoder(model.language_model, stack=FUSED))
        self.pending: list[list[int]] = []

    @property
    def kind(self) -> str:
        return self.model.kind

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    @torch.no_grad()
    def prefill(self, prompts: list[PreparedPrompt], target: TargetPrefill, first_tokens, append: bool = False) -> None:
        def inputs() -> tuple[torch.Tensor, list[list[int]]]:  # built when the decoder prefills (put_off.py)
            rows = [self.model.prompt_tokens(p.input_ids, positions)
                    for p, positions in zip(prompts, target.positions)]
            ids, _ = left_pad([ids for ids, _ in rows], self.pad_token_id, self.device)
            features = target.image_features
            if features is not None:
                features = features.to(self.device, self.decoder.dtype)
            with torch.no_grad():
                return self.model.embed(ids, features), [positions for _, positions in rows]

        self.decoder.prefill(inputs, len(prompts), append=append)
        self.pending = (self.pending if append else []) + [[t] for t in first_tokens.tolist()]

    @property
    def prefill_waits(self) -> bool:
        return self.decoder.waits

    def prefill_put_off(self) -> int:
        return self.decoder.prefill_put_off()

    @torch.no_grad()
    def propose(self, k: int, sampling: SamplingConfig, generator):
        """k >= 1 drafts per row; steps with k = 0 skip the drafter and it catches up here."""
        batch = len(self.pending)
        # Catch up: read the committed tokens not yet in the cache (ragged, right-padded).
        pending, counts = right_pad(self.pending, self.pad_token_id, self.device)
        logits = self.decoder.forward(input_ids=pending, num_new=counts).logits
        logits = logits[torch.arange(batch, device=self.device), (counts - 1).to(self.device)]
        self.pending = [[] for _ in range(batch)]
        tokens, probs = [], []
        for j in range(k):
            token, prob = choose_draft(logits, self.target_vocab_size, sampling, generator)
            tokens.append(token)
            probs.append(prob)
            if j < k - 1:
                logits = self.decoder.forward(input_ids=token[:, None]).logits[:, 0]
        return torch.stack(tokens, dim=1), (torch.stack(probs, dim=1) if not sampling.greedy else None)

    def commit(self, k: int, num_accepted: torch.Tensor, output_tokens: torch.Tensor,
               target_hidden_states: torch.Tensor | None = None) -> None:
        """num_accepted [B] and output_tokens [B, k+1] on the host."""
        self.decoder.drafting = k > 0  # rows joining after a plain step keep their prefill waiting (put_off.py)
        if k == 0:  # a plain step: each row's one token waits for the next draft (a step's Python, kept short: the
            # [B, 1] tokens as rows of one, not a column's slice first)
            for row, (token,) in zip(self.pending, output_tokens.tolist()):
                row.append(token)
            return
        # propose(k) appended the first k-1 drafts to the cache; roll back those after the first rejection.
        fed_drafts = max(k - 1, 0)
        kept_drafts = num_accepted.clamp_max(fed_drafts)
        self.decoder.rollback(fed_drafts - kept_drafts)
        kept, emitted = kept_drafts.tolist(), (num_accepted + 1).tolist()
        for i, row in enumerate(output_tokens.tolist()):
            self.pending[i].extend(row[kept[i] : emitted[i]])

    def select_rows(self, rows: torch.Tensor) -> None:
        self.decoder.select_rows(rows)
        self.pending = [self.pending[i] for i in rows.tolist()]

    def fork(self) -> CausalLMDrafter:
        forked = copy.copy(self)
        forked.decoder, forked.pending = self.decoder.fork(), []
        return forked

    def adopt_rows(self, other: CausalLMDrafter, count: int, append: bool) -> None:
        self.decoder.adopt_rows(other.decoder, count, append)
        keep = len(other.pending) - count
        self.pending = (self.pending if append else []) + other.pending[keep:]
        other.pending = other.pending[:keep]


def choose_draft(logits: torch.Tensor, vocab_size: int, sampling: SamplingConfig, generator
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A draft token per row from drafter logits [B, V_d] and, when sampling, the distribution [B, V] it was
    drawn from (the target's temperature and top-p rules, over the target's vocabulary)."""
    logits = _fit_vocab(logits.float(), vocab_size)
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


def check_vocabulary(target_tokenizer, target_vocab_size: int, drafter_vocab_size: int, drafter_tokenizer,
                     drafter_name: str) -> None:
    """Every token the drafter knows must have the same id in the target's tokenizer."""
    if drafter_tokenizer is None:
        if drafter_vocab_size != target_vocab_size:
            raise ValueError(
                f"drafter {drafter_name} has a vocabulary of {drafter_vocab_size} tokens but the target has "
                f"{target_vocab_size}: use a drafter with the target's tokenizer."
            )
        return
    target_vocab = target_tokenizer.get_vocab()
    for token, token_id in sorted(drafter_tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if target_vocab.get(token) != token_id:
            where = f"id {target_vocab[token]}" if token in target_vocab else "absent"
            raise ValueError(
                f"drafter {drafter_name} does not share the target's vocabulary: token {token!r} is id {token_id} "
                f"in the drafter but {where} in the target; use a drafter with the target's tokenizer."
            )


def tokenizer_or_none(path: Path):
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    return AutoTokenizer.from_pretrained(path)
