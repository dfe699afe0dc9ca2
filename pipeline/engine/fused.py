"""The decoder stack of a Llama-architecture model without its module calls, for decode steps and prefills: fused or
exact.

A small model on a CPU (or a GPU at small batch) is bound by the number of calls per forward, not by its
arithmetic: on the demo world one forward of the MASSV drafter's single layer cost a third of the whole
4-layer target's, and half of the target's own decode step was HF's Python (module calls, wrappers, hooks).
`FusedStack` runs the model's own weights with no module calls but the embedding's and the rotary's, in one
of two ways:
- fused (drafters): query, key and value as one matmul, gate and up as one, the rotary embedding applied to query
  and key where that matmul left them, norms as a vector norm on a CPU, the output head on the tokens as rows: half
  the time per forward of the demo's MASSV drafter (0.46 -> 0.23 ms at batch 1, 0.65 -> 0.39 ms at batch 32), then
  0.74x / 0.78x / 0.81x of that at batch 1 / 8 / 32 (five forwards, MASSV; MSD's head 0.79x / 0.85x / 0.95x) once
  its norms (half of the saving), attention, head and activation lost calls. Its outputs equal HF's up to float
  rounding; a drafter's numbers only decide which tokens are proposed, never which are output (the target verifies
  every one).
- exact (targets): HF's own operations in HF's order on HF's layouts (each projection its own matmul, the
  norms' own numbers, through torch's rms_norm where it computes them, the rotary embedding's rotate_half on query
  and key in one pass, HF's attention function), so its logits equal HF's bit for bit (tested per model type) and
  the target's answers stay HF's own.

Model types: those whose decoder layer is Llama's (pre-norm attention + gated MLP, rotary positions),
optionally with q/k/v biases (Qwen2) or per-head q/k norms (Qwen3), alone or as a VLM's language model (LLaVA's,
Qwen2.5-VL's and Qwen3-VL's); and Gemma3's, exact for either kind (each block's output normed before its residual
add, a rotary embedding per layer type, sliding-window layers through their masks). A target's prefill runs the exact
stack where HF's prefill forward is the stack over the prompt's embeddings and one causal mask (LLaVA's,
Qwen2.5-VL's, and Qwen3-VL's with its DeepStack features added after its first layers, as HF's forward adds them) or
the masks the family builds (Gemma3's: sliding windows, bidirectional attention within an image).
`FusedStack.of(model, kind)` is None for any other (and, exact, for attention other than sdpa), and the decoder
keeps the model's own forward.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from pipeline.engine.kv_cache import FULL_ATTENTION, RaggedKVCache

# the Qwen-VL language models' layers are Qwen2's and Qwen3's; their M-RoPE lives in the rotary embedding, which the
# stack calls as the model does, with the decoder's [3, B, q] positions (checked in transformers 5.24)
FUSED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen2_5_vl_text", "qwen3_vl_text"})
# Gemma3's language model: Llama's layer with each block's output normed before its residual add ("sandwich" norms),
# a rotary embedding per layer type (local and global bases), scaled embeddings and (1 + weight) norms in float32:
# its layers run exact for either kind (a Gemma3 MSD head's too: what it saves is the module calls)
SANDWICH_MODEL_TYPES = frozenset({"gemma3_text"})
# rope types whose frequencies change with the sequence's length (HF's dynamic_rope_update): not tabled
POSITION_DEPENDENT_ROPE = ("dynamic", "longrope")
EXACT_ATTENTION = "sdpa"  # the attention implementation Target.load asks for; others keep HF's forward

# How a RaggedDecoder runs decode steps: HF's own forward, or a FusedStack of either kind where the model has one
HF_FORWARD, FUSED, EXACT = "hf", "fused", "exact"


class DeepStack(NamedTuple):
    """Qwen3-VL's DeepStack: visual features its vision tower took from several of its layers, each added to the
    language model's hidden states at the image positions after one of its first layers."""

    positions: torch.Tensor  # [B, L] bool: the image tokens of the prompts
    features: list[torch.Tensor]  # per early layer, [image tokens of the batch, H] row-major


class FusedStack:
    """The decoder stack (and output head, if any) of a Llama-architecture model, for decoding with a
    RaggedKVCache: a causal LM gives logits, a base model (an MSD head) its last hidden states."""

    def __init__(self, model: nn.Module, exact: bool = False):
        stack, self.head = model.get_decoder(), model.get_output_embeddings()
        self.embed_tokens, self.rotary_emb = stack.embed_tokens, stack.rotary_emb
        layer_kind = (_SandwichLayer if stack.config.model_type in SANDWICH_MODEL_TYPES
                      else _ExactLayer if exact else _FusedLayer)
        self.norm = layer_kind.norm_of(stack.norm)
        # the output head on the tokens as rows, as the projections are (_Linear: the module's numbers, one call less)
        self.output = None if self.head is None else _Linear(self.head.weight, self.head.bias)
        layer_types = getattr(model.config.get_text_config(), "layer_types", None)
        self.layers = [layer_kind(layer, layer_types[i] if layer_types else FULL_ATTENTION)
                       for i, layer in enumerate(stack.layers)]
        # a rotary embedding of its own per layer type (Gemma3's) is called with the type; others once for all layers
        rope_types = getattr(stack.rotary_emb, "rope_type", None)
        self.rotary_keys = sorted({layer.attention_type for layer in self.layers}) if isinstance(rope_types, dict) \
            else [None]
        # cos and sin [positions, head_dim] of every position so far (per rotary key), where they depend on the
        # position alone
        self.rotary_tables: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rotary_tabled = all((rope_types[key] if key else rope_types) not in (None, *POSITION_DEPENDENT_ROPE)
                                 for key in self.rotary_keys)

    @classmethod
    def of(cls, model: nn.Module, kind: str) -> FusedStack | None:
        """A FusedStack of this kind (FUSED or EXACT) for the model, or None (HF_FORWARD, or no such stack)."""
        stack = model.get_decoder()
        if kind == HF_FORWARD or stack.config.model_type not in FUSED_MODEL_TYPES | SANDWICH_MODEL_TYPES:
            return None
        if kind == EXACT and stack.config._attn_implementation != EXACT_ATTENTION:
            return None
        return cls(model, exact=kind == EXACT)

    def __call__(
        self,
        attention_mask: torch.Tensor | dict[str, torch.Tensor] | None,  # [B, 1, q, kv] additive (a dict: per type)
        position_ids: torch.Tensor,  # [B, q], or [3, B, q] (M-RoPE)
        cache: RaggedKVCache,
        input_ids: torch.Tensor | None = None,  # [B, q]
        inputs_embeds: torch.Tensor | None = None,  # [B, q, H]
        logits: bool = True,  # the output head's too (a prefill wants its last tokens' only: the caller's)
        deepstack: DeepStack | None = None,  # a Qwen3-VL prefill's, added after its first layers
    ) -> SimpleNamespace:  # last_hidden_state [B, q, H] (after the final norm; also hidden_states[-1], as HF's)
        # and logits [B, q, V] or None
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, q, width = hidden.shape
        rotary = {key: self._rotary(hidden, position_ids, cache.position_bound, key) for key in self.rotary_keys}
        hidden = hidden.reshape(batch * q, width)  # the layers' tokens as rows (see _Linear)
        for i, layer in enumerate(self.layers):
            mask = attention_mask[layer.attention_type] if isinstance(attention_mask, dict) else attention_mask
            hidden = layer(hidden, rotary[layer.attention_type if self.rotary_keys[0] else None], mask, cache)
            if deepstack is not None and i < len(deepstack.features):  # as HF's text model adds them
                hidden = hidden.clone()
                image_rows = deepstack.positions.reshape(-1)
                hidden[image_rows, :] = hidden[image_rows, :] + deepstack.features[i]
        hidden = self.norm(hidden)
        scores = None if self.output is None or not logits else self.output(hidden).view(batch, q, -1)
        hidden = hidden.view(batch, q, width)
        return SimpleNamespace(last_hidden_state=hidden, hidden_states=(hidden,), logits=scores)

    def _rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor, bound: int, layer_type: str | None
                ) -> tuple[torch.Tensor, torch.Tensor]:  # cos and sin with its first half negated, [B, 1, q, head_dim]
        """The rotary embedding's cos and sin at these positions (for this layer type, where the embedding has one
        per type), as _Layer.rotate reads them, from a table of the model's own values (each entry is one position's,
        computed alone: the same numbers) where they depend on the position alone: the embedding's call cost 20 us a
        forward on the demo world's CPU, a tenth of a drafter's forward, the table's read 6. M-RoPE positions ([3, B,
        q]) mix axes: the model computes those."""
        per_type = {"layer_type": layer_type} if layer_type else {}
        if not self.rotary_tabled or position_ids.dim() != 2:
            cos, sin = self.rotary_emb(hidden, position_ids=position_ids, **per_type)
            return cos[:, None], _first_half_negated(sin)[:, None]
        table = self.rotary_tables.get(layer_type)
        if table is None or table[0].shape[0] < bound or table[0].dtype != hidden.dtype:
            size = max(bound, 2 * table[0].shape[0] if table is not None else 256)
            cos, sin = self.rotary_emb(hidden, position_ids=torch.arange(size, device=hidden.device)[None], **per_type)
            table = self.rotary_tables[layer_type] = (cos[0], _first_half_negated(sin[0]))
        return table[0][position_ids][:, None], table[1][position_ids][:, None]


def _first_half_negated(sin: torch.Tensor) -> torch.Tensor:  # [..., head_dim]
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


class _Norm:
    """An HF RMSNorm module's weight and epsilon, applied by torch's rms_norm."""

    def __init__(self, norm: nn.Module):
        self.weight, self.eps = norm.weight, norm.variance_epsilon

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class _VectorNorm:
    """An HF RMSNorm module applied in 4 calls where torch's rms_norm on a CPU makes 7 (square, mean, add epsilon,
    rsqrt and three products, each a dispatch): x / sqrt(mean(x^2) + eps) * weight is x / hypot(|x|, sqrt(d eps))
    * (weight sqrt(d)), |x| one vector norm, sqrt(d) in a copy of the weight. The same up to rounding (3e-7
    relative); 5.7 against 10.2 us a call at batch 1 on the demo world's CPU, 7.3 against 11.9 at 32 rows."""

    def __init__(self, norm: nn.Module):
        weight, width = norm.weight.detach(), norm.weight.shape[-1]
        self.weight = weight * width ** 0.5
        self.floor = torch.tensor((width * norm.variance_epsilon) ** 0.5, dtype=weight.dtype, device=weight.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), self.floor) * self.weight


def _fused_norm(norm: nn.Module) -> Callable:
    """What applies an HF RMSNorm module in a fused stack: _VectorNorm on a CPU, where torch's rms_norm is 7 calls;
    elsewhere torch's rms_norm, which CUDA builds of torch run as one fused kernel (not measured here: no GPU)."""
    return _VectorNorm(norm) if norm.weight.device.type == "cpu" else _Norm(norm)


def _exact_norm(norm: nn.Module) -> Callable:
    """What applies an HF RMSNorm module (Llama's, as Qwen2's and Qwen3's are) with its own numbers: torch's rms_norm
    where it computes them, else the module's forward. In float32 on a CPU torch's rms_norm runs the module's own
    operations (square, mean, add epsilon, rsqrt, scale, weight; the products in another order, which leaves them
    exact) in one call from C++: a plain decode step of the demo world's 4-layer target at batch 1 took 0.94x the time
    with it (medians), its 9 norms cost 6 us less each. Elsewhere (a CUDA kernel, bfloat16's roundings) the numbers
    can differ, and a build of torch that fuses it on the CPU too would fail the check on a probe made here."""
    weight = norm.weight
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        return norm.forward
    fused = _Norm(norm)
    probe = torch.randn(8, weight.shape[-1], generator=torch.Generator().manual_seed(0)) * 4
    with torch.no_grad():
        return fused if torch.equal(fused(probe), norm(probe)) else norm.forward


class _Linear:
    """A linear layer's weight (and bias) applied to rows [N, in] as the module applies them to a contiguous batch
    [B, q, in]: F.linear folds such a batch into rows and runs one mm (addmm with a bias) on the weight's transpose,
    and so does this, the same call on the same operands (the same numbers), without linear's own dispatch: 1.2 us
    less a call on the demo world's CPU, 29 calls a step of its target."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight_t, self.bias = weight.t(), bias

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:  # [N, in] -> [N, out]
        return torch.mm(rows, self.weight_t) if self.bias is None else torch.addmm(self.bias, rows, self.weight_t)


class _Separate:
    """Linears applied to one input, each its own matmul, as their modules compute them."""

    def __init__(self, *linears: nn.Linear):
        self.linears = [_Linear(linear.weight, linear.bias) for linear in linears]

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [linear(x) for linear in self.linears]


class _Concatenated:
    """Linears applied to one input as one matmul over their stacked weights."""

    def __init__(self, *linears: nn.Linear):
        self.weight, bias = _concat(*linears)
        self.linear = _Linear(self.weight, bias)
        self.widths = [linear.out_features for linear in linears]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(x).split_with_sizes(self.widths, dim=-1)  # (Tensor.split's Python wrapper: 5 us a call)


class _Layer:
    """One decoder layer's weights and the layer's step: attention over the cache, then the gated MLP. The
    subclasses say how the norms, the projections, the rotary embedding and attention are computed."""

    norm_of: Callable[[nn.Module], Callable]  # an RMSNorm module -> what applies it
    linears_of: Callable[..., Callable]  # linears on one input -> what applies them all, outputs in their order

    def __init__(self, layer: nn.Module, attention_type: str):
        attention, mlp = layer.self_attn, layer.mlp
        self.layer_idx, self.attention_type = attention.layer_idx, attention_type
        self.head_dim, self.scaling = attention.head_dim, attention.scaling
        self.qkv = self.linears_of(attention.q_proj, attention.k_proj, attention.v_proj)
        self.o_proj = _Linear(attention.o_proj.weight, attention.o_proj.bias)
        self.gate_up = self.linears_of(mlp.gate_proj, mlp.up_proj)
        self.down_proj = _Linear(mlp.down_proj.weight, mlp.down_proj.bias)
        # SiLU as the function its module calls (Llama's, Qwen's): the module's call cost twice the function's
        self.act_fn = F.silu if isinstance(mlp.act_fn, (SiLUActivation, nn.SiLU)) else mlp.act_fn
        self.input_norm, self.post_attention_norm = (self.norm_of(layer.input_layernorm),
                                                     self.norm_of(layer.post_attention_layernorm))
        self.q_norm = self.norm_of(attention.q_norm) if hasattr(attention, "q_norm") else None
        self.k_norm = self.norm_of(attention.k_norm) if hasattr(attention, "k_norm") else None
        self.query_heads = attention.q_proj.out_features // self.head_dim

    def __call__(self, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                 cache: RaggedKVCache) -> torch.Tensor:  # hidden [B * q, H] in and out; rotary: FusedStack._rotary's
        hidden = hidden + self.attention(self.input_norm(hidden), rotary, mask, cache)
        return hidden + self.mlp(self.post_attention_norm(hidden))

    def attention(self, normed: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                  cache: RaggedKVCache) -> torch.Tensor:  # [B * q, H] in and out: through o_proj
        q = rotary[0].shape[2]
        batch = normed.shape[0] // q
        query, key, value = self.rotated_qkv(normed, rotary, batch, q)
        key, value = cache.update(key, value, self.layer_idx)
        attended = self.attend(query, key, value, mask)  # [B, q, heads, head_dim]
        return self.o_proj(attended.reshape(batch * q, -1))

    def rotated_qkv(self, normed: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], batch: int, q: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # each [B, its heads, q, head_dim]
        """Query, key and value of the layer's input rows [B * q, H], query and key rotated."""
        query, key, value = (t.view(batch, q, -1, self.head_dim) for t in self.qkv(normed))
        if self.q_norm is not None:  # Qwen3, Gemma3: per head, before the rotary embedding
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = self.rotate(query.transpose(1, 2), key.transpose(1, 2), *rotary)
        return query, key, value.transpose(1, 2)

    def mlp(self, normed: torch.Tensor) -> torch.Tensor:  # [B * q, H] in and out
        gate, up = self.gate_up(normed)
        return self.down_proj(self.act_fn(gate) * up)

    def rotate(
        self,
        query: torch.Tensor,  # [B, heads, q, d]
        key: torch.Tensor,  # [B, kv heads, q, d]
        cos: torch.Tensor,  # [B, 1, q, d]
        sin_first_half_negated: torch.Tensor,  # [B, 1, q, d]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary embedding as HF's apply_rotary_pos_emb applies it (x * cos + rotate_half(x) * sin; every
        supported model type's is Llama's, checked in transformers 5.24), to query and key in one pass, with the same
        numbers in fewer calls: rotate_half(x) * sin, the halves of x swapped and the first negated, times sin, is
        the swapped halves times sin with its first half negated (a product's sign is exact). 13 us a layer on the
        demo world's CPU at batch 1, 21.5 with rotate_half's slices, negation and concatenation."""
        both = _rotated(torch.cat([query, key], dim=1), cos, sin_first_half_negated)
        return both[:, : self.query_heads], both[:, self.query_heads :]


def _rotated(
    heads: torch.Tensor,  # [B, heads, q, d]
    cos: torch.Tensor,  # [B, 1, q, d]
    sin_first_half_negated: torch.Tensor,  # [B, 1, q, d]
) -> torch.Tensor:  # [B, heads, q, d]
    return heads * cos + heads.roll(heads.shape[-1] // 2, -1) * sin_first_half_negated


class _FusedLayer(_Layer):
    """q/k/v and gate/up concatenated (the layer's own parameters become views), query and key rotated where the
    q/k/v matmul left them side by side, norms as _fused_norm applies them, torch's attention."""

    norm_of, linears_of = staticmethod(_fused_norm), _Concatenated

    def __init__(self, layer: nn.Module, attention_type: str):
        super().__init__(layer, attention_type)
        attention = layer.self_attn
        self.grouped = attention.q_proj.out_features != attention.k_proj.out_features
        self.rotated_heads = self.query_heads + attention.k_proj.out_features // self.head_dim

    def rotated_qkv(self, normed: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], batch: int, q: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """_Layer.rotated_qkv on the q/k/v matmul's output as one tensor of heads, without splitting and
        concatenating it again (with per-head q/k norms, which need them apart: _Layer's)."""
        if self.q_norm is not None:
            return super().rotated_qkv(normed, rotary, batch, q)
        heads = self.qkv.linear(normed).view(batch, q, -1, self.head_dim).transpose(1, 2)  # [B, all heads, q, d]
        rotated = _rotated(heads[:, : self.rotated_heads], *rotary)
        return rotated[:, : self.query_heads], rotated[:, self.query_heads :], heads[:, self.rotated_heads :]

    def attend(self, query, key, value, mask):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=self.scaling,
                                              enable_gqa=self.grouped).transpose(1, 2)


class _ExactLayer(_Layer):
    """HF's layer without its module calls: each projection its own matmul on the module's own weight, the
    norms' own numbers (_exact_norm), the rotary embedding's (_Layer.rotate) and HF's sdpa attention function (which
    packs grouped heads for one query token, as HF's forward does)."""

    norm_of, linears_of = staticmethod(_exact_norm), _Separate

    def __init__(self, layer: nn.Module, attention_type: str):
        super().__init__(layer, attention_type)
        attention = layer.self_attn
        self.attention_function = partial(ALL_ATTENTION_FUNCTIONS[EXACT_ATTENTION], attention, dropout=0.0,
                                          scaling=self.scaling)

    def attend(self, query, key, value, mask):
        return self.attention_function(query, key, value, mask)[0]


class _SandwichLayer(_ExactLayer):
    """Gemma3's layer, exact: the attention's and the MLP's outputs normed before their residual adds
    (post_attention_layernorm, post_feedforward_layernorm), the MLP's input by pre_feedforward_layernorm. Its
    norms ((1 + weight), in float32) have no torch counterpart: their own forward."""

    norm_of = staticmethod(lambda norm: norm.forward)

    def __init__(self, layer: nn.Module, attention_type: str):
        super().__init__(layer, attention_type)
        self.pre_feedforward_norm = self.norm_of(layer.pre_feedforward_layernorm)
        self.post_feedforward_norm = self.norm_of(layer.post_feedforward_layernorm)

    def __call__(self, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                 cache: RaggedKVCache) -> torch.Tensor:  # hidden [B * q, H] in and out
        hidden = hidden + self.post_attention_norm(self.attention(self.input_norm(hidden), rotary, mask, cache))
        return hidden + self.post_feedforward_norm(self.mlp(self.pre_feedforward_norm(hidden)))


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

