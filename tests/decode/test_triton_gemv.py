"""The fused Triton decode kernels (triton_gemv.py) against torch: GEMV fusions, RoPE, whole blocks.

Runs on CUDA (marked gpu), or on CPU through Triton's interpreter when triton is installed and
TRITON_INTERPRET=1 is set (`make test-triton`; fp32 only there).
"""

import pytest
import torch
import torch.nn.functional as F
from triton_helpers import (
    assert_decode_path_matches_full_forward,
    assert_graph_decode_matches_eager,
    few_gemv_tiles,
    triton_device,
)

DEVICE = triton_device()

from avengers.decode import llama_block  # noqa: E402
from avengers.decode.cache import KVState  # noqa: E402
from avengers.decode.kernels import triton_gemv, triton_mamba_step  # noqa: E402
from avengers.decode.options import GEMV_STEP_MAX_BATCH, DecodeOptions  # noqa: E402

pytestmark = pytest.mark.gpu if DEVICE == "cuda" else []


@pytest.fixture(autouse=True, scope="module")
def few_tiles():
    with few_gemv_tiles(
        DEVICE, triton_gemv._gemv_kernel, triton_gemv._qkv_rope_kernel, triton_mamba_step._in_proj_conv_kernel
    ):
        yield


def _rand(*shape, seed=0, scale=1.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(DEVICE)


@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize(
    "fusion", ["plain", "norm", "norm_swiglu", "norm_swiglu_gate_last", "residual", "gated_norm_residual"]
)
def test_gemv_fusions_match_torch(B, fusion):
    K, N = 200, 37  # neither a multiple of the block sizes
    x, g, z = _rand(B, K, seed=1), _rand(K, seed=2) + 1, _rand(B, K, seed=5)
    swiglu, gate_last, gated = "swiglu" in fusion, fusion.endswith("gate_last"), fusion.startswith("gated")
    w = _rand(2 * N if swiglu else N, K, seed=3, scale=K**-0.5)
    res = _rand(B, N, seed=4)
    xin = x * F.silu(z) if gated else x
    xin = F.rms_norm(xin, (K,), g, 1e-5) if "norm" in fusion else xin
    ref = F.linear(xin, w)
    if swiglu:
        gate, up = ref.split(N, -1)[::-1] if gate_last else ref.split(N, -1)
        ref = F.silu(gate) * up
    if fusion.endswith("residual"):
        ref = ref + res
    out = triton_gemv.gemv(
        x,
        w,
        norm_weight=g if "norm" in fusion else None,
        eps=1e-5,
        residual=res if fusion.endswith("residual") else None,
        swiglu=swiglu,
        gate_last=gate_last,
        gate=z if gated else None,
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_gemv_rejects_bad_shapes():
    with pytest.raises(ValueError, match="B <= 8"):
        triton_gemv.gemv(_rand(9, 16), _rand(4, 16))
    with pytest.raises(ValueError, match="residual must be"):
        triton_gemv.gemv(_rand(2, 16), _rand(4, 16), residual=_rand(2, 5))
    with pytest.raises(ValueError, match="gate must be"):
        triton_gemv.gemv(_rand(2, 16), _rand(4, 16), gate=_rand(2, 8))


def test_autotune_prune_keeps_k_blocks_up_to_the_narrowest_covering_one():
    import triton

    tiles = [(2, 1024), (4, 512), (4, 2048), (16, 512)]
    configs = [triton.Config({"BN": bn, "BK": bk}, num_warps=w) for bn, bk in tiles for w in (2, 4)]
    kept = lambda K, BB: {(c.kwargs["BN"], c.kwargs["BK"]) for c in triton_gemv._prune(configs, {"K": K}, BB=BB)}
    assert kept(64, 1) == {(4, 512), (16, 512)}  # a tiny model: only the narrowest K block
    assert kept(1000, 1) == {(2, 1024), (4, 512), (16, 512)}
    assert kept(8192, 1) == set(tiles)  # K wider than every block: all of them
    assert kept(8192, 8) == {(2, 1024), (4, 512)}  # the register budget at batch 8


def test_decode_pre_post_match_the_torch_functions():
    B, D, H, Hkv, d, hidden = 2, 256, 8, 4, 32, 96
    h = _rand(B, 1, D, seed=5)
    ln, ff_ln = _rand(D, seed=6) + 1, _rand(D, seed=7) + 1
    qkv_w = _rand((H + 2 * Hkv) * d, D, seed=8, scale=D**-0.5)
    angles = _rand(H + Hkv, d // 2, seed=9)
    cos, sin = angles.cos(), angles.sin()
    states = [KVState(B, Hkv, 16, d, device=DEVICE) for _ in range(2)]
    position = torch.tensor(5, device=DEVICE)
    q = triton_gemv.decode_pre_write(h, ln, 1e-5, qkv_w, cos, sin, H, Hkv, d, states[0], position)
    q_ref, k_ref, v_ref = llama_block.decode_pre(h, ln, 1e-5, qkv_w, cos, sin, H, Hkv, d)
    states[1].write_at(k_ref, v_ref, position)
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=1e-5)
    for got, want in ((states[0].k, states[1].k), (states[0].v, states[1].v)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert states[0].k[:, :, 5].abs().sum() > 0 and states[0].k[:, :, :5].abs().sum() == 0
    attn = _rand(B, 1, H * d, seed=10)
    dense, wg1, w2 = (
        _rand(D, H * d, seed=11, scale=0.05),
        _rand(2 * hidden, D, seed=12, scale=0.06),
        _rand(D, hidden, seed=13, scale=0.1),
    )
    torch.testing.assert_close(
        triton_gemv.decode_post(h, attn, dense, ff_ln, 1e-5, wg1, w2, hidden),
        llama_block.decode_post(h, attn, dense, ff_ln, 1e-5, wg1, w2, hidden),
        atol=1e-5,
        rtol=1e-5,
    )


def test_llama_decode_with_triton_blocks_matches_full_forward(monkeypatch, tiny_on_device):
    from avengers.decode import llama

    calls, heads = [], []
    real, real_head = triton_gemv.decode_post, llama.decode_head
    monkeypatch.setattr(triton_gemv, "decode_post", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(llama, "decode_head", lambda *a: heads.append(real_head(*a)) or heads[-1])
    spec, model = tiny_on_device
    assert_decode_path_matches_full_forward(model, spec, "triton", DEVICE, batch=GEMV_STEP_MAX_BATCH)
    assert len(calls) == 4 * spec.config.nlayers  # every decode block went through the Triton kernels
    assert len(heads) == 4 and all(h is not None for h in heads)  # and every step's norm + LM head


def test_llama_batches_above_the_gemv_limit_take_the_compiled_functions():
    above = GEMV_STEP_MAX_BATCH + 1
    triton = DecodeOptions("triton")
    assert llama_block.functions(triton, above) == llama_block._torch_functions(True)
    assert llama_block.functions(triton, 1) == (triton_gemv.decode_pre_write, triton_gemv.decode_post)
    from fms.modules.layernorm import LayerNormParameterized

    norm, head = LayerNormParameterized(8).to(DEVICE), torch.nn.Linear(8, 16, bias=False).to(DEVICE)
    assert llama_block.decode_head(norm, head, torch.ones(above, 1, 8, device=DEVICE), triton) is None
    assert llama_block.decode_head(norm, head, torch.ones(1, 1, 8, device=DEVICE), triton).shape == (1, 1, 16)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs and programmatic dependent launch need a GPU")
@pytest.mark.parametrize("pdl", [False, True])
def test_triton_decode_in_a_cuda_graph_matches_eager_decode(tiny_on_device, pdl, monkeypatch):
    """The Triton kernels, with and without PDL (where the GPU supports it), replayed from a graph."""
    from avengers.decode.kernels import triton_pdl

    spec, model = tiny_on_device
    if not pdl:
        monkeypatch.setattr(triton_pdl, "_supported", lambda index: False)
    assert_graph_decode_matches_eager(model, spec, "triton", DEVICE)


def _assert_gemv_steps_match_full_forward(monkeypatch, spec, decode_module) -> None:
    """The model's decode steps on the `triton` path equal a full forward; its family's GEMV step
    (`decode_module.gemv_step`) serves every step up to GEMV_STEP_MAX_BATCH and none above it."""
    torch.manual_seed(0)
    model = spec.build(DEVICE)
    model.init_weights()
    model.eval()
    steps = []
    real = decode_module.gemv_step
    monkeypatch.setattr(decode_module, "gemv_step", lambda *a: steps.append(1) or real(*a))
    assert_decode_path_matches_full_forward(model, spec, "triton", DEVICE, batch=GEMV_STEP_MAX_BATCH)
    assert len(steps) == 4  # every decode step took the GEMV path
    assert_decode_path_matches_full_forward(model, spec, "triton", DEVICE, batch=GEMV_STEP_MAX_BATCH + 1)
    assert len(steps) == 4  # a larger batch takes the per-module path


def test_mamba2_decode_with_triton_gemvs_matches_full_forward(monkeypatch):
    """Pure Mamba-2 models on the `triton` decode path: at batch 1 each layer as three kernels
    (norm + in_proj + conv step, the state update, gated norm + out_proj + residual) and the final
    norm + LM head as one GEMV; at batch 2 the conv step as its own Triton kernel."""
    from avengers.decode import mamba
    from avengers.models.registry import get_model_spec

    layers, convs = [], []
    real, real_conv = mamba.mamba_layer_step, triton_mamba_step.conv_step
    monkeypatch.setattr(mamba, "mamba_layer_step", lambda *a: layers.append(1) or real(*a))
    monkeypatch.setattr(triton_mamba_step, "conv_step", lambda *a: convs.append(1) or real_conv(*a))
    spec = get_model_spec("mamba2_tiny")
    _assert_gemv_steps_match_full_forward(monkeypatch, spec, mamba)
    assert len(layers) == len(convs) == 4 * spec.config.n_layer  # batch 1: three kernels; batch 2: the conv kernel


@pytest.mark.parametrize("name, d_intermediate", [("hybrid_tiny", 0), ("hybrid_tiny", 128), ("bamba_tiny", 128)])
def test_hybrid_decode_with_triton_gemvs_matches_full_forward(monkeypatch, name, d_intermediate):
    """A Mamba-2 / attention hybrid on the `triton` decode path at batch 1, without MLPs (as
    mamba_1.5b) and with gated MLPs (as mamba_9.8b), with and without the q/k/v conv (bamba_tiny):
    each attention layer as in_proj (+ its conv step), RoPE + cache write, the decode attention and
    out_proj + residual, and each MLP two GEMVs (RMSNorm + fc1 + SwiGLU with fc1's [value; gate]
    rows, fc2 + residual)."""
    from avengers.decode import mamba
    from avengers.models.registry import get_model_spec

    spec = get_model_spec(name).replace(d_intermediate=d_intermediate)
    layers = []
    real = mamba.attention_layer_step
    monkeypatch.setattr(mamba, "attention_layer_step", lambda *a: layers.append(1) or real(*a))
    _assert_gemv_steps_match_full_forward(monkeypatch, spec, mamba)
    assert len(layers) == 4 * len(spec.config.attn_layer_idx)
    assert not mamba._gemv_layout(spec.replace(attn_qkv_bias=True).build("meta"))  # biases: not this path


def test_mamba2_with_b_c_groups_keeps_the_per_group_norm(monkeypatch):
    """Two B/C groups normalise y * silu(z) per group, which out_proj's whole-row norm cannot: such
    layers take in_proj, the mixer's core and out_proj, and still match the full forward."""
    from avengers.decode import mamba
    from avengers.models.registry import get_model_spec

    calls = []
    monkeypatch.setattr(mamba, "mamba_layer_step", lambda *a: calls.append(1))
    _assert_gemv_steps_match_full_forward(monkeypatch, get_model_spec("mamba2_tiny").replace(ngroups=2), mamba)
    assert not calls


@pytest.mark.parametrize("full_layers", [(), (0,)])
def test_telescoping_decode_with_triton_gemvs_matches_full_forward(monkeypatch, full_layers):
    """Telescoping models on the `triton` decode path at batch 1: Llama's GEMVs around each
    layer's slot update and read-out, or, in a hybrid's full-attention layer, around its cache
    write and read. 8 slots, so that the 4 decode steps after a 16-token prefill merge slots
    holding decoded tokens (whose gate logits then matter); a small vocabulary keeps the
    interpreter's LM head short."""
    from avengers.decode import telescoping
    from avengers.models.registry import get_model_spec

    spec = get_model_spec("tele_tiny").replace(tele_cache_size=8, src_vocab_size=512, tele_full_attn_layers=full_layers)
    _assert_gemv_steps_match_full_forward(monkeypatch, spec, telescoping)


def test_telescoping_gemv_step_without_the_head_gemv_matches_full_forward(monkeypatch):
    """Where the head GEMV does not apply (decode_head None), the batch-1 step ends with the
    model's own final norm and head."""
    from avengers.decode import telescoping
    from avengers.models.registry import get_model_spec

    spec = get_model_spec("tele_tiny").replace(tele_cache_size=8, src_vocab_size=512)
    torch.manual_seed(0)
    model = spec.build(DEVICE)
    model.init_weights()
    monkeypatch.setattr(telescoping, "decode_head", lambda *a: None)
    assert_decode_path_matches_full_forward(model.eval(), spec, "triton", DEVICE, batch=1)


def test_telescoping_batched_decode_on_the_triton_path_matches_full_forward(monkeypatch):
    """Above batch 1 a telescoping step is compiled_block_step: RMSNorm + QKV and the MLP block in
    torch around the slot update and the read-out kernel. Below the ring map's batch the slots
    shift (fused_qkv_update_core, no ring update kernel; in place: test_triton_tele_readout); the
    logits equal the full forward's."""
    from avengers.decode import telescoping
    from avengers.decode.kernels import triton_tele_update
    from avengers.models.registry import get_model_spec

    spec = get_model_spec("tele_tiny").replace(tele_cache_size=8, src_vocab_size=512)
    torch.manual_seed(0)
    model = spec.build(DEVICE)
    model.init_weights()
    steps, ring_updates = [], []
    real_step = telescoping.compiled_block_step
    monkeypatch.setattr(telescoping, "compiled_block_step", lambda *a: steps.append(1) or real_step(*a))
    monkeypatch.setattr(triton_tele_update, "ring_update", lambda *a: ring_updates.append(1))
    assert_decode_path_matches_full_forward(model.eval(), spec, "triton", DEVICE, batch=2)
    assert len(steps) == 4 and not ring_updates


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", ["mamba2_tiny", "hybrid_tiny", "tele_tiny"])
def test_gemv_steps_in_a_cuda_graph_match_eager_decode(name):
    """Mamba-2's, a hybrid's and the telescoping model's batch-1 GEMV steps replayed from a CUDA graph."""
    from avengers.models.registry import get_model_spec

    spec = get_model_spec(name)
    torch.manual_seed(0)
    model = spec.build(DEVICE)
    model.init_weights()
    assert_graph_decode_matches_eager(model.eval(), spec, "triton", DEVICE)
