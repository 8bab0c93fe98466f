"""The Triton slot read-out (slot_readout) against its reference, decode.telescoping.slot_attention:
kv_norm on and off, softcap, empty slots masked or left as zero sinks, a cache size and a query
group that are not powers of two, fp32 and bf16 slots. On CUDA or Triton's CPU interpreter."""

import pytest
import torch
from triton_helpers import triton_device

DEVICE = triton_device()

from avengers.decode.kernels.triton_tele_readout import slot_readout  # noqa: E402
from avengers.decode.telescoping import slot_attention  # noqa: E402
from avengers.models.telescoping.attention import TeleOptions  # noqa: E402
from avengers.ops.telescoping import EMPTY_LOG_MASS  # noqa: E402

pytestmark = pytest.mark.gpu if DEVICE == "cuda" else []


def _inputs(dtype, batch, heads, kv_heads, cache_size, head_dim, empty):
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=DEVICE, generator=gen).to(dtype)

    q = randn(batch, heads, head_dim)
    K, V = randn(batch, kv_heads, cache_size, head_dim), randn(batch, kv_heads, cache_size, head_dim)
    W = torch.randn(batch, kv_heads, cache_size, device=DEVICE, generator=gen)
    K[:, :, -empty:], V[:, :, -empty:], W[:, :, -empty:] = 0, 0, EMPTY_LOG_MASS  # the oldest slots still empty
    gains = (randn(head_dim) * 0.2 + 1, randn(head_dim) * 0.2 + 1)
    return q, K, V, W, gains


@pytest.mark.parametrize(
    "kv_norm, softcap, mask_empty", [(True, None, False), (False, 5.0, True), (True, 20.0, True), (False, None, False)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_readout_matches_slot_attention(kv_norm, softcap, mask_empty, dtype):
    opts = TeleOptions(12, [2, 5, 9, 11], "linear", mask_empty, softcap, kv_norm)
    q, K, V, W, (kg, vg) = _inputs(dtype, batch=3, heads=6, kv_heads=2, cache_size=12, head_dim=32, empty=5)
    gains = (kg, vg) if kv_norm else (None, None)
    ref = slot_attention(q, K, V, W, opts, *gains)
    got = slot_readout(q, K, V, W, opts, *gains)
    assert got.dtype == ref.dtype == dtype and got.shape == ref.shape
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got, ref, **tol)


def test_readout_rejects_a_head_dim_it_cannot_tile():
    opts = TeleOptions(8, None, "linear", False, None, False)
    q, K, V, W, _ = _inputs(torch.float32, batch=1, heads=2, kv_heads=1, cache_size=8, head_dim=24, empty=1)
    with pytest.raises(ValueError, match="power-of-two head dim >= 16, got 24"):
        slot_readout(q, K, V, W, opts)


@pytest.mark.parametrize("batch", [1, 2])
@torch.no_grad()
def test_triton_path_reads_the_slots_with_the_kernel(batch, monkeypatch):
    """The `triton` path reads the slots out with the kernel in every layer of every step, the slots
    in place behind the ring map and updated by the ring update kernel: at batch 1 between the
    GEMVs, at the ring map's batch (lowered to 2) between compiled_block_step's projections. The
    logits equal a full forward's, through merges of decoded tokens and a drop (8 slots, 12 steps
    after an 8-token prefill)."""
    from decode_helpers import decode_logits

    from avengers.decode import telescoping
    from avengers.decode.kernels import triton_tele_readout, triton_tele_update
    from avengers.models.registry import get_model_spec

    spec = get_model_spec("tele_tiny").replace(tele_cache_size=8, src_vocab_size=512)
    torch.manual_seed(0)
    model = spec.build(DEVICE)
    model.init_weights()
    model.eval()
    monkeypatch.setattr(telescoping, "RING_MIN_BATCH", 2)
    calls, updates = [], []
    real = triton_tele_readout.slot_readout
    monkeypatch.setattr(triton_tele_readout, "slot_readout", lambda *a: calls.append(1) or real(*a))
    real_update = triton_tele_update.ring_update
    monkeypatch.setattr(triton_tele_update, "ring_update", lambda *a: updates.append(1) or real_update(*a))
    ids = torch.randint(0, spec.vocab_size, (batch, 20), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    torch.testing.assert_close(decode_logits(model, ids, 8, "triton"), model(ids), atol=1e-4, rtol=1e-4)
    assert len(calls) == 12 * spec.config.nlayers
    assert len(updates) == 12 * spec.config.nlayers


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@torch.no_grad()
def test_triton_path_at_the_ring_batch_replays_from_a_cuda_graph():
    """At RING_MIN_BATCH sequences the compiled in-place update and the read-out kernel, replayed
    from a CUDA graph, give the full forward's logits through drops."""
    from avengers.decode.options import DecodeOptions
    from avengers.decode.telescoping import RING_MIN_BATCH
    from avengers.inference.graphs import DecodeStep
    from avengers.models.registry import get_model_spec

    spec = get_model_spec("tele_tiny").replace(tele_cache_size=8, src_vocab_size=512)
    torch.manual_seed(0)
    model = spec.build(DEVICE)
    model.init_weights()
    model.eval()
    x = torch.randint(0, spec.vocab_size, (RING_MIN_BATCH, 40), generator=torch.Generator().manual_seed(6)).cuda()
    full = model(x)
    cache = model.allocate_cache(RING_MIN_BATCH, 40, options=DecodeOptions("triton"))
    model(x[:, :10], cache=cache)
    step = DecodeStep(model, cache, cuda_graph=True)
    got = torch.stack([step(x[:, i : i + 1]).clone() for i in range(10, 40)], 1)
    torch.testing.assert_close(got, full[:, 10:], atol=1e-3, rtol=1e-3)
