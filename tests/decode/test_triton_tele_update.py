"""The Triton ring update (ring_update) against its reference, decode.telescoping.fused_qkv_update_core
with a ring map, over enough steps that every action of the schedule runs (merges of decoded tokens,
the drop step) with the map advanced between steps: linear and WISQ gates, fp32 and bf16 slots, a
cache size and a query group that are not powers of two. On CUDA or Triton's CPU interpreter."""

import pytest
import torch
from triton_helpers import triton_device

DEVICE = triton_device()

from avengers.decode.kernels.triton_tele_update import ring_update  # noqa: E402
from avengers.decode.telescoping import advance_ring, fused_qkv_update_core, step_tables  # noqa: E402
from avengers.ops.telescoping import EMPTY_LOG_MASS  # noqa: E402

pytestmark = pytest.mark.gpu if DEVICE == "cuda" else []


@pytest.mark.parametrize("gate", ["linear", "wisq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_ring_update_matches_the_reference_core(gate, dtype):
    batch, heads, kv_heads, d, width, C, fmap = 2, 6, 2, 32, 48, 12, (2, 5, 9, 11)
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEVICE, generator=gen) * scale).to(dtype)

    ln_w, gate_w = randn(width, scale=0.5) + 1, (randn(kv_heads, width, scale=0.3) if gate == "linear" else None)
    states = []
    for _ in range(2):
        K = torch.zeros(batch, kv_heads, C, d, device=DEVICE, dtype=dtype)
        W = torch.full((batch, kv_heads, C), EMPTY_LOG_MASS, device=DEVICE, dtype=torch.float32)
        states.append((K, K.clone(), W))
    ring = torch.arange(C, device=DEVICE)
    tables = step_tables(C, fmap, torch.device(DEVICE))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for t in range(40):
        qkv, h = randn(batch, (heads + 2 * kv_heads) * d), randn(batch, width)
        args = (qkv, h, ln_w, 1e-5, gate_w, torch.tensor(t, device=DEVICE))
        ref = fused_qkv_update_core(*args, *states[0], ring, tables, 500.0)
        got = ring_update(*args, *states[1], ring, tables, 500.0, len(fmap))
        torch.testing.assert_close(got, ref, **tol, msg=lambda m, t=t: f"queries, step {t}: {m}")
        for name, r, g in zip(("keys", "values", "log-masses"), *states):
            torch.testing.assert_close(g.float(), r.float(), **tol, msg=lambda m, n=name, t=t: f"{n}, step {t}: {m}")
        advance_ring(ring, torch.tensor(t, device=DEVICE), tables)
    assert ((states[0][2] > EMPTY_LOG_MASS).sum(-1) >= C - 1).all()  # full slots: merges of decoded tokens ran
    assert not torch.equal(ring, torch.arange(C, device=DEVICE))  # the slots moved behind the map
