"""The SSD custom op (avengers.models.mamba.compile) with the pure-torch reference inside: opcheck,
gradients equal to autograd through the reference, and a Mamba block compiled as one graph."""

import pytest
import torch

from avengers.models import get_model_spec
from avengers.models.mamba.compile import conv_channel_first_view, make_conv_op, make_ssd_op, ssd_training
from avengers.models.mamba.conv import ref_causal_conv
from avengers.models.mamba.kernels import REFERENCE, Kernels, ref_ssd


def _ref_fwd(x, dt, A, B, C, D, dt_bias, chunk_size):
    return ref_ssd(x, dt, A, B, C, chunk_size, D, dt_bias)[0]


def _ref_bwd(dy, x, dt, A, B, C, D, dt_bias, y, chunk_size):
    with torch.enable_grad():
        _, vjp = torch.func.vjp(lambda *a: _ref_fwd(*a, chunk_size), x, dt, A, B, C, D, dt_bias)
        return vjp(dy)


OP = make_ssd_op("avengers_test::ssd_ref", _ref_fwd, _ref_bwd)


def _conv_fwd(x, weight, bias, silu):  # channel-last [b, l, c] in and out
    return ref_causal_conv(x.transpose(1, 2), weight, bias, silu).transpose(1, 2)


def _conv_bwd(grad, x, weight, bias, silu):
    with torch.enable_grad():
        ins = (x, weight) if bias is None else (x, weight, bias)
        _, vjp = torch.func.vjp(lambda x, w, *b: _conv_fwd(x, w, b[0] if b else None, silu), *ins)
        grads = vjp(grad)
    return grads[0], grads[1], grads[2] if bias is not None else None


CONV_OP = make_conv_op("avengers_test::conv_ref", _conv_fwd, _conv_bwd)


def _inputs(dtype=torch.float64, b=2, l=24, h=4, p=4, g=1, n=8):
    gen = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, dtype=dtype, generator=gen)  # noqa: E731
    return [
        mk(b, l, h, p),
        mk(b, l, h) * 0.5,
        -torch.rand(h, dtype=dtype, generator=gen) - 0.5,
        mk(b, l, g, n),
        mk(b, l, g, n),
        mk(h),
        mk(h) * 0.1,
    ]


def test_opcheck():
    args = [t.requires_grad_() for t in _inputs()]
    torch.library.opcheck(OP, (*args, 8))


def test_gradients_equal_reference_autograd():
    args = [t.requires_grad_() for t in _inputs()]
    y = OP(*args, 8)
    want = _ref_fwd(*args, 8)
    torch.testing.assert_close(y, want)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, args, dy)
    ref = torch.autograd.grad(want, args, dy)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("silu", [True, False])
def test_conv_op_opcheck_and_gradients(with_bias, silu):
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(2, 11, 20, dtype=torch.float64, generator=gen)
    x = wide[..., 3:15].requires_grad_()  # a column slice: unit channel stride, row stride 20
    w = torch.randn(12, 1, 4, dtype=torch.float64, generator=gen).requires_grad_()
    b = torch.randn(12, dtype=torch.float64, generator=gen).requires_grad_() if with_bias else None
    torch.library.opcheck(CONV_OP, (x, w, b, silu))
    conv = conv_channel_first_view(CONV_OP)
    out = conv(x.transpose(1, 2), w, b, silu)
    want = ref_causal_conv(x.transpose(1, 2), w, b, silu)
    assert out.shape == want.shape and out.stride(1) == 1  # channel-last, as the mixer's split needs
    torch.testing.assert_close(out, want)
    ins = [t for t in (x, w, b) if t is not None]
    dy = torch.randn(want.shape, dtype=torch.float64, generator=gen)
    for got, ref in zip(torch.autograd.grad(out, ins, dy), torch.autograd.grad(want, ins, dy)):
        torch.testing.assert_close(got, ref)


def test_compiled_block_is_one_graph_and_matches_eager():
    torch.manual_seed(0)
    model = get_model_spec("mamba2_tiny").build("cpu")
    block = model.backbone.layers[0]
    kernels = Kernels(
        "test",
        REFERENCE.ssd,
        REFERENCE.ssd_step,
        REFERENCE.gated_rmsnorm,
        REFERENCE.add_rmsnorm,
        REFERENCE.causal_conv,
        for_compile=Kernels(
            "test_compile",
            ssd_training(OP, REFERENCE.ssd),
            REFERENCE.ssd_step,
            REFERENCE.gated_rmsnorm,
            REFERENCE.add_rmsnorm,
            conv_channel_first_view(CONV_OP),
        ),
    )
    h = torch.randn(2, 40, 64, requires_grad=True)
    explain = torch._dynamo.explain(block)(h, None, None, None, kernels)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    ops = {str(n.target) for g in explain.graphs for n in g.graph.nodes if n.op == "call_function"}
    for name in ("avengers_test.ssd_ref", "avengers_test.conv_ref"):  # the scan and the conv: one node each
        assert any(name in o for o in ops), ops
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out_c, res_c = compiled(h, None, None, None, kernels)
    out_e, res_e = block(h, None, None, None, kernels)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    g_c = torch.autograd.grad(out_c.sum() + res_c.sum(), [h, block.mixer.A_log])
    g_e = torch.autograd.grad(out_e.sum() + res_e.sum(), [h, block.mixer.A_log])
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_with_state_falls_back():
    calls = []

    def with_state(*a):
        calls.append(a)
        return REFERENCE.ssd(*a)

    ssd = ssd_training(OP, with_state)
    x, dt, A, B, C, D, bias = _inputs(torch.float32)
    y, final = ssd(x, dt, A, B, C, 8, D, bias, None, True)
    assert final is not None and len(calls) == 1
    y2, none = ssd(x, dt, A, B, C, 8, D, bias)
    assert none is None and len(calls) == 1
    torch.testing.assert_close(y2, y)


@pytest.mark.parametrize("mode", ["nope"])
def test_compile_mode_is_validated(mode):
    from avengers.models.mamba import kernels as mamba_kernels

    with pytest.raises(ValueError, match="COMPILE_MODE"):
        mamba_kernels._mamba_ssm_kernels.__wrapped__(mode)
