"""Against mamba_ssm itself (skipped unless it imports, e.g. PYTHONPATH with mamba_ssm + triton + the stub).

On a CPU machine mamba_ssm's Triton kernels cannot run, so its own pure-torch reference functions
(ssd_chunk_scan_combined_ref, rms_norm_ref) stand in for them. That
checks (1) identical parameter layout and checkpoint folders both ways, (2) identical forward math
of MambaLMHeadModel and MambaLM on the same weights, (3) the argument conventions of our calls
into mamba_ssm's kernel entry points (avengers.models.mamba.kernels._mamba_ssm_ops).
"""

import pytest
import torch

mamba_ssm = pytest.importorskip("mamba_ssm", reason="mamba_ssm (and triton) not importable")

from mamba_ssm.models.config_mamba import MambaConfig as SsmConfig  # noqa: E402
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel  # noqa: E402
from mamba_ssm.ops.triton import layer_norm as ssm_ln  # noqa: E402
from mamba_ssm.ops.triton import layernorm_gated as ssm_gated  # noqa: E402
from mamba_ssm.ops.triton import ssd_combined as ssm_ssd  # noqa: E402

import avengers.models.mamba as mamba_mod  # noqa: E402
import avengers.models.mamba.model as mamba_model  # noqa: E402
from avengers.models import get_model_spec  # noqa: E402
from avengers.models.mamba import MambaLM, from_pretrained  # noqa: E402
from avengers.models.mamba.config import _SSM_TOP_DEFAULTS  # noqa: E402
from avengers.models.mamba.conv import ref_causal_conv  # noqa: E402
from avengers.models.mamba.kernels import Kernels, _mamba_ssm_ops, ref_ssd_step  # noqa: E402
from avengers.models.mamba.ssd import ssd_chunked  # noqa: E402

# mamba_ssm's MHA asserts flash-attn for rotary_emb_dim > 0, so its side of a hybrid runs without RoPE.
CONFIGS = {"mamba2_tiny": {}, "hybrid_tiny": {"attn_rotary_emb_dim": 0}}


def _ssm_model(cfg, device="cpu"):
    d = cfg.to_mamba_ssm()
    d["ssm_cfg"] = {**d["ssm_cfg"], "use_mem_eff_path": False}
    return MambaLMHeadModel(SsmConfig(**d), device=device)


@pytest.fixture
def cpu_refs(monkeypatch):
    """Replace mamba_ssm's Triton entry points by its own pure-torch references."""

    def chunk_scan(
        x,
        dt,
        A,
        B,
        C,
        chunk_size,
        D=None,
        z=None,
        dt_bias=None,
        initial_states=None,
        dt_softplus=False,
        return_final_states=False,
        **kw,
    ):
        if initial_states is None and not return_final_states:
            return ssm_ssd.ssd_chunk_scan_combined_ref(
                x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus
            )
        dt = torch.nn.functional.softplus(dt.float() + dt_bias.float()) if dt_softplus else dt
        y, final = ssd_chunked(x, dt, A, B, C, chunk_size, D=D, initial_state=initial_states)  # no mamba_ssm ref
        return (y, final) if return_final_states else y

    def rms(x, weight, bias, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False, **kw):
        out = ssm_ln.rms_norm_ref(x, weight, bias, residual=residual, eps=eps, prenorm=prenorm, upcast=True)
        if not prenorm:
            return out.to(x.dtype)
        y, res = out
        return y.to(x.dtype), res.float() if residual_in_fp32 else res

    def gated(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
        return ssm_gated.rms_norm_ref(
            x, weight, bias, z=z, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate
        )

    monkeypatch.setattr(ssm_ssd, "mamba_chunk_scan_combined", chunk_scan)
    monkeypatch.setattr("mamba_ssm.modules.mamba2.mamba_chunk_scan_combined", chunk_scan)
    monkeypatch.setattr(ssm_ln, "rms_norm_fn", rms)
    monkeypatch.setattr(ssm_gated, "rmsnorm_fn", gated)


def test_missing_keys_take_mamba_ssm_defaults():
    import dataclasses

    assert dataclasses.asdict(SsmConfig()) == _SSM_TOP_DEFAULTS


@pytest.mark.parametrize("name", ["mamba2_tiny", "hybrid_tiny", "mamba_9.8b", "mamba_1.5b"])
def test_layout_equals_mamba_lm_head_model(name):
    spec = get_model_spec(name).replace(attn_rotary_emb_dim=0)
    theirs = {k: tuple(v.shape) for k, v in _ssm_model(spec.config, device="meta").state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in spec.build("meta").state_dict().items()}
    assert list(ours) == list(theirs)
    assert ours == theirs


def test_checkpoints_move_both_ways(tmp_path):
    spec = get_model_spec("hybrid_tiny").replace(attn_rotary_emb_dim=0)
    torch.manual_seed(0)
    theirs = _ssm_model(spec.config)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours = from_pretrained(str(tmp_path / "theirs"))
    for (k, a), (_, b) in zip(theirs.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b), k
    mamba_mod.save_pretrained(spec.build("cpu"), str(tmp_path / "ours"))
    cfg = SsmConfig(**__import__("json").loads((tmp_path / "ours" / "config.json").read_text()))
    back = MambaLMHeadModel(cfg)
    back.load_state_dict(torch.load(tmp_path / "ours" / "pytorch_model.bin", weights_only=True), strict=True)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_logits_as_mamba_lm_head_model(name, cpu_refs):
    spec = get_model_spec(name).replace(fused_add_norm=False, **CONFIGS[name])
    torch.manual_seed(0)
    ours = spec.build("cpu").eval()
    theirs = _ssm_model(spec.config).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ids = torch.randint(0, 4096, (2, 32))  # their ref needs whole chunks
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_our_mamba_ssm_call_conventions(name, cpu_refs, monkeypatch):
    """Our model with its 'mamba_ssm' ops (entry points patched to refs) equals the reference path,
    in training forward and in prefill + decode."""
    spec = get_model_spec(name)
    torch.manual_seed(0)
    model = spec.build("cpu").eval()
    ids = torch.randint(0, 4096, (2, 32))  # their ref needs whole chunks
    with torch.no_grad():
        want = model(ids)
        # the conv and the decode state update are ours, not mamba_ssm entry points (Triton kernels,
        # tested against these references in their own tests)
        ours = {"causal_conv": ref_causal_conv, "ssd_step": ref_ssd_step}
        kernels = Kernels("mamba_ssm", **{**_mamba_ssm_ops(), **ours})
        monkeypatch.setattr(mamba_model, "select_kernels", lambda device, mode: kernels)
        torch.testing.assert_close(model(ids), want, rtol=1e-4, atol=1e-4)
        cache = model.allocate_cache(2, 40)
        got = torch.cat(
            [model(ids[:, :20], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(20, 32)], 1
        )
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert isinstance(model, MambaLM)


def test_custom_op_over_mamba_ssm_makes_one_graph_per_block():
    """The compile-friendly kernels over mamba_ssm's real SSD entry points, traced on the meta device."""
    from avengers.models.mamba import kernels as mamba_kernels

    kernels = mamba_kernels._mamba_ssm_kernels("custom_op")
    assert kernels.for_compile is not None
    block = get_model_spec("mamba2_tiny").build("meta").backbone.layers[0]
    h = torch.empty(2, 40, 64, device="meta", requires_grad=True)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(block)(h, None, None, None, kernels)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    ops = {str(n.target) for g in explain.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("avengers.mamba2_ssd" in o for o in ops), ops


def test_export_loads_with_mamba_lm_head_model_from_pretrained(tmp_path):
    """`python -m avengers.export` (mamba_ssm format) -> mamba_ssm's own from_pretrained loads it
    strictly, with parameters equal to the checkpoint's."""
    from checkpoint_helpers import save_checkpoint

    from avengers.export import export_checkpoint

    ours = save_checkpoint(tmp_path / "run", "mamba2_tiny")
    out = export_checkpoint(str(tmp_path / "run"), str(tmp_path / "export"), dtype="fp32")
    theirs = MambaLMHeadModel.from_pretrained(out)  # load_state_dict(strict=True) inside
    theirs_sd, ours_sd = theirs.state_dict(), ours.state_dict()
    assert list(theirs_sd) == list(ours_sd)
    for k, v in ours_sd.items():
        assert torch.equal(theirs_sd[k], v), k
