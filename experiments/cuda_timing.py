"""What the experiments' kernel A/B scripts share: CUDA-graph timing and their results file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch


def graph_us(run: Callable[[int], object], calls: int, reps: int = 5) -> float:
    """Median microseconds of one call: run(0) .. run(calls - 1) captured in one CUDA graph (after
    one eager pass, which also compiles), replayed `reps` times. Give each call its own buffers,
    so that the L2 holds none of them, as in a model's step over its layers."""
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


def write_results(out: str, variant: str, rows: list[dict]) -> None:
    """<out>/results.json: the device, torch release, variant and the measured rows."""
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    result = dict(device=torch.cuda.get_device_name(), variant=variant, torch=torch.__version__, rows=rows)
    (path / "results.json").write_text(json.dumps(result, indent=2))
