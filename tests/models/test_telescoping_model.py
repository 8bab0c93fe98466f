"""Telescoping Llama: registry variants, the model contract, prefill + decode == full forward (spec §6.4)."""

from __future__ import annotations

import math

import pytest
import torch
from decode_helpers import decode_logits, track_compiled
from fms.models.llama import LLaMABlock

from avengers.decode.cache import KVState
from avengers.decode.telescoping import TelescopingState
from avengers.models import get_model_spec, list_variants
from avengers.models.llama import TINY_VOCAB
from avengers.models.telescoping import (
    TeleLlamaConfig,
    TelescopingAttention,
    TelescopingLlama,
    tele_cache_bytes,
    window,
)


def _tiny(**changes) -> TelescopingLlama:
    kwargs = dict(
        src_vocab_size=64,
        emb_dim=32,
        nheads=4,
        kvheads=2,
        nlayers=3,
        multiple_of=16,
        max_expected_seq_len=128,
        tele_cache_size=8,
    )
    cfg = TeleLlamaConfig(**{**kwargs, **changes})
    torch.manual_seed(0)
    model = TelescopingLlama(cfg)
    model.init_weights()
    with torch.no_grad():  # move gains off 1 so the k/v norms are exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


VARIANTS = {
    "documented": {},
    "hybrid": dict(tele_full_attn_layers=(1,)),
    "later": dict(tele_mask_empty=True, tele_softcap=20.0, tele_gate="wisq", tele_kv_norm=False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_plus_decode_equals_full_forward(variant):
    model = _tiny(**VARIANTS[variant])
    n = 40  # window of C=8 is 30, first eviction at t=24: decode runs through drops
    x = torch.randint(0, 64, (2, n), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
        for P in (3, 16, 26):  # P < C, at the fill point, beyond the first eviction
            cache = model.allocate_cache(2, 64)
            a = model(x[:, :P], cache=cache)
            b = model(x[:, P : P + 1], cache=cache)  # one decode step
            c = model(x[:, P + 1 :], cache=cache)  # several tokens into a non-empty cache
            assert cache.seq_len == n
            torch.testing.assert_close(torch.cat([a, b, c], 1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_in_place_cache_decode_equals_full_forward(variant, monkeypatch):
    """With its slots in place behind the ring map (RING_MIN_BATCH lowered to the batch), the cache
    decodes the full forward's logits, through drops, and the slots did move behind the map."""
    from avengers.decode import telescoping

    model = _tiny(**VARIANTS[variant])
    x = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(telescoping, "RING_MIN_BATCH", 2)
    cache = model.allocate_cache(2, 40)
    with torch.no_grad():
        full = model(x)
        got = [model(x[:, :10], cache=cache)] + [model(x[:, i : i + 1], cache=cache) for i in range(10, 40)]
    torch.testing.assert_close(torch.cat(got, 1), full, atol=1e-4, rtol=0)
    states = [s for s in cache.layers if isinstance(s, TelescopingState)]
    assert all(s.in_place for s in states) and not torch.equal(states[0].ring, torch.arange(8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("path", ["reference", "compile"])
@torch.no_grad()
def test_in_place_cache_graph_decode_matches_full_forward_cuda(path):
    """At batch RING_MIN_BATCH the cache keeps its slots in place behind the ring map: the step (eager
    or compiled) replayed from a CUDA graph gives the full forward's logits, through drops."""
    from avengers.decode.options import DecodeOptions
    from avengers.decode.telescoping import RING_MIN_BATCH
    from avengers.inference.graphs import DecodeStep

    model = _tiny().cuda()
    x = torch.randint(0, 64, (RING_MIN_BATCH, 40), generator=torch.Generator().manual_seed(6)).cuda()
    full = model(x)
    cache = model.allocate_cache(RING_MIN_BATCH, 40, options=DecodeOptions(path))
    assert all(s.in_place for s in cache.layers)
    model(x[:, :10], cache=cache)
    step = DecodeStep(model, cache, cuda_graph=True)
    got = torch.stack([step(x[:, i : i + 1]).clone() for i in range(10, 40)], 1)
    torch.testing.assert_close(got, full[:, 10:], atol=1e-3, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["documented", "later", "hybrid"])
def test_compiled_decode_step_matches_eager(variant, monkeypatch):
    """On the `compile` decode path every telescoping layer's step runs one torch.compile'd core (no
    recompile per layer) and decodes what the reference step does, through drops: Llama-layout
    models, hybrids included, through compiled_block_step (its norm + QKV, slot step and MLP block
    each one graph, for telescoping and full-attention layers alike), other layouts through
    attention_step's compiled_step_core."""
    from avengers.decode import telescoping

    model = _tiny(**VARIANTS[variant])
    x = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(3))
    blocks = telescoping._block_layout(model)
    core = "compiled_fused_qkv_step_core" if blocks else "compiled_step_core"
    calls, new_graphs = track_compiled(monkeypatch, telescoping, core)
    outs = {path: decode_logits(model, x, 10, path) for path in ("reference", "compile")}
    torch.testing.assert_close(outs["compile"], outs["reference"], atol=1e-5, rtol=1e-5)
    tele_layers = sum(not isinstance(s, KVState) for s in model.allocate_cache(1, 8).layers)
    assert len(calls) == 30 * tele_layers  # every decode step of every telescoping layer took the compiled core
    assert new_graphs() == (3 if blocks else 1)  # one graph per function for all layers and positions


@pytest.mark.slow
def test_compiled_decode_step_in_bf16_is_as_accurate_as_eager():
    """In bf16 the compiled step rounds in other places than the eager ops (fused intermediates stay
    fp32), so the two differ by more than in fp32; both must stay as close to the fp32 decode."""
    import copy

    model32 = _tiny()
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    x = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(4))
    ref = decode_logits(model32, x, 10).float()
    err = {
        path: float((decode_logits(model16, x, 10, path, torch.bfloat16).float() - ref).abs().amax() / ref.abs().amax())
        for path in ("reference", "compile")
    }
    assert 0 < err["reference"] < 0.05, err  # bf16 rounding, not a broken step
    assert err["compile"] <= 1.25 * err["reference"], err


def test_a_step_in_place_writes_two_cells_per_layer_through_one_shared_ring(monkeypatch):
    from avengers.decode import telescoping

    monkeypatch.setattr(telescoping, "RING_MIN_BATCH", 3)
    model = _tiny()
    slots = 3 * (2 * 8 * 2 * 8 * 4 + 8 * 2 * 4)  # one layer's means and log-masses at batch 3, C = 8
    cache = model.allocate_cache(3, 16)
    assert cache.nbytes_written_per_step() == model.config.nlayers * (slots * 2 // 8)
    assert len({id(s.ring) for s in cache.layers}) == 1  # one map for every layer


def test_cache_is_constant_size():
    model = _tiny()
    sizes = {L: model.allocate_cache(3, L).nbytes() for L in (16, 1024, 100_000)}
    assert len(set(sizes.values())) == 1
    cfg = model.config
    expected = cfg.nlayers * (2 * 8 * 2 * 8 * 4 + 8 * 2 * 4)  # fp32 means + fp32 log-masses
    ring = 8 * 8  # the cache's ring map: C longs, shared by the batch and the layers
    assert sizes[16] == 3 * expected + ring and expected == tele_cache_bytes(cfg, 0, dtype_bytes=4)
    assert model.allocate_cache(3, 16).nbytes_written_per_step() == 3 * expected  # every slot shifts or merges
    cache = model.allocate_cache(2, 16, dtype=torch.bfloat16)
    state = cache.layers[0]
    assert isinstance(state, TelescopingState)
    assert state.k.shape == (2, 2, 8, 8) and state.k.dtype == torch.bfloat16
    assert state.log_mass.dtype == torch.float32
    hybrid = _tiny(tele_full_attn_layers=(0,))
    layers = hybrid.allocate_cache(1, 32).layers
    assert isinstance(layers[0], KVState) and isinstance(layers[1], TelescopingState)


def test_cache_errors():
    model = _tiny()
    cache = model.allocate_cache(1, 10)
    with pytest.raises(ValueError, match="max_seq_len=10"):
        model(torch.zeros(1, 11, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=r"batch=1"):
        model(torch.zeros(2, 3, dtype=torch.long), cache=cache)
    with pytest.raises(TypeError, match="input_ids, cache= and labels= only"):
        model(torch.zeros(1, 3, dtype=torch.long), use_cache=True)


def test_registry_variants():
    names = set(list_variants())
    for shape in ("8b", "1.8b", "3.2b", "70b"):
        assert {f"tele128_llama3_{shape}", f"tele128_llama3_{shape}_4k"} <= names
    assert {"tele64_llama2_1.4b", "tele_tiny", "tele128_llama3_194m_4k"} <= names
    spec = get_model_spec("tele128_llama3_1.8b")
    cfg = spec.config
    assert spec.family == "telescoping" and spec.block_types == (LLaMABlock,)
    assert (cfg.emb_dim, cfg.nlayers, cfg.nheads, cfg.kvheads, cfg.hidden_grow_factor) == (2048, 24, 32, 2, 3.75)
    assert cfg.tele_cache_size == 128 and cfg.tele_options().fmap == (26, 50, 71, 89, 104, 116, 124)
    assert cfg.src_vocab_size == 128256
    c64 = get_model_spec("tele64_llama2_1.4b").config
    assert (c64.nheads, c64.kvheads, c64.tele_cache_size, c64.src_vocab_size) == (16, 4, 64, 32000)
    tiny = get_model_spec("tele_tiny")
    assert tiny.vocab_size == TINY_VOCAB and tiny.config.tele_cache_size == 16
    # params: Llama of the same shape + one gate (d_model x H_kv) and two gains (head_dim) per layer
    llama = get_model_spec("llama3_1.8b").replace(nheads=32, kvheads=2, hidden_grow_factor=3.75)
    assert spec.num_params() == llama.num_params() + 24 * (2048 * 2 + 2 * 64)


def test_flops_formula():
    spec = get_model_spec("tele128_llama3_1.8b_4k")
    llama = get_model_spec("llama3_1.8b_4k").replace(nheads=32, kvheads=2, hidden_grow_factor=3.75)
    gate = 6 * 24 * 2048 * 2
    attn_saving = 12 * 24 * 2048 * (4096 - 128)
    assert spec.flops_per_token(4096) == llama.flops_per_token(4096) + gate - attn_saving
    assert spec.flops_per_token(64) == llama.flops_per_token(64) + gate  # shorter than C: same attention
    hybrid = spec.replace(tele_full_attn_layers="1/6@1")
    assert hybrid.config.full_attn_layers() == (0, 6, 12, 18)
    assert hybrid.flops_per_token(4096) - spec.flops_per_token(4096) == 4 * 12 * 2048 * (4096 - 128) - 4 * 6 * 2048 * 2


def test_llama_weights_map_over_and_init():
    llama = get_model_spec("llama3_tiny").build()
    tele = get_model_spec("tele_tiny").build()
    missing, unexpected = tele.load_state_dict(llama.state_dict(), strict=False)
    assert not unexpected
    assert sorted({k.split("attn.")[1] for k in missing}) == ["gate.weight", "k_norm.weight", "v_norm.weight"]
    attn = tele.base_model.layers[0].attn
    assert isinstance(attn, TelescopingAttention)
    assert attn.in_proj.qkv_fused.weight.shape == llama.base_model.layers[0].attn.in_proj.qkv_fused.weight.shape
    # meta build -> to_empty -> init_weights, as the trainer does with low_cpu_fsdp
    model = get_model_spec("tele_tiny").build("meta")
    model.to_empty(device="cpu")
    model.init_weights()
    gates = torch.cat([l.attn.gate.weight.flatten() for l in model.base_model.layers])
    assert abs(gates.std().item() - 0.02) < 0.004 and gates.abs().max() < 0.2
    assert all((l.attn.k_norm.weight == 1).all() and (l.attn.v_norm.weight == 1).all() for l in model.base_model.layers)
    logits = model(torch.randint(0, TINY_VOCAB, (1, 12)))
    assert logits.shape == (1, 12, TINY_VOCAB) and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(tele_fmap=(4, 2)), "strictly increasing"),
        (dict(tele_cache_size=12), "no preset fmap"),
        (dict(tele_gate="mlp"), "gate must be"),
        (dict(tele_full_attn_layers=(0, 9)), r"\[0, 3\)"),
        (dict(tele_full_attn_layers="every3"), "unknown tele_full_attn_layers preset"),
        (dict(tele_impl="triton"), "tele_impl"),
        (dict(tele_softcap=0.0), "softcap"),
    ],
)
def test_config_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        _tiny(**changes)


def test_training_step_gradients_reach_gate_and_norms():
    model = _tiny().train()
    x = torch.randint(0, 64, (2, 30))
    loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten())
    loss.backward()
    attn = model.base_model.layers[0].attn
    for p in (attn.gate.weight, attn.k_norm.weight, attn.v_norm.weight, attn.in_proj.qkv_fused.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert math.isfinite(loss.item())


def test_window_of_registered_variants():
    assert window(64, get_model_spec("tele64_llama2_1.4b").config.tele_options().fmap) == 685
    assert window(128, get_model_spec("tele128_llama3_1.8b").config.tele_options().fmap) == 1950


@pytest.mark.slow
def test_compiled_flex_block_matches_eager():
    """Compiled block (flex path, as the trainer compiles it) == eager, fp32 and bf16 autocast. On CPU
    the flex call itself runs outside the graph (inductor's CPU flex has no return_lse)."""
    model = _tiny(emb_dim=256, nheads=4, nlayers=1, tele_impl="flex")
    x = torch.randint(0, 64, (2, 200), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # CPU flex has no backward; forward only
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_bf16 = model(x).float()
        for block in model.base_model.layers:
            block.compile()  # one graph break on CPU: the flex call
        torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x).float()
    assert (got - ref_bf16).abs().max() < 0.05 and (got - ref).abs().max() < 0.1
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled flex_attention training needs CUDA")
def test_compiled_flex_training_step_matches_gather_cuda():
    """The trainer's setup (blocks compiled, bf16 autocast, flex) against eager fp32 gather: loss and grads."""
    spec = get_model_spec("tele_tiny").replace(tele_cache_size=64, tele_fmap="c64", nlayers=2)
    torch.manual_seed(0)
    ref = spec.build("cuda")
    ref.init_weights()
    fast = spec.build("cuda")
    fast.load_state_dict(ref.state_dict())
    for layer in ref.base_model.layers:
        layer.attn.impl = "gather"
    for block in fast.base_model.layers:
        block.compile()
    x = torch.randint(0, spec.vocab_size, (2, 1025), device="cuda")
    losses = []
    for model, autocast in ((ref, False), (fast, True)):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 2e-2
    for (name, a), b in zip(ref.named_parameters(), fast.parameters()):
        rel = (a.grad - b.grad).norm() / a.grad.norm().clamp_min(1e-12)
        assert rel < 5e-2, (name, rel.item())
