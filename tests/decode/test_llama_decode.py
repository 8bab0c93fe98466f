"""Cached Llama forward (prefill + decode) == full forward; decode attention == SDPA reference."""

import pytest
import torch
from decode_helpers import decode_logits

from avengers.decode.attention import decode_attention, decode_attention_reference, invalid_positions
from avengers.decode.cache import KV_CHUNK, InferenceCache, KVState
from avengers.decode.llama import apply_rope
from avengers.decode.options import DecodeOptions
from avengers.ops.rope import rope_cos_sin


@torch.no_grad()
@pytest.mark.parametrize("splits", [[40], [24, 16], [1, 39], [17, 3, 20]])
def test_prefill_then_decode_matches_full_forward(tiny, splits):
    spec, model = tiny
    ids = torch.randint(0, spec.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    cache = model.allocate_cache(2, 48)
    out, pos = [], 0
    for n in splits:
        out.append(model(ids[:, pos : pos + n], cache=cache))
        pos += n
    out += [model(ids[:, i : i + 1], cache=cache) for i in range(pos, 48)]
    torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-4, rtol=1e-4)
    assert cache.seq_len == 48 and int(cache.position) == 48


@torch.no_grad()
def test_cache_overflow_and_bad_batch_raise(tiny):
    spec, model = tiny
    cache = model.allocate_cache(1, 8)
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="batch=1"):
        model(torch.zeros(2, 3, dtype=torch.long), cache=cache)


def test_cache_bytes_measured_from_tensors(tiny):
    spec, model = tiny
    cfg = spec.config
    cache = model.allocate_cache(3, 2 * KV_CHUNK, dtype=torch.bfloat16)
    per_token = cfg.nlayers * 2 * cfg.kvheads * (cfg.emb_dim // cfg.nheads) * 2
    assert cache.nbytes() == 3 * 2 * KV_CHUNK * per_token
    assert cache.nbytes_per_sequence() == 2 * KV_CHUNK * per_token
    assert cache.nbytes_written_per_step() == 3 * per_token  # one position of every layer's keys and values


def test_llama_caches_are_consecutive_views_of_one_tensor(tiny):
    """KVState.stacked: every layer's keys (values) a view of one [L, B, H_kv, S, d] tensor, layer
    after layer, so one TMA descriptor covers all (gluon_step's decode kernel); writes reach it."""
    _, model = tiny
    cache = model.allocate_cache(2, KV_CHUNK)
    for name in ("k", "v"):
        views = [getattr(s, name) for s in cache.layers]
        whole = views[0]._base
        assert whole is not None and whole.shape == (len(views), *views[0].shape) and whole.is_contiguous()
        for i, t in enumerate(views):
            assert t._base is whole and t.data_ptr() == whole.data_ptr() + i * t.numel() * t.element_size()
    cache.layers[1].update(
        torch.ones(2, cache.layers[1].k.shape[1], 3, cache.layers[1].k.shape[3]),
        torch.ones(2, cache.layers[1].v.shape[1], 3, cache.layers[1].v.shape[3]),
        0,
    )
    assert cache.layers[1].k._base[1, :, :, :3].eq(1).all() and cache.layers[0].k.eq(0).all()


@pytest.mark.parametrize("length", [1, 77, 256])
def test_decode_attention_matches_sdpa(length):
    g = torch.Generator().manual_seed(length)
    q = torch.randn(3, 8, 16, generator=g)
    k, v = torch.randn(2, 3, 2, 256, 16, generator=g)
    got = decode_attention(q, k, v, invalid_positions(256, torch.tensor(length)), scale=0.3)
    torch.testing.assert_close(got, decode_attention_reference(q, k, v, length, scale=0.3), atol=1e-5, rtol=1e-5)
    got = decode_attention(q, k, v, torch.tensor(length))  # length form, default scale 1/sqrt(d)
    torch.testing.assert_close(got, decode_attention_reference(q, k, v, length), atol=1e-5, rtol=1e-5)


def test_rope_matches_fms(tiny):
    _, model = tiny
    rot = model.base_model.rot_emb
    q, k = torch.randn(2, 2, 5, 4, 32)
    pos = torch.arange(3, 8).repeat(2, 1)
    ref_q, ref_k = rot.adjusted_qk(q, k, pos)
    cos, sin = (t[:, None, :] for t in rope_cos_sin(torch.arange(3, 8), 32, model.config.rope_theta))
    torch.testing.assert_close(apply_rope(q, cos, sin), ref_q)
    torch.testing.assert_close(apply_rope(k, cos, sin), ref_k)


def test_broadcast_from_copies_state_and_position():
    src = InferenceCache([KVState(1, 2, 4, 3)], 1, 4)
    src.layers[0].k.normal_()
    src.advance(3)
    dst = InferenceCache([KVState(5, 2, 4, 3)], 5, 4)
    dst.broadcast_from(src)
    assert torch.equal(dst.layers[0].k, src.layers[0].k.expand(5, -1, -1, -1))
    assert dst.seq_len == 3 and int(dst.position) == 3
    with pytest.raises(ValueError, match="cannot broadcast"):
        InferenceCache([KVState(5, 3, 4, 3)], 5, 4).broadcast_from(src)  # other kv heads


@torch.no_grad()
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_compile_path_matches_full_forward(tiny, compiled, monkeypatch):
    """The `compile` path runs every decode block through llama_block's pure functions (here also
    with torch.compile replaced by the plain functions: the fast check of their maths)."""
    from avengers.decode import llama, llama_block

    if not compiled:
        monkeypatch.setattr(llama_block.torch, "compile", lambda fn, **kw: fn)
    llama_block._torch_functions.cache_clear()
    calls = []
    real = llama.decode_block
    monkeypatch.setattr(llama, "decode_block", lambda *a, **k: calls.append(1) or real(*a, **k))
    spec, model = tiny
    ids = torch.randint(0, spec.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    try:
        torch.testing.assert_close(decode_logits(model, ids, 16, "compile"), model(ids), atol=1e-4, rtol=1e-4)
    finally:
        llama_block._torch_functions.cache_clear()
    assert len(calls) == 8 * spec.config.nlayers


def test_decode_options_resolve_and_reject():
    cpu = torch.device("cpu")
    assert DecodeOptions().resolve("llama", cpu).path == "reference"
    assert DecodeOptions("compile").resolve("mamba", cpu).path == "compile"
    with pytest.raises(ValueError, match="decode path must be one of"):
        DecodeOptions("tvm")
    with pytest.raises(ValueError, match="decode attention must be one of"):
        DecodeOptions(attention="flash")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        DecodeOptions("triton").resolve("llama", cpu)


def test_cache_carries_its_resolved_options(tiny):
    _, model = tiny
    assert model.allocate_cache(1, 8).options == DecodeOptions("reference")
    assert model.allocate_cache(1, 8, options=DecodeOptions("compile", "torch")).options.attention == "torch"


def test_gluon_falls_back_to_triton_off_its_tested_triton(monkeypatch):
    """The Gluon step runs only on Hopper with the Triton release it is tested with; elsewhere the
    `gluon` path (asked for, or chosen by auto) takes the Triton path, with a warning when asked."""
    import sys
    import types

    from avengers.decode import options

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="3.9.0"))
    assert "tested with Triton 3.6.x, found 3.9.0" in options.gluon_unavailable_reason(cuda)
    assert DecodeOptions().resolve("llama", cuda).path == "triton"
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="3.6.0"))
    assert options.gluon_unavailable_reason(cuda) is None
    assert DecodeOptions().resolve("llama", cuda).path == "gluon"  # auto: Llama on Hopper, tested Triton
    assert DecodeOptions().resolve("mamba", cuda).path == "triton"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "B200")
    assert "Hopper" in options.gluon_unavailable_reason(cuda)
    assert DecodeOptions().resolve("llama", cuda).path == "triton"  # auto, off Hopper
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.warns(UserWarning, match="'gluon' cannot run here"):
        assert DecodeOptions("gluon").resolve("llama", torch.device("cpu")).path == "triton"
