"""The warp-specialised Gluon GEMV chain (avengers/decode/kernels/gluon_chain.py) against its torch
reference and the whole decode step (gluon_step.py) against the Triton path on a Hopper GPU; the
weight packing and the host wrappers' arguments anywhere Gluon imports."""

import pytest
import torch

pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper", reason="no Gluon in this triton")

from decode_helpers import decode_logits  # noqa: E402

from avengers.decode.kernels import gluon_chain as gc  # noqa: E402
from avengers.decode.kernels.gluon_step import LlamaStepKernel  # noqa: E402

_on_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9 or not gc.GLUON_API,
    reason="needs a Hopper (sm_90+) GPU and Triton 3.6's Gluon",
)


def hopper(test):
    """A GPU test (`make test-gpu` selects it), skipped off Hopper or without Triton 3.6's Gluon."""
    return pytest.mark.gpu(_on_hopper(test))


def _weights(L, D, NQKV, HID, device):
    g = torch.Generator().manual_seed(0)
    ws = [
        (torch.randn(L, n, k, generator=g) * 0.03).to(device, torch.bfloat16)
        for n, k in ((NQKV, D), (D, D), (2 * HID, D), (D, HID))
    ]
    norms = [(1 + 0.1 * torch.randn(L, D, generator=g)).to(device, torch.bfloat16) for _ in range(2)]
    return ws, norms


def test_pack_interleaves_gate_and_up_rows():
    ws, _ = _weights(2, 1024, 16, 1024, "cpu")
    w, w2 = gc.pack(*(list(t) for t in ws))
    per_block = 16 + 1024 + 2 * 1024
    assert w.shape == (2 * per_block, 1024) and w2.shape == (2 * 1024, 1024)
    gu = w[per_block + 16 + 1024 :]  # block 1's gate/up rows
    half = gc.ROWS // 2
    assert torch.equal(gu[:half], ws[2][1][:half])  # gate rows 0..3
    assert torch.equal(gu[half : 2 * half], ws[2][1][1024 : 1024 + half])  # then their up rows
    assert torch.equal(gu[2 * half : 3 * half], ws[2][1][half : 2 * half])
    assert torch.equal(w2[1024:], ws[3][1])


@pytest.mark.skipif(not gc.GLUON_API, reason="written for Triton 3.6's Gluon")
def test_chain_rejects_shapes_it_cannot_tile():
    x = torch.zeros(1000)
    with pytest.raises(ValueError, match="D=1000"):
        gc.chain(None, None, x, None, None, (None,) * 4, 1, 16, 1024, 1e-5, 1)


@hopper
@pytest.mark.parametrize("stages,warps", [(12, 8), (12, 4), (2, 8)])
def test_chain_matches_reference(stages, warps):
    L, D, NQKV, HID, eps = 3, 1024, 1536, 3072, 1e-5
    ws, (ln, ffln) = _weights(L, D, NQKV, HID, "cuda")
    x = torch.randn(D, device="cuda", dtype=torch.bfloat16)
    ref = gc.chain_reference(x, *ws, ln, ffln, eps).float()
    w_d, w2_d = gc.descriptors(*gc.pack(*(list(t) for t in ws)))
    bufs = (
        torch.empty(NQKV, device="cuda", dtype=torch.bfloat16),
        torch.empty(D, device="cuda", dtype=torch.bfloat16),
        torch.empty(HID, device="cuda", dtype=torch.bfloat16),
        torch.zeros(2, device="cuda", dtype=torch.int32),
    )
    programs = torch.cuda.get_device_properties(0).multi_processor_count
    gc.chain(w_d, w2_d, x, ln, ffln, bufs, L, NQKV, HID, eps, programs, stages=stages, num_warps=warps)
    assert bufs[3][1].item() == 0, "a grid barrier gave up"
    err = ((x.float() - ref).norm() / ref.norm()).item()
    assert err < 2e-2, err


def _small_llama(kvheads: int):
    """A 2-block llama3_1.8b (bf16, CUDA) with the kernel's head shapes: 8 heads of 128, width 1024."""
    from avengers.models.registry import get_model_spec

    torch.manual_seed(0)
    spec = get_model_spec("llama3_1.8b").replace(
        nlayers=2, emb_dim=1024, nheads=8, kvheads=kvheads, src_vocab_size=512, hidden_grow_factor=4.0
    )
    model = spec.build("cuda")
    model.init_weights()
    return model.to(torch.bfloat16).eval()


@hopper
@pytest.mark.parametrize(
    "kvheads,kv_ring,length",
    [
        (2, True, 80),  # 4 query heads per kv head; keys and values through the ring
        (4, True, 80),  # 2 query heads per kv head, as llama3_1.8b
        (2, False, 80),  # the consumer warps load them
        (2, True, 8000),  # splits of two 64-key tiles
    ],
)
def test_llama_decode_step_kernel_matches_the_triton_path(kvheads, kv_ring, length, monkeypatch):
    """The `gluon` decode path (every block in one kernel, RoPE, cache write and attention included)
    against the per-kernel Triton path, on a 2-block Llama with the kernel's head shapes."""
    model = _small_llama(kvheads)
    assert LlamaStepKernel.unsupported(model) == ""
    monkeypatch.setattr(LlamaStepKernel, "KV_RING", kv_ring)
    ids = torch.randint(0, 512, (1, length), generator=torch.Generator().manual_seed(1)).cuda()
    prefill = length - 10
    ref = decode_logits(model, ids, prefill, "triton")
    got = decode_logits(model, ids, prefill, "gluon")
    step = model._gluon_decode_step[1]
    assert step is not None  # the kernel ran
    b = next(iter(step._buffers.values()))
    if kv_ring:  # the caches are one tensor each (KVState.stacked): the ring path was taken
        assert b["kv_descriptors"] is not None
    # no grid barrier gave up (count[1]), the last program out reset every counter, and counted
    # the launches (the tags' base): one per decoded token
    assert int(b["count"][:-1].abs().sum()) == 0 and int(b["count"][-1]) == 10, b["count"].tolist()
    torch.testing.assert_close(got[:, prefill:].float(), ref[:, prefill:].float(), atol=5e-2, rtol=3e-2)  # bf16


@hopper
def test_caches_over_the_token_limit_take_the_triton_path(monkeypatch):
    model = _small_llama(2)
    monkeypatch.setattr(LlamaStepKernel, "MAX_CACHE_TOKENS", 64)  # the test's cache holds 80
    ids = torch.randint(0, 512, (1, 80), generator=torch.Generator().manual_seed(1)).cuda()
    ref = decode_logits(model, ids, 70, "triton")
    got = decode_logits(model, ids, 70, "gluon")
    assert model._gluon_decode_step[1]._buffers == {}  # the step kernel never ran
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)  # the same kernels


class _Bind:
    """Stands in for `chain_kernel[grid]`: binds a launch's arguments to the kernel's Python
    signature (names and count) instead of compiling it, and keeps them."""

    def __init__(self):
        import inspect

        self.signature, self.calls = inspect.signature(gc.chain_kernel.fn), []

    def __getitem__(self, grid):
        def launch(*args, launch_cooperative_grid, **kwargs):
            bound = self.signature.bind(*args, **kwargs)
            bound.apply_defaults()
            self.calls.append(bound.arguments)

        return launch


@pytest.mark.skipif(not gc.GLUON_API, reason="written for Triton 3.6's Gluon")
def test_host_wrappers_pass_every_kernel_argument_in_its_place(monkeypatch):
    """chain() and LlamaStepKernel call one kernel with ~40 positional arguments: each must land on
    the parameter it is meant for (checked on the CPU, without compiling)."""
    from avengers.decode.kernels import triton_decode
    from avengers.models.registry import get_model_spec

    bind = _Bind()
    monkeypatch.setattr(gc, "chain_kernel", bind)
    ws, (ln, ffln) = _weights(2, 1024, 48, 1024, "cpu")
    w, w2 = gc.pack(*(list(t) for t in ws))
    w_d, w2_d = gc.descriptors(w, w2)
    x = torch.zeros(1024, dtype=torch.bfloat16)
    bufs = (torch.zeros(48), torch.zeros(1024), torch.zeros(1024), torch.zeros(2, dtype=torch.int32))
    gc.chain(w_d, w2_d, x, ln, ffln, bufs, 2, 48, 1024, 1e-5, 16)
    a = bind.calls[-1]
    assert a["X"] is x and a["Count"] is bufs[3] and (a["n_layers"], a["NQKV"], a["D"], a["HID"]) == (2, 48, 1024, 1024)
    assert not a["DECODE"] and a["k_d"] is w_d and a["V"] == 0
    # 4 programs would each park 64 gate/up row blocks in the kernel's 16 slots: refused before launch
    with pytest.raises(ValueError, match="park 64 gate/up row blocks"):
        gc.chain(w_d, w2_d, x, ln, ffln, bufs, 2, 48, 1024, 1e-5, 4)

    monkeypatch.setattr(triton_decode, "sm_count", lambda device: 8)
    spec = get_model_spec("llama3_1.8b").replace(
        nlayers=2, emb_dim=1024, nheads=8, kvheads=2, src_vocab_size=512, hidden_grow_factor=4.0
    )
    model = spec.build("cpu").to(torch.bfloat16)
    step = LlamaStepKernel(model)
    cache = model.allocate_cache(1, 256)
    tokens = torch.tensor([[7]])
    logits = step(tokens, cache)
    a = bind.calls[-1]
    b = next(iter(step._buffers.values()))
    assert logits.shape == (1, 1, 512) and a["Logits"].data_ptr() == logits.data_ptr()
    assert a["Tok"] is tokens and a["Pos"] is cache.position and a["Emb"] is model.base_model.embedding.weight
    assert a["Rope"] is b["rope"] and a["q_scale"] == 128**-0.5 and a["X"] is b["x"] and a["Count"] is b["count"]
    assert (a["NQ"], a["NK"], a["HKV"], a["S"], a["V"]) == (8 * 128, 2 * 128, 2, cache.layers[0].k.shape[2], 512)
    assert (a["NSPLIT"], a["SPLIT"]) == (b["nsplit"], b["split"]) and a["KV_RING"] and a["G"] == 4
    assert a["Attn"] is b["attn"] and b["count"].numel() == 4 + 2 * 2
    assert a["DecNormW"] is model.base_model.dec_norm.weight and a["head_eps"] == model.base_model.dec_norm.eps
    assert a["K0"] is cache.layers[0].k and a["KOff"] is b["koff"] and a["k_d"] is b["kv_descriptors"][0]


def test_kv_descriptors_need_one_tensor_for_all_layers():
    """The step kernel streams keys and values through its ring only when every layer's cache is a
    consecutive view of one tensor (decode.llama.allocate_kv_cache); separately allocated layers get None."""
    from avengers.decode.cache import KVState

    class Cache:
        def __init__(self, layers):
            self.layers = layers

    stacked = Cache(KVState.stacked(3, 1, 2, 128, 128, dtype=torch.bfloat16))
    k_d, v_d = LlamaStepKernel._kv_descriptors(stacked)
    assert (
        list(k_d.shape) == [3 * 2 * 128 * 128 // gc.ITEM_K, gc.CHUNKS, gc.CW]
        and k_d.base.data_ptr() == stacked.layers[0].k.data_ptr()
    )
    assert (
        LlamaStepKernel._kv_descriptors(Cache([KVState(1, 2, 128, 128, dtype=torch.bfloat16) for _ in range(3)]))
        is None
    )
    k, v = torch.zeros(2, 3, 1, 2, 96, 128, dtype=torch.bfloat16)  # 96 positions: not whole TMA boxes
    odd = [KVState(1, 2, 96, 128, k=k[i], v=v[i]) for i in range(3)]
    assert LlamaStepKernel._kv_descriptors(Cache(odd)) is None


def test_pack_rope_pairs_put_a_rotation_pair_in_one_column_of_the_epilogue():
    """With rope_pairs, packed row a * ROWS // 2 + b of a row block (the epilogue's y[a, b]) is the
    block's natural row 2 b + a: y[0, b] and y[1, b] are the rotation pair b (rows 2b, 2b + 1)."""
    ws, _ = _weights(1, 1024, 48, 1024, "cpu")
    w, _ = gc.pack(*(list(t) for t in ws), rope_pairs=True)
    q = ws[0][0]
    half = gc.ROWS // 2
    for rb in range(48 // gc.ROWS):
        for a in range(2):
            for b in range(half):
                assert torch.equal(w[rb * gc.ROWS + a * half + b], q[rb * gc.ROWS + 2 * b + a])
