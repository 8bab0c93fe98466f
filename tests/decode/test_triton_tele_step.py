"""The Triton telescoping step (triton_tele_step) against its reference, fused_qkv_step_core, over
enough steps that every action of the schedule runs (merges of decoded tokens, the drop step):
linear and WISQ gates, with and without kv_norm, softcap and empty-slot masking, fp32 and bf16
slots, a ragged cache size and several sequences. On CUDA or Triton's CPU interpreter."""

import pytest
import torch
from triton_helpers import triton_device

DEVICE = triton_device()

from avengers.decode.kernels.triton_tele_step import triton_tele_step  # noqa: E402
from avengers.decode.telescoping import fused_qkv_step_core, step_tables  # noqa: E402
from avengers.models.telescoping.attention import TeleOptions  # noqa: E402
from avengers.ops.telescoping import EMPTY_LOG_MASS  # noqa: E402

pytestmark = pytest.mark.gpu if DEVICE == "cuda" else []


def _opts(cache_size: int, gate: str, kv_norm: bool, softcap, mask_empty: bool, fmap=None) -> TeleOptions:
    return TeleOptions(cache_size, fmap, gate, mask_empty, softcap, kv_norm)


@torch.no_grad()
def _run_steps(opts, dtype, batch=3, heads=4, kv_heads=2, head_dim=32, width=48, steps=21):
    """The same random step inputs through both implementations from the same empty slots; returns
    every step's (reference, kernel) outputs and the final states."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    C, d = opts.cache_size, head_dim

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEVICE, generator=gen) * scale).to(dtype)

    ln_w, gate_w = randn(width, scale=0.5) + 1, randn(kv_heads, width, scale=0.3)
    k_gain, v_gain = (randn(d, scale=0.2) + 1, randn(d, scale=0.2) + 1) if opts.kv_norm else (None, None)
    states = []
    for _ in range(2):
        K = torch.zeros(batch, kv_heads, C, d, device=DEVICE, dtype=dtype)
        W = torch.full((batch, kv_heads, C), EMPTY_LOG_MASS, device=DEVICE, dtype=torch.float32)
        states.append((K, K.clone(), W))
    tables = step_tables(C, opts.fmap, torch.device(DEVICE))
    outputs = []
    for t in range(steps):
        qkv = randn(batch, (heads + 2 * kv_heads) * d)
        h = randn(batch, width)
        position = torch.tensor(t, device=DEVICE)
        args = (ln_w, 1e-5, gate_w if opts.gate == "linear" else None, position)
        ref = fused_qkv_step_core(qkv, h, *args, *states[0], None, tables, opts, 500.0, k_gain, v_gain)
        got = triton_tele_step(qkv, h, *args, *states[1], tables, opts, 500.0, k_gain, v_gain)
        outputs.append((ref, got))
    return outputs, states


@pytest.mark.parametrize(
    "gate, kv_norm, softcap, mask_empty",
    [
        ("linear", True, None, False),
        ("wisq", False, 5.0, True),
        ("linear", False, None, True),
        ("wisq", True, None, False),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steps_match_the_reference_core(gate, kv_norm, softcap, mask_empty, dtype):
    opts = _opts(8, gate, kv_norm, softcap, mask_empty)
    outputs, (ref_state, got_state) = _run_steps(opts, dtype)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for t, (ref, got) in enumerate(outputs):
        assert got.dtype == ref.dtype == dtype and got.shape == ref.shape
        torch.testing.assert_close(got.float(), ref.float(), **tol, msg=lambda m, t=t: f"step {t}: {m}")
    for name, r, g in zip(("keys", "values", "log-masses"), ref_state, got_state):
        torch.testing.assert_close(g.float(), r.float(), **tol, msg=lambda m, n=name: f"{n}: {m}")
    assert (ref_state[2] > EMPTY_LOG_MASS).all()  # 21 steps filled every slot: merges of decoded tokens ran


def test_ragged_cache_size_and_query_group_and_one_sequence():
    """A cache size and a query group that are not powers of two (padded slot rows and heads) and
    batch 1, the decode path's."""
    opts = _opts(12, "linear", True, None, False, fmap=[2, 5, 9, 11])
    outputs, (ref_state, got_state) = _run_steps(opts, torch.float32, batch=1, heads=6, steps=40)
    for ref, got in outputs:
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_state[0], ref_state[0], atol=1e-4, rtol=1e-4)


def test_rejects_a_head_dim_whose_halves_are_not_a_power_of_two():
    opts = _opts(8, "linear", True, None, False)
    K = torch.zeros(1, 1, 8, 12, device=DEVICE)
    W = torch.zeros(1, 1, 8, device=DEVICE)
    tables = step_tables(8, opts.fmap, torch.device(DEVICE))
    with pytest.raises(ValueError, match="head dim 2\\^k \\* 2, got 12"):
        triton_tele_step(
            torch.zeros(1, 48, device=DEVICE), torch.zeros(1, 8, device=DEVICE), torch.ones(8, device=DEVICE),
            1e-5, None, torch.tensor(0, device=DEVICE), K, K.clone(), W, tables, opts, 500.0, None, None,
        )  # fmt: skip
