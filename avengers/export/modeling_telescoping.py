"""The telescoping-cache Llama for Hugging Face transformers, loaded with `trust_remote_code=True`.

Copied into every folder `python -m avengers.export` writes for a telescoping model; it needs only
torch and transformers, so exports load where the training code is not installed.

A Llama whose attention layers keep C slots per KV head instead of a growing KV cache. A slot holds
the exp(w)-weighted means of the rotated keys and of the values of one contiguous token range (w: a
learned gate per token) and its log-mass; older slots cover exponentially longer ranges. Step t
shifts a new slot in and either merges two neighbouring slots (at the slot the level of t picks,
level = 1 + trailing zeros of t) or drops the oldest. A prompt is read in parallel: the schedule of
its length is simulated once, every merged range is built by pairwise merges, and query t attends
to the C ranges its slots hold after step t. Generation then updates the slots one token at a time,
so the cache (`TelescopingState`) stays the same size however long the text grows. Layers listed
in `tele_full_attn_layers` are ordinary causal attention with a KV cache.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

EMPTY_LOG_MASS = -1000.0  # an EMPTY slot: zero weight in any merge, key and value 0
EMPTY_THRESHOLD = -100.0  # a slot is EMPTY iff its log-mass is at or below this
SLOT_NORM_EPS = 1e-6  # the read-time RMSNorm of slot keys and values
GATHER_CHUNK_ELEMS = 2**26  # the parallel read-out materialises at most this many elements per query chunk


class TelescopingConfig(PretrainedConfig):
    model_type = "avengers_telescoping"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 2048,
        intermediate_size: int = 7168,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 8,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 4096,
        tele_cache_size: int = 128,
        tele_fmap: tuple[int, ...] = (26, 50, 71, 89, 104, 116, 124),
        tele_gate: str = "linear",
        tele_mask_empty: bool = False,
        tele_softcap: float | None = None,
        tele_kv_norm: bool = True,
        tele_full_attn_layers: tuple[int, ...] = (),
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.tele_cache_size = tele_cache_size
        self.tele_fmap = [int(m) for m in tele_fmap]
        self.tele_gate = tele_gate
        self.tele_mask_empty = tele_mask_empty
        self.tele_softcap = tele_softcap
        self.tele_kv_norm = tele_kv_norm
        self.tele_full_attn_layers = [int(i) for i in tele_full_attn_layers]
        self.use_cache = use_cache
        if tele_gate not in ("linear", "wisq"):
            raise ValueError(f"tele_gate must be 'linear' or 'wisq', got {tele_gate!r}")
        fmap = self.tele_fmap
        if not fmap or fmap[0] < 1 or fmap[-1] > tele_cache_size - 1 or any(b <= a for a, b in zip(fmap, fmap[1:])):
            raise ValueError(f"tele_fmap must increase strictly within [1, {tele_cache_size - 1}], got {fmap}")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


# ---- the merge schedule ----------------------------------------------------------------------------


def merge_slot(t: int, fmap: tuple[int, ...]) -> int | None:
    """The slot step t merges into (its older neighbour folds into it), or None: step t drops the oldest."""
    level = (t & -t).bit_length()
    return fmap[level - 1] if t and level <= len(fmap) else None


@functools.lru_cache(maxsize=16)
def schedule(n: int, cache_size: int, fmap: tuple[int, ...]) -> tuple[list[list[int]], list[tuple[list, list]]]:
    """(table, passes) of n steps over a node array [EMPTY, token 0..n-1, merged ranges by depth].

    table[t][c]: the node in slot c after step t (slot 0 newest). passes[i] = (newer, older): the
    children of the merged nodes of depth i + 2, which follow those of depth i + 1 in the array."""
    depth, children, tokens = [0], [(0, 0)], []
    slots, rows = [0] * cache_size, []
    for t in range(n):
        tokens.append(len(depth))
        depth.append(1)
        children.append((0, 0))
        m = merge_slot(t, fmap)
        if m is None:
            slots = [tokens[t]] + slots[:-1]
        else:
            a, b = slots[m - 1], slots[m]
            merged = a or b  # EMPTY merges into nothing: the other node stays
            if a and b:
                merged = len(depth)
                depth.append(1 + max(depth[a], depth[b]))
                children.append((a, b))
            slots = [tokens[t]] + slots[: m - 1] + [merged] + slots[m + 1 :]
        rows.append(slots)
    merged_ids = sorted((i for i, d in enumerate(depth) if d >= 2), key=lambda i: depth[i])
    position = {raw: i for i, raw in enumerate([0, *tokens, *merged_ids])}
    table = [[position[raw] for raw in row] for row in rows]
    passes = []
    for d in range(2, max(depth) + 1):
        ids = [i for i in merged_ids if depth[i] == d]
        passes.append(([position[children[i][0]] for i in ids], [position[children[i][1]] for i in ids]))
    return table, passes


@functools.lru_cache(maxsize=16)
def plan(n: int, cache_size: int, fmap: tuple[int, ...], device: torch.device):
    table, passes = schedule(n, cache_size, fmap)
    long = functools.partial(torch.tensor, dtype=torch.long, device=device)
    return long(table), [(long(a), long(b)) for a, b in passes]


# ---- numerics shared by the parallel and the recurrent form -----------------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # merges and norms never run in half precision


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x [B, T, h, d] with channel pairs (2i, 2i+1) rotated at `positions` [T], in compute dtype."""
    d, dt = x.shape[-1], compute_dtype(x.dtype)
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos().to(dt)[:, None, :], angles.sin().to(dt)[:, None, :]
    pairs = x.to(dt).unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def slot_norm(x: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
    xf = x.to(compute_dtype(x.dtype))
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + SLOT_NORM_EPS)  # RMSNorm(0) = 0 keeps EMPTY at 0
    return out if gain is None else out * gain.to(out.dtype)


def softcap(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    return scores if cap is None else cap * torch.tanh(scores / cap)


def merge(wa: torch.Tensor, wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights of two ranges' means in their merge and the merged log-mass."""
    wn = torch.logaddexp(wa, wb)
    return torch.exp(wa - wn).unsqueeze(-1), torch.exp(wb - wn).unsqueeze(-1), wn


# ---- modules ---------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


class Gain(nn.Module):
    """The read-time RMSNorm gain of slot keys or values [head_dim]."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class MLP(nn.Module):
    def __init__(self, config: TelescopingConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SlotState:
    """One telescoping layer's cache: slot means k, v [B, Hkv, C, d] and log-masses [B, Hkv, C]."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, log_mass: torch.Tensor):
        self.k, self.v, self.log_mass = k, v, log_mass

    def push(self, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, slot: int | None) -> None:
        """Shift in a token's k, v [B, Hkv, d] and log-mass w [B, Hkv], merging slots slot-1 and slot
        (or dropping the oldest when slot is None)."""
        K, V, W = self.k, self.v, self.log_mass
        new = (k.to(K.dtype).unsqueeze(2), v.to(V.dtype).unsqueeze(2), w.to(W.dtype).unsqueeze(2))
        if slot is None:
            rest = (K[:, :, :-1], V[:, :, :-1], W[:, :, :-1])
        else:
            wa, wb = W[:, :, slot - 1], W[:, :, slot]
            pa, pb, wn = merge(wa, wb)
            wn = torch.where(wb <= EMPTY_THRESHOLD, wa, torch.where(wa <= EMPTY_THRESHOLD, wb, wn))
            merged = [(pa * x[:, :, slot - 1].to(W.dtype) + pb * x[:, :, slot].to(W.dtype)).to(x.dtype) for x in (K, V)]
            merged.append(wn)
            rest = tuple(
                torch.cat([x[:, :, : slot - 1], m.unsqueeze(2), x[:, :, slot + 1 :]], 2)
                for m, x in zip(merged, (K, V, W))
            )
        self.k, self.v, self.log_mass = (torch.cat([n, r], 2) for n, r in zip(new, rest))


class KVState:
    """A full-attention layer's cache: rotated keys and values [B, Hkv, T, d]."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v


class TelescopingState:
    """The generation cache: one SlotState per telescoping layer (constant size), one KVState per
    full-attention layer, and the number of tokens consumed."""

    def __init__(self):
        self.layers: dict[int, SlotState | KVState] = {}
        self.seq_len = 0


class TelescopingAttention(nn.Module):
    """Attention over C telescoping slots per KV head (or, for full layers, plain causal attention)."""

    def __init__(self, config: TelescopingConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.full = layer_idx in config.tele_full_attn_layers
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.theta = config.rope_theta
        self.cache_size, self.fmap = config.tele_cache_size, tuple(config.tele_fmap)
        self.mask_empty, self.cap = config.tele_mask_empty, config.tele_softcap
        d, hd = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(d, self.heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.heads * hd, d, bias=False)
        tele = not self.full
        self.gate = nn.Linear(d, self.kv_heads, bias=False) if tele and config.tele_gate == "linear" else None
        self.k_norm = Gain(hd) if tele and config.tele_kv_norm else None
        self.v_norm = Gain(hd) if tele and config.tele_kv_norm else None

    def forward(self, x: torch.Tensor, start: int, state: TelescopingState | None) -> torch.Tensor:
        """x [B, T, hidden] (the normed block input) at positions start..start+T-1."""
        B, T, _ = x.shape
        positions = torch.arange(start, start + T, device=x.device)
        q = rope(self.q_proj(x).view(B, T, self.heads, self.head_dim), positions, self.theta)
        k = rope(self.k_proj(x).view(B, T, self.kv_heads, self.head_dim), positions, self.theta)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim)
        if self.full:
            out = self._full(q.to(v.dtype), k, v, state)
        else:
            w = self._gate(x, q, k)
            if start == 0:
                out = self._parallel(q.to(v.dtype), k, v, w, state)
            else:
                out = torch.cat([self._step(q[:, i], k[:, i], v[:, i], w[:, i], start + i, state) for i in range(T)], 1)
        return self.o_proj(out.reshape(B, T, self.heads * self.head_dim).to(x.dtype))

    def _gate(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Log-mass w [B, T, Hkv] of each token: the linear gate, or logsumexp_g q.k / sqrt(d) (WISQ)."""
        B, T = x.shape[:2]
        if self.gate is not None:
            dt = compute_dtype(x.dtype)
            return F.linear(x.to(dt), self.gate.weight.to(dt)).view(B, T, self.kv_heads)
        qg = q.to(k.dtype).view(B, T, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
        return torch.logsumexp((qg * k.unsqueeze(3)).sum(-1) * self.head_dim**-0.5, dim=-1)

    def _gains(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return (self.k_norm.weight, self.v_norm.weight) if self.k_norm is not None else (None, None)

    def _read(self, q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
        """q [B, n, H, d] attends to its own C slots K, V [B, Hkv, n, C, d]; `empty` (broadcast to the
        scores [B, n, Hkv, H / Hkv, C]) marks EMPTY slots."""
        B, n, H, d = q.shape
        qg = q.view(B, n, self.kv_heads, H // self.kv_heads, d)
        s = torch.einsum("bthed,bhtcd->bthec", qg, K) * d**-0.5
        s = softcap(s.to(compute_dtype(s.dtype)), self.cap)
        if self.mask_empty:
            s = s.masked_fill(empty, float("-inf"))
        p = torch.softmax(s, dim=-1).to(V.dtype)
        return torch.einsum("bthec,bhtcd->bthed", p, V).reshape(B, n, H, d)

    def _parallel(self, q, k, v, w, state: TelescopingState | None) -> torch.Tensor:
        """Positions 0..n-1 at once; with a cache, its slots are then those of step n-1."""
        B, n, _, d = q.shape
        table, passes = plan(n, self.cache_size, self.fmap, q.device)
        dt = compute_dtype(k.dtype)
        K = torch.cat([k.new_zeros(B, self.kv_heads, 1, d, dtype=dt), k.to(dt).transpose(1, 2)], 2)
        V = torch.cat([v.new_zeros(B, self.kv_heads, 1, d, dtype=dt), v.to(dt).transpose(1, 2)], 2)
        W = torch.cat([w.new_full((B, self.kv_heads, 1), EMPTY_LOG_MASS, dtype=dt), w.to(dt).transpose(1, 2)], 2)
        for a, b in passes:
            pa, pb, wn = merge(W[:, :, a], W[:, :, b])
            K = torch.cat([K, pa * K[:, :, a] + pb * K[:, :, b]], 2)
            V = torch.cat([V, pa * V[:, :, a] + pb * V[:, :, b]], 2)
            W = torch.cat([W, wn], 2)
        if state is not None:
            last = table[-1]  # the slots after step n-1, before the read-time norm
            slots = SlotState(K[:, :, last].to(q.dtype), V[:, :, last].to(q.dtype), W[:, :, last])
            state.layers[self.layer_idx] = slots
        k_gain, v_gain = self._gains()
        if k_gain is not None:
            K, V = slot_norm(K, k_gain), slot_norm(V, v_gain)
        K, V = K.to(q.dtype), V.to(q.dtype)
        per_query = B * self.cache_size * self.kv_heads * d
        step = n if torch.is_grad_enabled() else max(1, GATHER_CHUNK_ELEMS // per_query)
        outs = []
        for i in range(0, n, step):
            rows = table[i : i + step]
            outs.append(self._read(q[:, i : i + step], K[:, :, rows], V[:, :, rows], (rows == 0)[None, :, None, None]))
        return torch.cat(outs, 1)

    def _step(self, q, k, v, w, position: int, state: TelescopingState) -> torch.Tensor:
        """One token: q [B, H, d], k, v [B, Hkv, d], w [B, Hkv] at `position` -> [B, 1, H, d]."""
        slots: SlotState = state.layers[self.layer_idx]
        slots.push(k, v, w, merge_slot(position, self.fmap))
        K, V = slots.k, slots.v
        k_gain, v_gain = self._gains()
        if k_gain is not None:
            K, V = slot_norm(K, k_gain), slot_norm(V, v_gain)
        empty = (slots.log_mass <= EMPTY_THRESHOLD)[:, None, :, None]  # [B, 1, Hkv, 1, C]
        q = q.to(v.dtype).unsqueeze(1)
        return self._read(q, K.to(q.dtype).unsqueeze(2), V.to(q.dtype).unsqueeze(2), empty)

    def _full(self, q, k, v, state: TelescopingState | None) -> torch.Tensor:
        """Causal attention over every earlier token; q [B, T, H, d] -> [B, T, H, d]."""
        k, v = k.to(v.dtype).transpose(1, 2), v.transpose(1, 2)
        if state is not None:
            cached = state.layers.get(self.layer_idx)
            if cached is not None:
                k, v = torch.cat([cached.k, k], 2), torch.cat([cached.v, v], 2)
            state.layers[self.layer_idx] = KVState(k, v)
        group = self.heads // self.kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        q = q.transpose(1, 2)
        T, S = q.shape[2], k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


class DecoderLayer(nn.Module):
    def __init__(self, config: TelescopingConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = TelescopingAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor, start: int, state: TelescopingState | None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), start, state)
        return h + self.mlp(self.post_attention_layernorm(h))


class TelescopingPreTrainedModel(PreTrainedModel):
    config_class = TelescopingConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _is_stateful = True  # the cache cannot be rolled back (no assisted generation)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, (RMSNorm, Gain)):
            nn.init.ones_(module.weight)


class TelescopingModel(TelescopingPreTrainedModel):
    def __init__(self, config: TelescopingConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, state: TelescopingState | None = None) -> torch.Tensor:
        start = state.seq_len if state is not None else 0
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, start, state)
        if state is not None:
            state.seq_len += input_ids.shape[1]
        return self.norm(h)


@dataclass
class TelescopingCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    tele_state: TelescopingState | None = None


class TelescopingForCausalLM(TelescopingPreTrainedModel, GenerationMixin):
    def __init__(self, config: TelescopingConfig):
        super().__init__(config)
        self.model = TelescopingModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        tele_state: TelescopingState | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> TelescopingCausalLMOutput:
        """Logits of `input_ids` [B, T]; with use_cache, the tokens continue `tele_state` (a new one
        when None), which the output carries. Sequences must be unpadded and of equal length."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "the telescoping cache has no padding support: pass prompts of equal length without padding "
                "(one prompt per call, or same-length prompts)"
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and tele_state is None:
            tele_state = TelescopingState()
        logits = self.lm_head(self.model(input_ids, tele_state if use_cache else None))
        loss = None
        if labels is not None:
            shift = logits[:, :-1].float()
            loss = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        output = TelescopingCausalLMOutput(loss=loss, logits=logits, tele_state=tele_state if use_cache else None)
        return output if return_dict is not False else output.to_tuple()

    # generate(): the slot state travels as `tele_state`, beside transformers' own cache classes.
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def prepare_inputs_for_generation(self, input_ids, tele_state=None, attention_mask=None, use_cache=True, **kwargs):
        if tele_state is not None and tele_state.seq_len:
            input_ids = input_ids[:, tele_state.seq_len :]
        return dict(input_ids=input_ids, tele_state=tele_state, attention_mask=attention_mask, use_cache=use_cache)

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        model_kwargs["tele_state"] = outputs.tele_state
        return model_kwargs
