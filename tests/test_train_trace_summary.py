"""train.trace_summary attributes GPU idle time correctly on a hand-built trace; scripts/trace_summary.py prints it."""
import gzip
import json
import os
import subprocess
import sys

from train.trace_summary import load_events, summarise, union_length

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_union_length_merges_overlaps():
    assert union_length([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25
    assert union_length([]) == 0


def _kernel(name, ts, dur, corr):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 7, "args": {"correlation": corr}}


def _launch(ts, corr):
    return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 3, "pid": 1, "tid": 1,
            "args": {"correlation": corr}}


def test_gaps_split_into_host_late_and_dependency(tmp_path):
    events = [
        _kernel("gemm", 0, 100, 1), _launch(-50, 1),
        # 200 us gap; the next kernel was launched just before it ran: the host was late (inside "FSDP::pre_forward")
        _kernel("gemm", 300, 100, 2), _launch(295, 2),
        {"ph": "X", "cat": "user_annotation", "name": "FSDP::pre_forward", "ts": 120, "dur": 170, "pid": 1, "tid": 1},
        # 500 us gap ended by a kernel launched long before: it waited on the NCCL kernel (another stream)
        {"ph": "X", "cat": "kernel", "name": "ncclDevKernel_AllGather", "ts": 400, "dur": 500, "pid": 0, "tid": 9,
         "args": {"correlation": 3}}, _launch(380, 3),
        _kernel("add", 900, 50, 4), _launch(390, 4),
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 960, "dur": 40, "pid": 1, "tid": 1,
         "args": {}},
    ]
    path = tmp_path / "rank0.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    text = summarise(load_events(str(path)))
    script = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "trace_summary.py"), str(path)],
                            capture_output=True, text=True, timeout=120, check=True).stdout
    assert script == f"== {path}\n{text}\n"
    assert "window 0.9 ms" in text  # 0 .. 950 us
    assert "compute kernels 0.2 ms" in text  # 250 us of compute
    assert "host late (next kernel launched < 30 us before it ran) 0.2 ms in 1 gaps" in text
    assert "waiting on a dependency 0.5 ms in 1 gaps" in text
    assert "FSDP::pre_forward" in text.split("host ranges during host-late gaps")[1]
    assert "cudaStreamSynchronize" in text


def test_trace_without_gpu_events(tmp_path):
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps({"traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5}]}))
    assert summarise(load_events(str(path))) == "no GPU events in this trace"
