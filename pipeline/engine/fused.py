"""A drafter's decoding forward with fewer calls: the decoder stack of a Llama-architecture model, fused.

A small drafter on a CPU (or a GPU at small batch) is bound by the number of calls per forward, not by its
arithmetic: on the demo world one forward of the MASSV drafter's single layer cost a third of the whole
4-layer target's. `FusedStack` runs the model's own weights with query, key and value as one matmul, gate
and up as one, torch's fused rms_norm, the rotary embedding applied to query and key in one pass, and no
module calls but the embedding's and the rotary's: half the time per forward of the demo's MASSV drafter
(0.46 -> 0.23 ms at batch 1, 0.65 -> 0.39 ms at batch 32). Its outputs equal HF's up to float rounding;
a drafter's numbers only decide which tokens are proposed, never which are output (the target verifies
every one), so drafters (their causal LMs, MSD heads) use it and targets never do.

Model types: those whose decoder layer is Llama's (pre-norm attention + gated MLP, rotary positions),
optionally with q/k/v biases (Qwen2) or per-head q/k norms (Qwen3). `FusedStack.of(model)` is None for any
other, and the decoder keeps the model's own forward.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.engine.kv_cache import FULL_ATTENTION, RaggedKVCache

FUSED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


class FusedStack:
    """The decoder stack (and output head, if any) of a Llama-architecture model, for decoding with a
    RaggedKVCache: a causal LM gives logits, a base model (an MSD head) its last hidden states."""

    def __init__(self, model: nn.Module):
        stack, self.head = model.get_decoder(), model.get_output_embeddings()
        self.embed_tokens, self.rotary_emb = stack.embed_tokens, stack.rotary_emb
        self.norm = _Norm(stack.norm)
        layer_types = getattr(model.config.get_text_config(), "layer_types", None)
        self.layers = [_FusedLayer(layer, layer_types[i] if layer_types else FULL_ATTENTION)
                       for i, layer in enumerate(stack.layers)]

    @classmethod
    def of(cls, model: nn.Module) -> FusedStack | None:
        return cls(model) if model.config.model_type in FUSED_MODEL_TYPES else None

    def __call__(
        self,
        attention_mask: torch.Tensor | dict[str, torch.Tensor],  # [B, 1, q, kv] additive, or one per layer type
        position_ids: torch.Tensor,  # [B, q]
        cache: RaggedKVCache,
        input_ids: torch.Tensor | None = None,  # [B, q]
        inputs_embeds: torch.Tensor | None = None,  # [B, q, H]
    ) -> SimpleNamespace:  # last_hidden_state [B, q, H] (after the final norm) and logits [B, q, V] or None
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = self.rotary_emb(hidden, position_ids=position_ids)  # [B, q, head_dim] each
        rotary = (cos[:, None], sin[:, None])
        for layer in self.layers:
            mask = attention_mask[layer.attention_type] if isinstance(attention_mask, dict) else attention_mask
            hidden = layer(hidden, rotary, mask, cache)
        hidden = self.norm(hidden)
        return SimpleNamespace(last_hidden_state=hidden, logits=None if self.head is None else self.head(hidden))


class _Norm:
    """An HF RMSNorm module's weight and epsilon, applied by torch's fused rms_norm."""

    def __init__(self, norm: nn.Module):
        self.weight, self.eps = norm.weight, norm.variance_epsilon

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class _FusedLayer:
    """One decoder layer's weights, q/k/v and gate/up concatenated (the layer's own parameters become views)."""

    def __init__(self, layer: nn.Module, attention_type: str):
        attention, mlp = layer.self_attn, layer.mlp
        self.layer_idx, self.attention_type = attention.layer_idx, attention_type
        self.head_dim, self.scaling = attention.head_dim, attention.scaling
        q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
        self.query_width, self.key_width = q.out_features, k.out_features
        self.query_heads = q.out_features // self.head_dim
        self.grouped = q.out_features != k.out_features
        self.qkv_weight, self.qkv_bias = _concat(q, k, v)
        self.o_weight, self.o_bias = attention.o_proj.weight, attention.o_proj.bias
        self.down_weight, self.down_bias = mlp.down_proj.weight, mlp.down_proj.bias
        self.act_fn = mlp.act_fn
        self.gate_up_weight, self.gate_up_bias = _concat(mlp.gate_proj, mlp.up_proj)
        self.input_norm, self.post_attention_norm = _Norm(layer.input_layernorm), _Norm(layer.post_attention_layernorm)
        self.q_norm = _Norm(attention.q_norm) if hasattr(attention, "q_norm") else None  # Qwen3: per head
        self.k_norm = _Norm(attention.k_norm) if hasattr(attention, "k_norm") else None

    def __call__(self, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                 cache: RaggedKVCache) -> torch.Tensor:  # hidden [B, q, H] in and out
        batch, q, _ = hidden.shape
        qkv = F.linear(self.input_norm(hidden), self.qkv_weight, self.qkv_bias)
        query, key, value = qkv.split([self.query_width, self.key_width, self.key_width], dim=-1)
        query, key, value = (t.view(batch, q, -1, self.head_dim) for t in (query, key, value))
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        query_key = _rotate(torch.cat([query, key], dim=2).transpose(1, 2), *rotary)  # [B, heads, q, head_dim]
        query, key = query_key[:, : self.query_heads], query_key[:, self.query_heads :]
        key, value = cache.update(key, value.transpose(1, 2), self.layer_idx)
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=self.scaling,
                                                  enable_gqa=self.grouped)
        hidden = hidden + F.linear(attended.transpose(1, 2).reshape(batch, q, -1), self.o_weight, self.o_bias)
        gate, up = F.linear(self.post_attention_norm(hidden), self.gate_up_weight, self.gate_up_bias).chunk(2, -1)
        return hidden + F.linear(self.act_fn(gate) * up, self.down_weight, self.down_bias)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as HF applies it (rotate_half): x [B, heads, q, d], cos/sin [B, 1, q, d]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _concat(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The linears' weights (and biases) stacked along the output dimension, so one matmul computes them all.
    The linears' own parameters become views of the stacked tensors: the model keeps one copy of its weights
    (a 0.5B drafter's q/k/v and gate/up are about half a GB in bf16), and its own forward (prefill) reads the
    same numbers."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    bias = None if linears[0].bias is None else torch.cat([linear.bias.detach() for linear in linears])
    start = 0
    for linear in linears:
        end = start + linear.out_features
        linear.weight = nn.Parameter(weight[start:end], requires_grad=linear.weight.requires_grad)
        if bias is not None:
            linear.bias = nn.Parameter(bias[start:end], requires_grad=linear.bias.requires_grad)
        start = end
    return weight, bias
