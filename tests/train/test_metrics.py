"""metrics.jsonl rows carry the time they were written."""

import json
import time

from avengers.config import make_config
from avengers.train.metrics import MetricsLogger


def test_rows_get_a_unix_timestamp(tmp_path, capsys):
    cfg = make_config(model_variant="llama3_tiny", ckpt_save_path=str(tmp_path), num_steps=2)
    logger = MetricsLogger(cfg, rank=0, start_step=0)
    before = time.time()
    logger.log({"step": 1, "loss": 2.5})
    logger.log({"step": 2, "loss": 2.25})
    after = time.time()
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 2.5), (2, 2.25)]
    assert before - 0.001 <= rows[0]["time"] <= rows[1]["time"] <= after + 0.001
    assert "time" not in capsys.readouterr().out  # the printed line stays as it was


def test_profiler_writes_a_trace_and_an_operator_table(tmp_path):
    import torch

    from avengers.train.metrics import build_profiler

    cfg = make_config(model_variant="llama3_tiny", ckpt_save_path=str(tmp_path), use_profiler=True)
    profiler = build_profiler(cfg, rank=0)
    x = torch.randn(64, 64)
    profiler.start()
    for _ in range(6):  # wait 1, warmup 2, active 3
        (x @ x).relu_()
        profiler.step()
    profiler.stop()
    folder = tmp_path / "profile_traces"
    assert any(p.name.endswith(".pt.trace.json") for p in folder.iterdir())
    table = (folder / "ops_rank0.txt").read_text()
    assert table.startswith("top operators over the 3 profiled steps, by self_cpu_time_total")
    assert "aten::mm" in table and "aten::relu_" in table


def test_operator_tables_one_per_sort(tmp_path):
    import torch
    from torch.profiler import profile

    from avengers.train.metrics import write_operator_tables

    x = torch.randn(32, 32)
    with profile() as prof:
        (x @ x).relu_()
    path = tmp_path / "ops.txt"
    write_operator_tables(prof.key_averages(), str(path), ("self_device_time_total", "self_cpu_time_total"))
    text = path.read_text()
    heads = [line for line in text.splitlines() if line.startswith("top operators")]
    assert heads == [
        "top operators over the 3 profiled steps, by self_device_time_total",
        "top operators over the 3 profiled steps, by self_cpu_time_total",
    ]
    assert text.count("aten::mm") == 2
