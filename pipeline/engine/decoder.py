"""Runs any HF decoder (a VLM or a causal LM) over a batch of ragged rows with a RaggedKVCache.

A target's prefill goes through HF's own forward on a left-padded batch, so whatever
a family does in prefill (Gemma3's bidirectional attention inside an image, say) stays
HF's business; the resulting cache is converted once into right-padded rows. Where that
forward is only the language model over the prompt embeddings (LLaVA's, Qwen2.5-VL's; Qwen3-VL's
with its DeepStack features; Gemma3's, with the masks its family builds), the exact stack runs it
instead, on the same left-padded batch with HF's own masks: HF's numbers bit for bit without HF's
module calls. A drafter's (a causal Llama-architecture stack, its
numbers only choosing proposals) goes through its fused stack, as one forward of many tokens
per row. Every later forward appends tokens with explicit per-row positions (from the family
seam) and masks (from `kv_cache`), through a FusedStack where the model has one
(`fused.py`: exact for targets, HF's numbers bit for bit), else HF's forward;
`rollback` discards them again. This module has no family-specific branches.
"""

from __future__ import annotations

import copy
import inspect
from types import SimpleNamespace

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from pipeline.engine.families import ROTARY, RotaryFamily
from pipeline.engine.fused import EXACT, FUSED, DeepStack, FusedStack
from pipeline.engine.kv_cache import FULL_ATTENTION, RaggedKVCache, attention_masks, layer_types_of

# Model types whose forward, once the prompt is in the cache, is the decoder stack and then the output head, nothing
# more (a VLM's wrappers only dispatch; Gemma3's text LM also soft-caps its logits when configured to, so a config
# that does keeps the whole forward): decode steps call those two directly. Checked in transformers 5.23 and 5.24,
# and by the greedy-identity tests per family. The wrappers' own work per call was 11% of plain decoding at batch 1
# on the demo world (3% at batch 8). Other types keep the model's whole forward.
DIRECT_DECODE_MODEL_TYPES = frozenset(
    {"llava", "gemma3", "gemma3_text", "qwen2_5_vl", "qwen3_vl", "llama", "qwen2", "qwen3"})


class RaggedDecoder:
    """A model plus its RaggedKVCache; the caller decides what each row appends and rolls back."""

    def __init__(self, model: nn.Module, family: RotaryFamily = ROTARY, stack: str = EXACT):
        """stack: how decode steps run where the model type has a FusedStack (fused.py): EXACT (HF's numbers bit
        for bit: targets), FUSED (HF's up to rounding, faster: drafters, whose numbers only choose proposals) or
        HF_FORWARD; elsewhere they run HF's own forward."""
        self.model = model
        self.family = family
        text_config = model.config.get_text_config()
        self.layer_types, self.sliding_window = layer_types_of(text_config)
        self.cache: RaggedKVCache | None = None
        # read once: HF's model.device and .dtype walk the parameters on every call (profiled: about 3% of
        # plain decoding on the demo world at batch 1); the model stays where it is once decoding starts
        self.device, self.dtype = model.device, model.dtype
        # a causal LM computes logits of the last prompt token only; a feature model (an MSD head) has none
        keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.prefill_options = {"logits_to_keep": 1} if keeps_logits else {}
        head = model.get_output_embeddings()
        direct = (model.config.model_type in DIRECT_DECODE_MODEL_TYPES and head is not None
                  and getattr(model.config, "final_logit_softcapping", None) is None)
        self.stack_and_head = (model.get_decoder(), head) if direct else None
        # an exact stack stands for the decoder stack and head, so only where decoding is those two (direct)
        self.fused_stack = FusedStack.of(model, stack) if direct or stack != EXACT else None
        # a drafter's prefill goes through its fused stack too (see _fused_prefill); a target's through its exact one
        # where HF's prefill forward is the stack over the prompt's embeddings, with one causal mask or the masks the
        # family builds (see _exact_prefill)
        self.fused_prefill = self.fused_stack is not None and stack == FUSED
        self.exact_prefill = self.fused_stack is not None and stack == EXACT
        self.prefill_cache_name = _cache_name(model.forward)
        self.decode_cache_name = _cache_name((self.stack_and_head[0] if direct else model).forward)

    @property
    def lengths(self) -> torch.Tensor:
        """[B] committed tokens per row, on the host."""
        return self.cache.lengths

    @torch.no_grad()
    def prefill(
        self,
        attention_mask: torch.Tensor,  # [B, L] 0/1, zeros on the left
        position_ids: torch.Tensor,  # [B, L] or [axes, B, L], from the family (or the drafter's own numbering)
        offsets: torch.Tensor,  # [B] on the host: each row's next position minus its length
        append: bool = False,  # add these rows after those already in the cache, instead of replacing them
        hidden_states: bool = False,  # also return the last hidden states [B, L, H] (left-padded)
        model_masks: dict[str, torch.Tensor] | None = None,  # the forward's masks by layer type, where the family
        # builds them (families.py); else the forward builds its own from attention_mask
        **model_inputs,  # the left-padded prompts as the family feeds them: inputs_embeds [B, L, H] or input_ids
    ):  # the model's output: logits [B, 1, V] of each row's last prompt token (a feature model: its features)
        if (self.fused_prefill and not hidden_states and position_ids.dim() == 2
                and len(model_inputs) == 1 and model_inputs.keys() <= {"input_ids", "inputs_embeds"}):
            return self._fused_prefill(attention_mask, position_ids, offsets, append, **model_inputs)
        if ("inputs_embeds" in model_inputs and model_inputs.keys() <= {"inputs_embeds", "deepstack"}
                and self.prefills_through_stack(model_masks is not None)):
            return self._exact_prefill(attention_mask, position_ids, offsets, append, model_masks, **model_inputs)
        lengths = attention_mask.sum(dim=1)
        out = self.model(
            attention_mask=attention_mask if model_masks is None else model_masks,
            position_ids=position_ids,
            use_cache=True,
            **self.prefill_options,
            **_hidden_states_request(hidden_states),
            **model_inputs,
        )
        hf_cache = getattr(out, self.prefill_cache_name)
        self._take(RaggedKVCache.from_left_padded(hf_cache, lengths, attention_mask.shape[1], offsets), append)
        return out

    def prefills_through_stack(self, family_masks: bool) -> bool:
        """A target's prefill over the prompt's embeddings runs its exact stack: with the masks its family builds, or
        where every layer attends fully, with the one causal mask the stack builds as HF's forward does. (What the
        family hands the prefill depends on it: Qwen3-VL's DeepStack features go to the stack alone.)"""
        return self.exact_prefill and (family_masks or self.layer_types == {FULL_ATTENTION})

    def _fused_prefill(self, attention_mask, position_ids, offsets, append, **model_inputs) -> SimpleNamespace:
        """prefill, for a drafter: each row's prompt moved to the left (right-padded) and run through the fused stack
        into a new cache as one forward of the whole width, as a decode step of many tokens is: no HF wrappers, no
        cache conversion. On the demo world a drafter's put-off prefill of one prompt took 0.6-0.7 ms so, 0.8-0.9
        through HF's forward (of 8 prompts: MASSV's 1.01 ms against 1.27, MSD's 1.7 ms either way, its arithmetic).
        Each row's padding columns repeat its last token, at slots no real token attends to and the next forward
        overwrites. Logits (or features) of each row's last prompt token only."""
        lengths = attention_mask.sum(dim=1)  # [B]
        width = attention_mask.shape[1]
        columns = torch.arange(width, device=attention_mask.device)[None] + (width - lengths)[:, None]
        columns = columns.clamp(max=width - 1)  # [B, L]: row i's column j is its token j, then its last again
        name, inputs = next(iter(model_inputs.items()))  # input_ids [B, L] or inputs_embeds [B, L, H]
        inputs = inputs.gather(1, columns if inputs.dim() == 2 else columns[..., None].expand_as(inputs))
        cache = RaggedKVCache(len(self.fused_stack.layers), torch.zeros_like(lengths, device="cpu"), self.device,
                              offsets)
        slots = cache.begin_forward(width)
        masks = attention_masks(slots, cache.kv_len, self.layer_types, self.sliding_window, self.dtype)
        out = self.fused_stack(masks, position_ids.gather(1, columns), cache, logits=False, **{name: inputs})
        cache.end_forward(lengths)
        self._take(cache, append)
        last = out.last_hidden_state[torch.arange(len(lengths)), lengths.to(out.last_hidden_state.device) - 1][:, None]
        head = self.fused_stack.head
        return SimpleNamespace(last_hidden_state=last, logits=head(last) if head is not None else last)

    def _exact_prefill(self, attention_mask, position_ids, offsets, append, model_masks, inputs_embeds,
                       deepstack: DeepStack | None = None) -> SimpleNamespace:
        """prefill, for a target whose prefill forward is its language model over the prompt's embeddings (images
        filled in by the family; Qwen3-VL's DeepStack features added after its first layers) with one causal mask,
        or with the masks the family builds (Gemma3's): the exact stack over the same left-padded batch, with the
        masks HF's forward would use, gives HF's logits, hidden states and cache bit for bit (tested) without HF's
        module calls (LLaVA's, Qwen2.5-VL's, Qwen3-VL's and Gemma3's prefill). On the demo world (LLaVA, prompts of
        39 tokens) the language model's prefill took 1.34 ms against HF's 2.00 at batch 1, 4.0 against 4.9 at 8,
        12.5 against 17.6 at 32; in the bench (two runs each, in turn) prefill's share of MASSV's time at batch 1
        fell from 0.27 to 0.24, MASSV at gamma 6 1.98-1.99x -> 2.01-2.02x HF generate, MSD 1.92-1.94x -> 1.98x; at
        batch 8 and 32 within the runs' spread. The tiny test Qwen2.5-VL target's prefill of 13 rows with images:
        15.0 ms against 16.9; the tiny Gemma3 target's of 64 rows one by one, 0.25 s against 0.35 (with the masks
        its family builds; 1.09 s with the masks HF's forward built)."""
        stack = self.fused_stack
        # as HF's forward builds it: multi-axis (M-RoPE) positions do not shape the mask (Qwen2.5-VL's text model)
        mask = model_masks if model_masks is not None else create_causal_mask(
            config=self.stack_and_head[0].config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            cache=None, position_ids=position_ids if position_ids.dim() == 2 else None)
        prompt_kv = _PromptKV(int(position_ids.max()) + 1)
        out = stack(mask, position_ids, prompt_kv, inputs_embeds=inputs_embeds, logits=False, deepstack=deepstack)
        lengths = attention_mask.sum(dim=1)
        self._take(RaggedKVCache.from_left_padded(prompt_kv, lengths, attention_mask.shape[1], offsets), append)
        return SimpleNamespace(logits=stack.head(out.last_hidden_state[:, -1:]), hidden_states=out.hidden_states)

    def _take(self, cache: RaggedKVCache, append: bool) -> None:
        """A prefill's cache: the decoder's, or (append) its rows after the decoder's."""
        if append and self.cache is not None:
            self.cache.append_rows(cache)
        else:
            self.cache = cache

    @torch.no_grad()
    def forward(
        self,
        num_new: torch.Tensor | None = None,  # [B] on the host: row i appends its first num_new[i] tokens (all q)
        hidden_states: bool = False,  # also return the last hidden states [B, q, H]
        **model_inputs,  # input_ids [B, q] or inputs_embeds [B, q, H]
    ):  # the model's output: logits [B, q, V] (a feature model: its features)
        """Run q tokens per row at each row's next slots and append them (right-padded rows: fewer)."""
        q = next(iter(model_inputs.values())).shape[1]
        slots = self.cache.begin_forward(q)
        positions = self.family.decode_positions(slots, self.cache.position_offsets)
        if self.fused_stack is not None:
            # one row's one token attends to every slot its row holds (within a sliding window the row has reached:
            # not): no mask, as HF's own forward passes none there (generate at batch 1), so the exact stack gives its
            # numbers bit for bit (a mask of zeros moved them by rounding), and building it cost a tenth of a drafter's
            # forward at batch 1 on the demo world (36 of 350 us)
            whole_rows = q == 1 and len(slots) == 1
            masks = attention_masks(slots, self.cache.kv_len, self.layer_types, self.sliding_window, self.dtype,
                                    whole_rows)
            out = self.fused_stack(masks, positions, self.cache, **model_inputs)
        else:
            masks = attention_masks(slots, self.cache.kv_len, self.layer_types, self.sliding_window, self.dtype)
            out = self._decode_forward(
                attention_mask=masks,
                position_ids=positions,
                **{self.decode_cache_name: self.cache},
                use_cache=True,
                **_hidden_states_request(hidden_states),
                **model_inputs,
            )
        self.cache.end_forward(q if num_new is None else num_new)
        return out

    def _decode_forward(self, **inputs):
        """The model's forward on tokens after the prompt: its decoder stack and output head where that is all
        it does (DIRECT_DECODE_MODEL_TYPES), else the whole forward."""
        if self.stack_and_head is None:
            return self.model(**inputs)
        stack, head = self.stack_and_head
        out = stack(**inputs)
        return SimpleNamespace(logits=head(out.last_hidden_state), hidden_states=out.hidden_states)

    def rollback(self, num_dropped: torch.Tensor) -> None:
        """Discard the last num_dropped[i] tokens of row i (host tensor)."""
        self.cache.rollback(num_dropped)

    def select_rows(self, rows: torch.Tensor) -> None:
        self.cache.select_rows(rows)

    def fork(self) -> RaggedDecoder:
        """The same model with a cache of its own, empty: rows prefilled ahead of their admission wait in one."""
        forked = copy.copy(self)
        forked.cache = None
        return forked

    def adopt_rows(self, other: RaggedDecoder, count: int, append: bool) -> None:
        """Move the last `count` rows of another decoder of this model (a fork) after this one's rows, or (not
        append) in place of them; `other` keeps its first rows, uncopied."""
        source = other.cache
        keep = len(source.lengths) - count
        if not append and keep == 0:  # all of them, into an empty batch: the cache changes hands as it is
            self.cache, other.cache = source, RaggedKVCache.empty_like(source)
            return
        if not append:
            self.cache = RaggedKVCache.empty_like(source)
        self.cache.append_rows(source, start=keep)
        source.select_rows(torch.arange(keep))


class _PromptKV:
    """Where the exact stack's prefill leaves each layer's keys and values [B, heads, L, head_dim], as HF's cache of
    a prefill holds them (`layers[i].keys`, `.values`) for RaggedKVCache.from_left_padded."""

    def __init__(self, position_bound: int):
        self.position_bound = position_bound  # the stack's rotary table covers the positions below it
        self.layers: list[SimpleNamespace] = []

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.layers.append(SimpleNamespace(keys=key, values=value))  # called layer by layer, in order
        return key, value


def _cache_name(forward) -> str:
    """What a forward calls its KV cache (argument and output): transformers 5.24 renamed `past_key_values` to
    `cache` (the old name warns, and goes in 5.40); earlier releases know only the old one."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _hidden_states_request(wanted: bool) -> dict:
    """HF keeps every layer's output when asked; [-1], the last one (after the final norm), is what is read."""
    return {"output_hidden_states": True} if wanted else {}
