"""trace_summary on small hand-written Chrome traces: who sets the pace, the host or the GPU."""

import gzip
import json

import pytest

from avengers.train.trace_summary import main, summarize, write_for_newest_trace


def _launch(tid, ts, corr, dur=5.0):
    return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": tid, "ts": ts, "dur": dur,
            "args": {"correlation": corr}}  # fmt: skip


def _kernel(ts, dur, corr, name="k"):
    return {"ph": "X", "cat": "kernel", "name": name, "tid": 7, "ts": ts, "dur": dur, "args": {"correlation": corr}}


def _step(ts, dur, n=1):
    return {"ph": "X", "cat": "user_annotation", "name": f"ProfilerStep#{n}", "tid": 1, "ts": ts, "dur": dur}


def _host_bound_trace():
    """Thread 1 launches three 100 us kernels 300 us apart: each starts 2 us after its launch ends,
    after 200 us of idle GPU (second and third). Thread 2 (autograd) queues two kernels ahead: the
    first starts after 193 us of idle, 195 us after its launch (the GPU was not waiting for the host)."""
    ev = [_step(0, 1200)]
    for i, t in enumerate((0, 300, 600)):
        ev += [_launch(1, t, i), _kernel(t + 7, 100, i)]
    ev += [_launch(2, 700, 10), _launch(2, 710, 11), _kernel(900, 100, 10), _kernel(1000, 100, 11)]
    return {"traceEvents": ev}


def test_a_host_that_launches_late_is_found_waiting_for():
    s = summarize(_host_bound_trace())
    assert s.steps == 1 and s.step_ms == pytest.approx(1.2)
    assert s.span_ms == pytest.approx((1100 - 7) / 1e3)
    assert s.idle_ms == pytest.approx((200 + 200 + 193) / 1e3)
    assert s.host_wait_ms == pytest.approx(0.4)
    main_thread, autograd = sorted(s.threads, key=lambda t: t.tid)
    assert main_thread.kernels == 3 and main_thread.median_delay_us == 2
    assert main_thread.host_wait_ms == pytest.approx(0.4) and main_thread.idle_ms == pytest.approx(0.4)
    assert autograd.kernels == 2 and autograd.host_wait_ms == 0 and autograd.idle_ms == pytest.approx(0.193)
    assert autograd.median_delay_us == pytest.approx((195 + 285) / 2)
    assert s.verdict().endswith("the host sets the pace")


def test_a_gpu_with_a_full_queue_sets_the_pace():
    ev = [_step(0, 500)] + [e for i in range(4) for e in (_launch(1, 10 * i, i), _kernel(100 + 100 * i, 100, i))]
    s = summarize({"traceEvents": ev})
    assert s.idle_ms == 0 and s.host_wait_ms == 0 and s.span_ms == pytest.approx(0.4)
    assert "GPU busy 100%" in s.verdict() and s.verdict().endswith("the GPU sets the pace")


def test_steps_are_averaged_and_a_cpu_trace_has_no_summary(tmp_path):
    two = _host_bound_trace()
    two["traceEvents"].append(_step(1200, 1200, 2))
    assert summarize(two).step_ms == pytest.approx(1.2) and summarize(two).idle_ms == pytest.approx(0.593 / 2)
    mm = {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "tid": 1, "ts": 1, "dur": 5}
    cpu = {"traceEvents": [_step(0, 100), mm]}
    assert summarize(cpu) is None
    (tmp_path / "rank0.1.pt.trace.json").write_text(json.dumps(cpu))
    assert write_for_newest_trace(str(tmp_path), "rank0", str(tmp_path / "out.txt")) is None
    assert not (tmp_path / "out.txt").exists()


def test_the_newest_trace_of_the_rank_is_summarised_and_the_cli_reads_gzip(tmp_path, capsys):
    (tmp_path / "rank0.1.pt.trace.json").write_text(json.dumps({"traceEvents": [_step(0, 1)]}))
    with gzip.open(tmp_path / "rank0.2.pt.trace.json.gz", "wt") as f:
        json.dump(_host_bound_trace(), f)
    (tmp_path / "rank1.3.pt.trace.json").write_text("not json: another rank's, never read")
    out = tmp_path / "host_gpu_rank0.txt"
    s = write_for_newest_trace(str(tmp_path), "rank0", str(out))
    assert s is not None and s.verdict() in out.read_text()
    assert main([str(tmp_path / "rank0.2.pt.trace.json.gz")]) == 0
    assert "the host sets the pace" in capsys.readouterr().out
    assert main([]) == 2
