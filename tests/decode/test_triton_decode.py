"""The Triton decode-attention kernel against the SDPA reference.

Runs on CUDA (marked gpu), or on CPU through Triton's interpreter when triton is installed and
TRITON_INTERPRET=1 is set (fp32/fp16 only: the interpreter mishandles bf16).
"""

import pytest
import torch
from triton_helpers import triton_device

DEVICE = triton_device()

from avengers.decode.attention import decode_attention_reference, decode_attention_torch  # noqa: E402
from avengers.decode.kernels.triton_decode import decode_attention_triton  # noqa: E402

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
SHAPES = [  # B, H, H_kv, S, d, valid length
    (1, 4, 2, 256, 16, 200),
    (2, 8, 2, 384, 32, 1),
    (3, 6, 3, 128, 64, 128),
    (2, 16, 8, 1024, 128, 1000),
]
pytestmark = pytest.mark.gpu if DEVICE == "cuda" else []


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(shape, dtype):
    B, H, Hkv, S, d, length = shape
    g = torch.Generator(device=DEVICE).manual_seed(S + d)
    q = torch.randn(B, H, d, device=DEVICE, dtype=dtype, generator=g)
    k, v = torch.randn(2, B, Hkv, S, d, device=DEVICE, dtype=dtype, generator=g)
    got = decode_attention_triton(q, k, v, torch.tensor(length, device=DEVICE), scale=0.2)
    ref = decode_attention_reference(q.float(), k.float(), v.float(), length, scale=0.2)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(
        decode_attention_torch(q.float(), k.float(), v.float(), torch.tensor(length, device=DEVICE), scale=0.2),
        ref,
        atol=1e-4,
        rtol=1e-4,
    )


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need CUDA")
def test_triton_in_cuda_graph_follows_the_device_length():
    q = torch.randn(1, 16, 128, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, 1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
    length = torch.tensor(10, device="cuda")
    decode_attention_triton(q, k, v, length)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention_triton(q, k, v, length)
    for n in (1, 777, 4096):
        length.fill_(n)
        graph.replay()
        ref = decode_attention_reference(q.float(), k.float(), v.float(), n)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "batch,kv_heads,buffer_len",
    [(1, 8, 32832), (1, 8, 1088), (8, 8, 131136), (39, 8, 32832), (64, 8, 4096), (1, 1, 200)],
)
def test_splits_cover_the_buffer_and_fill_their_waves(batch, kv_heads, buffer_len):
    from avengers.decode.kernels.triton_decode import BLOCK_N, MAX_SPLITS, _splits, num_splits

    programs = 132 if DEVICE != "cuda" else torch.cuda.get_device_properties(0).multi_processor_count
    split, nsplit = num_splits(batch, kv_heads, buffer_len, torch.device(DEVICE))
    assert split % BLOCK_N == 0 and (nsplit - 1) * split < buffer_len <= nsplit * split and nsplit <= MAX_SPLITS

    def slot_work(n_split: int, split_len: int) -> int:  # keys per program slot, as the heaviest SM streams them
        return -(-batch * kv_heads * n_split // programs) * split_len

    assert slot_work(nsplit, split) <= slot_work(1, -(-buffer_len // BLOCK_N) * BLOCK_N)  # no worse than no splits
    if batch * kv_heads * 2 <= programs and buffer_len >= 16 * 1024:  # a long cache, few heads: one wave of splits
        assert batch * kv_heads * nsplit <= programs and 2 * batch * kv_heads * nsplit > programs
    assert _splits(batch * kv_heads, buffer_len, programs) == (split, nsplit)
