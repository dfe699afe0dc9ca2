"""MSD drafter (Lin et al. 2025): an EAGLE-style head over the target's last hidden states, with visual and
text tokens decoupled.

The head reads, at each position t, the pair (h_t, x_{t+1}): the target's last hidden state at t and the
token after it. A text token enters as fc([embed(x_{t+1}); h_t]) (one Linear 2H -> H); an image token as
the target's own image embedding of x_{t+1} (the vector the target consumed there), untouched: the
decoupling. The head's decoder layer (the target's decoder-layer architecture, one layer by default) turns
that into a prediction of h_{t+1}, and the target's LM head turns the prediction into the distribution of
x_{t+2}. Drafting goes on from the head's own predicted features; after verification the rows continue
from the target's true hidden states of the accepted tokens (EAGLE's rule), so rejected and fed drafts are
rolled back alike. Embeddings and LM head are the target's, shared and frozen: a checkpoint stores only
the head, and loading checks that the target is the one it was trained for.

A checkpoint is a directory:
    drafter_config.json   {"kind": "msd", "decoupled": true, "target": {hidden_size, vocab_size, fingerprint}}
    head/config.json      the head's decoder: the target's text config with the head's layer count
    head.safetensors      fc and the decoder
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel

from drafters.causal_lm import choose_draft
from drafters.put_off import PutOffDecoder
from pipeline.engine.acceptance import SamplingConfig
from pipeline.engine.decoder import RaggedDecoder
from pipeline.engine.fused import FUSED
from pipeline.engine.kv_cache import moves_in_place
from pipeline.engine.padding import left_pad
from pipeline.engine.prompts import PreparedPrompt
from pipeline.engine.target import Target, TargetPrefill

DRAFTER_CONFIG = "drafter_config.json"
HEAD_DIR = "head"
HEAD_WEIGHTS = "head.safetensors"
FINGERPRINT_ROWS = 64  # rows of the embedding and LM-head matrices hashed into the target's fingerprint


class MsdDraftModel(nn.Module):
    """fc + the head's decoder; the target's embedding and LM head are used, not owned (not in state_dict)."""

    kind = "msd"

    def __init__(self, decoder: nn.Module, embedding: nn.Module, lm_head: nn.Module, image_token_id: int | None,
                 target_info: dict, decoupled: bool = True):
        super().__init__()
        hidden = decoder.config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden)
        self.decoder = decoder  # an HF base text model: inputs_embeds in, last_hidden_state out
        self.decoder.embed_tokens = None  # inputs come from fuse(); the target's embedding is shared
        self.shared = (embedding, lm_head)  # a tuple, so they stay the target's (frozen, never saved)
        self.image_token_id = image_token_id
        self.target_info = target_info
        self.decoupled = decoupled

    def prompt_tokens(self, input_ids: list[int], positions: list[int]) -> tuple[list[int], list[int]]:
        """The head reads the target's own tokens, at the target's text-axis positions (training's numbering)."""
        return input_ids, positions

    def fuse(
        self,
        hidden_states: torch.Tensor,  # [B, L, H] the target's h_t (or the head's own prediction of it)
        next_ids: torch.Tensor,  # [B, L] x_{t+1}
        image_embeds: torch.Tensor | None,  # [image tokens in next_ids, H] what the target consumed there
    ) -> torch.Tensor:  # [B, L, H] the head's input
        embedding = self.shared[0]
        is_image = next_ids == self.image_token_id if image_embeds is not None else None
        if is_image is None:
            embeds = embedding(next_ids)
        else:  # at image placeholders (whose id may lie outside the vocabulary), the target's image embeddings
            embeds = embedding(next_ids.masked_fill(is_image, 0))
            embeds = embeds.masked_scatter(is_image[..., None], image_embeds.to(embeds.dtype))
        fused = self.fc(torch.cat([embeds, hidden_states.to(embeds.dtype)], dim=-1))
        if is_image is not None and self.decoupled:  # MSD: image tokens enter as they are, not fused with h_t
            fused = torch.where(is_image[..., None], embeds, fused)
        return fused

    def forward(self, hidden_states, next_ids, attention_mask, position_ids, image_embeds=None) -> torch.Tensor:
        """Predicted next features [B, L, H] of a right-padded batch (training), at the target's positions of
        x_{t+1} [B, L]."""
        inputs = self.fuse(hidden_states, next_ids, image_embeds)
        return self.decoder(inputs_embeds=inputs, attention_mask=attention_mask,
                            position_ids=position_ids).last_hidden_state

    def logits(self, features: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., V] through the target's LM head
        return self.shared[1](features)

    @property
    def config(self) -> dict:
        return {"kind": self.kind, "decoupled": self.decoupled, "target": self.target_info}

    # ---- building, saving, loading ----
    @classmethod
    def new(cls, target: Target, num_layers: int = 1, decoupled: bool = True,
            layer_types: list[str] | None = None) -> MsdDraftModel:
        """A freshly initialised head for this target (on the target's device)."""
        decoder = AutoModel.from_config(head_config(target.text_config, num_layers, layer_types))
        return cls(decoder, *shared_modules(target), target.image_token_id, target_fingerprint(target),
                   decoupled).to(target.device)

    @classmethod
    def from_pretrained(cls, path: Path, config: dict, target: Target) -> MsdDraftModel:
        check_config(config, target.text_config, str(path))
        found = target_fingerprint(target)
        if found["fingerprint"] != config["target"]["fingerprint"]:
            raise ValueError(f"MSD head {path} was trained for a target whose embeddings and LM head differ from "
                             f"this target's (fingerprint {config['target']['fingerprint'][:12]}, this target "
                             f"{found['fingerprint'][:12]}): train a head for this target.")
        decoder = AutoModel.from_config(AutoConfig.from_pretrained(path / HEAD_DIR))
        model = cls(decoder, *shared_modules(target), target.image_token_id, config["target"],
                    config.get("decoupled", True))
        model.load_state_dict(load_file(path / HEAD_WEIGHTS))
        return model.to(target.device, target.model.dtype)

    def save_pretrained(self, directory: str | Path, tokenizer=None) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.decoder.config.save_pretrained(directory / HEAD_DIR)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, directory / HEAD_WEIGHTS)
        (directory / DRAFTER_CONFIG).write_text(json.dumps(self.config, indent=2))

    # ---- the registry's interface ----
    @classmethod
    def load(cls, path: Path, config: dict, target: Target, trust_remote_code: bool = False) -> MsdDrafter:
        return MsdDrafter(cls.from_pretrained(path, config, target), target.vocab_size, name=str(path))

    @classmethod
    def check(cls, path: Path, config: dict, target_tokenizer, target_text_config, name: str,
              trust_remote_code: bool = False) -> None:
        """The checks `load` makes from config files alone (the fingerprint needs the weights: at load)."""
        check_config(config, target_text_config, name)


def head_config(text_config, num_layers: int, layer_types: list[str] | None = None):
    """The target's text config for a head of num_layers decoder layers (full attention unless layer_types
    says otherwise), with no vocabulary of its own (inputs arrive as embeddings; the target's LM head reads
    the output)."""
    settings = {**text_config.to_dict(), "num_hidden_layers": num_layers, "vocab_size": 1, "pad_token_id": 0,
                "bos_token_id": None, "eos_token_id": None}
    if "layer_types" in settings:
        settings["layer_types"] = layer_types or ["full_attention"] * num_layers
    return type(text_config).from_dict(settings)


def shared_modules(target: Target) -> tuple[nn.Module, nn.Module]:
    """The target's input embedding (what it consumes for a token) and LM head."""
    return target.model.get_input_embeddings(), target.model.get_output_embeddings()


def target_fingerprint(target: Target) -> dict:
    """Hidden size, vocabulary and a hash of sampled rows of the shared weights, in bfloat16 so that a target
    loaded in float32 on CPU and in bfloat16 on a GPU have the same fingerprint."""
    digest = hashlib.sha256()
    for module in shared_modules(target):
        weight = module.weight.detach()
        rows = torch.linspace(0, weight.shape[0] - 1, FINGERPRINT_ROWS).long().to(weight.device)
        digest.update(str(tuple(weight.shape)).encode())
        digest.update(weight[rows].to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return {"hidden_size": target.text_config.hidden_size, "vocab_size": target.vocab_size,
            "fingerprint": digest.hexdigest()}


def check_config(config: dict, target_text_config, name: str) -> None:
    """Raise ValueError (one sentence) when the head was trained for a target of another shape."""
    trained = config["target"]
    for what in ("hidden_size", "vocab_size"):
        if trained[what] != getattr(target_text_config, what):
            raise ValueError(f"MSD head {name} was trained for a target with {what} {trained[what]}, but this "
                             f"target's is {getattr(target_text_config, what)}: train a head for this target.")


class MsdDrafter:
    """Drafts with an MsdDraftModel over its own RaggedKVCache.

    The cache holds the head's states for pairs (h_t, x_{t+1}) whose h_t is the target's. `pending` holds
    the pairs the target has produced since (prefill's last one; after a verify, one per emitted token:
    (h_{n+j}, x_{n+j+1}) for j up to the accepted count), as [B, P, H] hidden states and [B, P] tokens
    with a count per row. `propose` reads them in one ragged forward, then drafts k tokens, feeding the
    head's own predicted features back for the first k-1. A batch's prefill waits until a draft needs it
    (put_off.py): meanwhile the rows keep the target's prefill, from which the head's inputs are built then.
    """

    kind = MsdDraftModel.kind
    reads_target_hidden_states = True

    def __init__(self, model: MsdDraftModel, target_vocab_size: int, name: str = "msd"):
        self.model = model.eval()
        self.target_vocab_size = target_vocab_size
        self.name = name
        self.decoder = PutOffDecoder(RaggedDecoder(model.decoder, stack=FUSED))
        self.pending = PendingPairs.empty()

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    @torch.no_grad()
    def prefill(self, prompts: list[PreparedPrompt], target: TargetPrefill, first_tokens: torch.Tensor,
                append: bool = False) -> None:
        hidden = target.hidden_states  # [B, L, H]

        def inputs() -> tuple[torch.Tensor, list[list[int]]]:  # built when the decoder prefills (put_off.py)
            # the prompts left-padded as the target's prefill padded them: columns line up with its hidden states
            ids, _ = left_pad([p.input_ids for p in prompts], 0, self.device)
            with torch.no_grad():  # pairs (h_t, x_{t+1}), each at the target's position of x_{t+1}
                return (self.model.fuse(hidden[:, :-1], ids[:, 1:], target.image_features),
                        [row[1:] for row in target.positions])

        self.decoder.prefill(inputs, len(prompts), append=append)
        new = PendingPairs(hidden[:, -1:], first_tokens[:, None], torch.ones(len(prompts), dtype=torch.long))
        if append:
            self.pending.extend(new)
        else:
            self.pending = new

    @torch.no_grad()
    def propose(self, k: int, sampling: SamplingConfig, generator):
        """k >= 1 drafts per row; steps with k = 0 skip the drafter and it catches up here."""
        # Catch up: the target's pairs not yet in the cache (ragged, right-padded).
        hidden, tokens, counts = self.pending.take()
        inputs = self.model.fuse(hidden, tokens, None)
        features = self.decoder.forward(num_new=counts, inputs_embeds=inputs).last_hidden_state
        feature = features[torch.arange(len(counts), device=self.device), (counts - 1).to(self.device)]
        tokens, probs = [], []
        for j in range(k):
            token, prob = choose_draft(self.model.logits(feature), self.target_vocab_size, sampling, generator)
            tokens.append(token)
            probs.append(prob)
            if j < k - 1:  # the head goes on from its own prediction
                inputs = self.model.fuse(feature[:, None], token[:, None], None)
                feature = self.decoder.forward(inputs_embeds=inputs).last_hidden_state[:, 0]
        return torch.stack(tokens, dim=1), (torch.stack(probs, dim=1) if not sampling.greedy else None)

    def commit(self, k: int, num_accepted: torch.Tensor, output_tokens: torch.Tensor,
               target_hidden_states: torch.Tensor) -> None:
        """num_accepted [B] and output_tokens [B, k+1] on the host; target_hidden_states [B, k+1, H]."""
        self.decoder.drafting = k > 0  # rows joining after a plain step keep their prefill waiting (put_off.py)
        # propose(k) fed k-1 drafts on predicted features: all go, the target's own states replace them.
        batch = len(num_accepted)
        if k > 1:
            self.decoder.rollback(torch.full((batch,), k - 1, dtype=torch.long))
        self.pending.append(target_hidden_states, output_tokens.to(self.device), num_accepted + 1)

    def select_rows(self, rows: torch.Tensor) -> None:
        self.decoder.select_rows(rows)
        self.pending.select_rows(rows)

    @property
    def prefill_waits(self) -> bool:
        return self.decoder.waits

    def prefill_put_off(self) -> int:
        return self.decoder.prefill_put_off()

    def fork(self) -> MsdDrafter:
        forked = copy.copy(self)
        forked.decoder, forked.pending = self.decoder.fork(), PendingPairs.empty()
        return forked

    def adopt_rows(self, other: MsdDrafter, count: int, append: bool) -> None:
        self.decoder.adopt_rows(other.decoder, count, append)
        rows = len(other.pending.counts)
        moved = other.pending.rows(torch.arange(rows - count, rows))
        other.pending.select_rows(torch.arange(rows - count))  # the fork keeps its first rows, uncopied
        if append:
            self.pending.extend(moved)
        else:
            self.pending = moved


class PendingPairs:
    """Per row, the target's pairs (h_t, x_{t+1}) the head has not read yet: hidden states [B, C, H] and tokens [B, C]
    with a count per row [B] on the host (C, the capacity, at least the largest count).

    An append writes each row's new pairs in place after its count, the capacity doubling when short, so a step costs
    the same however long the head has waited (a plain stretch under `auto`): concatenating and gathering the whole
    buffer at every step, as before, cost 140 us a step at batch 32 on the demo world, and the head, attached but not
    drafting, cost 7.8% of plain decoding's time. A plain step's pairs are queued as they are and written when next
    read: in one slice while every row holds as many pairs (`level`: from a prefill on, through plain steps), else in
    one scatter for all the queued steps. Written at once (a slice, 3 calls fewer than the scatter before it), a plain
    step's commit took 34 us at batch 32, queued 17 us (cProfile), while the head attached but not drafting cost 2-3%
    of plain decoding's time; after a drafting step (counts differ per row) each plain step wrote its own scatter, and
    plain steps ran 8% slower than the engine's without a drafter for as long as they lasted (batch 1, the demo
    world; MASSV's, whose drafter keeps no pairs, 1%).

    Rows come and go as the KV cache's do (continuous batching): the buffers hold the live rows first and spare rows
    after them; a row that leaves hands its place to a live row from the end, and rows that join are written into
    spare rows, so neither copies the rows that stay. Gathered and concatenated whole at every leave and join, the
    pairs cost 4-5% of continuous batching's time at batch 32 with the head attached but not drafting (cProfile: 155
    us a leave, 136 us a join).
    """

    def __init__(self, hidden: torch.Tensor | None, tokens: torch.Tensor | None, counts: torch.Tensor):
        self._hidden, self._tokens, self.counts = hidden, tokens, counts  # buffers [R, C, H], [R, C]: R >= B rows
        self.level = _level(counts)
        self._queued: list[tuple[torch.Tensor, torch.Tensor]] = []  # plain steps' pairs ([B, 1, H], [B, 1]), unwritten

    @classmethod
    def empty(cls) -> PendingPairs:
        return cls(None, None, torch.zeros(0, dtype=torch.long))

    @property
    def hidden(self) -> torch.Tensor | None:
        """The live rows' hidden states [B, C, H] (a view of the buffer)."""
        return None if self._hidden is None else self._hidden[: len(self.counts)]

    @property
    def tokens(self) -> torch.Tensor | None:
        """The live rows' tokens [B, C] (a view of the buffer)."""
        return None if self._tokens is None else self._tokens[: len(self.counts)]

    def append(
        self,
        hidden: torch.Tensor,  # [B, q, H]
        tokens: torch.Tensor,  # [B, q]: row i's first counts[i] are its new pairs' tokens
        counts: torch.Tensor,  # [B] on the host
    ) -> None:
        if tokens.shape[1] == 1:  # a plain step: every row gets one pair
            self._queued.append((hidden, tokens))
            return
        self._write_queued()
        self._scatter(hidden, tokens)
        self.level = None
        self.counts = self.counts + counts

    def _scatter(
        self,
        hidden: torch.Tensor,  # [B, q, H]
        tokens: torch.Tensor,  # [B, q]
    ) -> None:
        """Write each row's q pairs after its count (entries past a row's new count are overwritten by its next
        pairs); the counts are the caller's to move."""
        width = tokens.shape[1]
        needed = int(self.counts.max()) + width
        if needed > self._tokens.shape[1]:
            self._grow(self._tokens.shape[0], 2 * needed)
        index = (self.counts[:, None] + torch.arange(width)).to(tokens.device)  # [B, q]
        self.hidden.scatter_(1, index[..., None].expand(-1, -1, hidden.shape[-1]), hidden.to(self._hidden.dtype))
        self.tokens.scatter_(1, index, tokens)

    def _write_queued(self) -> None:
        """Write the queued plain steps' pairs after every row's pairs: one slice while every row holds `level`, else
        one scatter for them all."""
        if not self._queued:
            return
        hidden, tokens = (torch.cat(parts, dim=1) for parts in zip(*self._queued))
        self._queued, width = [], tokens.shape[1]
        if self.level is None:
            self._scatter(hidden, tokens)
        else:
            if self.level + width > self._tokens.shape[1]:
                self._grow(self._tokens.shape[0], 2 * (self.level + width))
            self.hidden[:, self.level : self.level + width] = hidden
            self.tokens[:, self.level : self.level + width] = tokens
            self.level += width
        self.counts = self.counts + width

    def take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pairs, right-padded to the largest count (hidden [B, P, H], tokens [B, P] with 0 as padding, counts
        [B]); none are left pending. The tensors are views, valid until the next append."""
        self._write_queued()
        counts, width = self.counts, int(self.counts.max())
        padding = (torch.arange(width)[None] >= counts[:, None]).to(self._tokens.device)
        tokens = self.tokens[:, :width].masked_fill(padding, 0)  # rejected slots hold -1
        self.counts, self.level = torch.zeros_like(counts), 0
        return self.hidden[:, :width], tokens, counts

    def rows(self, rows: torch.Tensor) -> PendingPairs:
        """These rows (host indices) as pairs of their own (a copy)."""
        self._write_queued()
        if self._tokens is None:
            return PendingPairs(None, None, self.counts[rows])
        on_device = rows.to(self._tokens.device)
        return PendingPairs(self.hidden[on_device], self.tokens[on_device], self.counts[rows])

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep these rows (host indices), in this order. Rows already in place are not copied: keeping the first n
        copies nothing, and filling each leaver's place with a row from past the new end copies only those rows (the
        running batch removes rows that way); any other order is gathered."""
        self._write_queued()
        if self._tokens is not None:
            moves = moves_in_place(rows)
            if moves is None:
                kept = self.rows(rows)
                self._hidden, self._tokens = kept._hidden, kept._tokens
            for place, row in moves or ():
                self._hidden[place] = self._hidden[row]
                self._tokens[place] = self._tokens[row]
        self.counts = self.counts[rows]  # the level holds

    def extend(self, other: PendingPairs) -> None:
        """Other's rows after these (rows joining the batch): written into spare rows, the buffers growing only when
        too few rows or too narrow (then the live rows are copied once)."""
        self._write_queued()
        other._write_queued()
        if self._tokens is None or not len(self.counts):
            self._hidden, self._tokens, self.counts = other._hidden, other._tokens, other.counts
        elif other._tokens is not None and len(other.counts):
            rows, new, width = len(self.counts), len(other.counts), other._tokens.shape[1]
            if self._tokens.shape[0] < rows + new or self._tokens.shape[1] < width:
                self._grow(rows + new, width)
            self._hidden[rows : rows + new, :width] = other.hidden.to(self._hidden.dtype)
            self._tokens[rows : rows + new, :width] = other.tokens
            self.counts = torch.cat([self.counts, other.counts])
        self.level = _level(self.counts)

    def _grow(self, rows: int, capacity: int) -> None:
        """Buffers of at least `rows` rows and `capacity` pairs a row, holding the live rows' pairs."""
        live, hidden_size = len(self.counts), self._hidden.shape[2]
        rows, capacity = max(rows, self._tokens.shape[0]), max(capacity, self._tokens.shape[1])
        hidden = self._hidden.new_zeros((rows, capacity, hidden_size))
        tokens = self._tokens.new_zeros((rows, capacity))
        hidden[:live, : self._tokens.shape[1]] = self.hidden
        tokens[:live, : self._tokens.shape[1]] = self.tokens
        self._hidden, self._tokens = hidden, tokens


def _level(counts: torch.Tensor) -> int | None:
    """The pairs every row holds, where all hold as many (see PendingPairs.level); else None."""
    return int(counts[0]) if len(counts) and bool((counts == counts[0]).all()) else None
