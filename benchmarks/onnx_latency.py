"""onnxruntime latency of exported GN models against their BN originals (BN folded), in one run.

    .venv/bin/python benchmarks/onnx_latency.py [--repeats 15] [--threads 1] [--no-end-to-end]

For resnet50 and mobilenetv3_large_100 (random init, BN statistics randomised as a trained model's
would be; GN converted from it with G = 32): the BN model exported with every BN folded into its conv,
the GN model exported three ways (gnsurgeon's default decomposition with a depthwise-conv affine,
torch.onnx's own Reshape/InstanceNormalization/Mul/Add lowering, native GroupNormalization), and
PyTorch eager for both. Batch 1, 224x224, CPU, medians of round-robin runs, wall and process CPU
time; at one thread (the default) the CPU time is the idle-machine latency even on a shared machine
and the ratios come from it, with more threads from wall time. Prints
Markdown tables: latencies and ratios, then onnxruntime's profiled kernel time by operator (what the
GN subgraph costs), then the end-to-end ``export_onnx`` time (export + verification) for resnet50.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch
from fold_latency import with_trained_statistics  # noqa: E402  (same folder)

import gnsurgeon
from gnsurgeon.onnx_export import export_model, fold_for_export

MODELS = ["resnet50", "mobilenetv3_large_100"]
PROFILED_OPS = ["Conv", "InstanceNormalization", "Reshape", "ReorderInput", "ReorderOutput", "Mul", "Add", "Relu"]


def torchlib_export(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """torch.onnx's own GN lowering at opset 18: Reshape -> InstanceNormalization -> Reshape -> Mul -> Add."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (torch.cat([example, example]),),
            dynamo=True,
            opset_version=18,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            input_names=["input"],
            verbose=False,
        )
    program.save(str(path))


def session(path: Path, threads: int, profile: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.enable_profiling = profile
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latencies_ms(runners: list, repeats: int) -> list[tuple[float, float]]:
    """Median ``(wall, process CPU)`` ms per run for each runner, timed round-robin so that machine
    drift hits all alike. Each turn pauses (the previous runner's spinning onnxruntime / OpenMP threads
    park), runs once untimed, then times two runs. With one thread the CPU time is the latency the run
    would have on an idle machine: other jobs on a shared machine stretch the wall time, not it.
    """
    wall: list[list[float]] = [[] for _ in runners]
    cpu: list[list[float]] = [[] for _ in runners]
    for _ in range(repeats):
        for i, run in enumerate(runners):
            time.sleep(0.01)
            run()
            for _ in range(2):
                start, start_cpu = time.perf_counter(), time.process_time()
                run()
                wall[i].append(time.perf_counter() - start)
                cpu[i].append(time.process_time() - start_cpu)
    return [(statistics.median(w) * 1e3, statistics.median(c) * 1e3) for w, c in zip(wall, cpu, strict=True)]


def kernel_ms_by_op(path: Path, x: np.ndarray, threads: int, runs: int = 20) -> dict[str, float]:
    """onnxruntime's profiled kernel time per operator type, ms per run (after its graph optimizations).

    Per node the minimum over ``runs`` (contention only adds time), then summed by operator type.
    """
    sess = session(path, threads, profile=True)
    for _ in range(runs):
        sess.run(None, {"input": x})
    trace = Path(sess.end_profiling())
    per_node: dict[tuple[str, str], list[float]] = defaultdict(list)
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_node[(event["args"]["op_name"], event["name"])].append(event["dur"] / 1e3)
    trace.unlink()
    totals: dict[str, float] = defaultdict(float)
    for (op, _), durations in per_node.items():
        totals[op] += min(durations)
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="round-robin rounds (2 timed runs each)")
    parser.add_argument("--threads", type=int, default=1, help="1: ratios from CPU time, immune to other jobs")
    parser.add_argument("--no-end-to-end", action="store_true", help="skip timing export_onnx on resnet50")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"onnxruntime {ort.__version__}, torch {torch.__version__}, CPU, {args.threads} threads, batch 1, "
        f"224x224, {2 * args.repeats} runs each (round-robin), onnxruntime default graph optimizations; "
        f"load average at start {os.getloadavg()[0]:.1f}\n"
    )
    rows, profiles = [], {}
    tmp = Path(tempfile.mkdtemp(prefix="gnsurgeon-onnx-bench-"))
    x = torch.randn(1, 3, 224, 224)
    for name in MODELS:
        bn = with_trained_statistics(timm.create_model(name)).eval()
        gn = gnsurgeon.convert(bn).eval()
        folded, _ = fold_for_export(bn, x)
        files = {
            "BN folded": tmp / f"{name}-bn.onnx",
            "GN decomposed (default)": tmp / f"{name}-gn.onnx",
            "GN decomposed, Mul/Add affine": tmp / f"{name}-gn-muladd.onnx",
            "GN native (opset 21)": tmp / f"{name}-gn-native.onnx",
        }
        files["BN folded"].write_bytes(export_model(folded, x).SerializeToString())
        files["GN decomposed (default)"].write_bytes(export_model(gn, x).SerializeToString())
        torchlib_export(gn, x, files["GN decomposed, Mul/Add affine"])
        native = export_model(gn, x, opset=21, gn_op="native")
        files["GN native (opset 21)"].write_bytes(native.SerializeToString())
        sessions = {k: session(p, args.threads) for k, p in files.items()}
        feed = {"input": x.numpy()}
        runners = [lambda s=s, feed=feed: s.run(None, feed) for s in sessions.values()]
        with torch.inference_mode():
            runners += [lambda m=bn: m(x), lambda m=gn: m(x)]
            ms = latencies_ms(runners, args.repeats)
        ort_ms = dict(zip(sessions, ms[: len(sessions)], strict=True))
        eager_bn, eager_gn = ms[len(sessions) :]
        k = 1 if args.threads == 1 else 0  # ratios from CPU time at 1 thread, else from wall time
        base = ort_ms["BN folded"]
        for graph, value in ort_ms.items():
            eager = eager_bn if graph == "BN folded" else eager_gn
            rows.append((name, graph, value, value[k] / base[k], eager, value[k] / eager[k]))
        profiles[name] = {
            k: kernel_ms_by_op(p, x.numpy(), args.threads)
            for k, p in files.items()
            if k in ("BN folded", "GN decomposed (default)", "GN decomposed, Mul/Add affine")
        }

    basis = "CPU time (1 thread: immune to other jobs)" if args.threads == 1 else "wall time"
    print(f"Ratios from {basis}. Wall / CPU: medians in ms per batch-1 run.\n")
    print("| model | ONNX graph | onnxruntime wall / CPU | / BN folded | PyTorch eager wall / CPU | ORT / eager |")
    print("|---|---|---:|---:|---:|---:|")
    for name, graph, value, ratio, eager, speedup in rows:
        label = "BN eval" if graph == "BN folded" else "GN"
        print(
            f"| {name} | {graph} | {value[0]:.1f} / {value[1]:.1f} | {ratio:.2f} "
            f"| {eager[0]:.1f} / {eager[1]:.1f} ({label}) | {speedup:.2f} |"
        )
    print(
        "\nonnxruntime kernel time by operator, ms per batch-1 run (profiled after its graph optimizations; "
        "per node the minimum of 20 runs):\n"
    )
    for name, by_graph in profiles.items():
        graphs = list(by_graph)
        print(f"| {name} | " + " | ".join(graphs) + " |")
        print("|---|" + "---:|" * len(graphs))
        for op in [*PROFILED_OPS, "total"]:
            cells = []
            for g in graphs:
                value = sum(by_graph[g].values()) if op == "total" else by_graph[g].get(op, 0.0)
                cells.append(f"{value:.1f}")
            print(f"| {op} | " + " | ".join(cells) + " |")
        print()

    if not args.no_end_to_end:
        checkpoint = tmp / "resnet50-gn.safetensors"
        gnsurgeon.convert_source("timm:resnet50", checkpoint, gnsurgeon.ConvertOptions(probe=False))
        start = time.perf_counter()
        report = gnsurgeon.export_onnx(str(checkpoint), tmp / "resnet50-gn-e2e.onnx")
        total = time.perf_counter() - start
        steps = ", ".join(f"{k} {v:.1f}" for k, v in report.timings.items())
        print(
            f"`gnsurgeon export-onnx` resnet50 checkpoint, end to end: {total:.1f} s ({steps}); verification "
            f"{'passed' if report.ok else 'FAILED'}: {len(report.verification.layers)} GN layers"
        )
        worst = max(
            (c for row in report.verification.layers for n, c in row["cases"].items() if n.startswith("mean 100,")),
            key=lambda c: c["max_abs"],
        )
        print(f"worst GN error on mean 100 / std 0.01 (batch 1): {worst['max_abs']:.1e} (limit {worst['limit']:.1e})")


if __name__ == "__main__":
    main()
