"""A/B of one telescoping layer's decode step between the projections: the compiled
`fused_qkv_step_core` against the Triton kernels `triton_tele_step` (the `triton` path's batch-1
step), at tele128_llama3_1.8b's shape, CUDA graphs over 24 distinct layer states, batch 1 / 8 / 32.

    python experiments/gpu_tele_step_kernel_ab.py OUT.json

Results: experiments/README.md, "Telescoping decode step".
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avengers.decode.kernels.triton_tele_step import triton_tele_step  # noqa: E402
from avengers.decode.telescoping import compiled_fused_qkv_step_core, step_tables  # noqa: E402
from avengers.models.registry import get_model_spec  # noqa: E402


def graph_us(run, calls: int, reps: int = 7) -> float:
    """Median microseconds of one call, run(0) .. run(calls - 1) replayed from one CUDA graph."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for i in range(calls):
            run(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(calls):
            run(i)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def main() -> None:
    cfg = get_model_spec("tele128_llama3_1.8b").config
    opts = cfg.tele_options()
    H, Hkv, d, C, D = cfg.nheads, cfg.kvheads, cfg.emb_dim // cfg.nheads, opts.cache_size, cfg.emb_dim
    dev, dt, L = torch.device("cuda"), torch.bfloat16, cfg.nlayers
    tables = step_tables(C, opts.fmap, dev)
    core = compiled_fused_qkv_step_core()
    rows = []
    for B in (1, 8, 32):
        gen = torch.Generator(device=dev).manual_seed(0)

        def randn(*shape):
            return torch.randn(*shape, device=dev, generator=gen).to(dt)

        layers = [
            dict(
                qkv=randn(B, (H + 2 * Hkv) * d),
                h=randn(B, D),
                ln=randn(D),
                gate=randn(Hkv, D) * 0.05,
                kg=randn(d),
                vg=randn(d),
                K=randn(B, Hkv, C, d),
                V=randn(B, Hkv, C, d),
                W=torch.randn(B, Hkv, C, device=dev, generator=gen),
            )
            for _ in range(L)
        ]
        pos = torch.tensor(1000, device=dev)

        def runner(kernel: bool):
            states = [(layer["K"].clone(), layer["V"].clone(), layer["W"].clone()) for layer in layers]

            def run(i):
                layer, slots = layers[i], states[i]
                args = (layer["qkv"], layer["h"], layer["ln"], 1e-5, layer["gate"], pos, *slots)
                rest = (tables, opts, cfg.rope_theta, layer["kg"], layer["vg"])
                return triton_tele_step(*args, *rest) if kernel else core(*args, None, *rest)

            return run

        compiled, triton = runner(False), runner(True)
        ref, got = compiled(0).float(), triton(0).float()
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        uc, ut = graph_us(compiled, L), graph_us(triton, L)
        row = dict(
            batch=B, compiled_us=round(uc, 2), triton_us=round(ut, 2), speedup=round(uc / ut, 2), max_rel_err=err
        )
        rows.append(row)
        print(row, flush=True)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows)
    Path(sys.argv[1]).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
