"""onnxruntime latency of GN models against their BN originals (BN folded), every GN lowering, in one run.

    .venv/bin/python benchmarks/onnx_latency.py [--rounds 6] [--threads 1,2] [--batches 1,8]
        [--models resnet18,resnet50,mobilenetv3_large_100] [--no-profile] [--no-centring] [--no-end-to-end]
        [--no-method]

For each model (timm, random init, BN statistics randomised as a trained model's would be; GN
converted from it with G = 32): the BN model exported with every BN folded into its conv, and the GN
model exported in every lowering (:mod:`gnsurgeon.onnx_lowering`: decomposed, layernorm, native).
Each GN export is verified once, per layer, on verification's stress inputs: the "stress check"
column. The "floor" row is not GN: each GN of the decomposed graph replaced by one elementwise node
outside NCHWc (:func:`floor_graph`), a lower bound on any GN while onnxruntime has no NCHWc kernel
for it. ``auto`` is run at each thread count as ``export-onnx`` runs it (the one-GN probe, then the
model's passing forms timed at batch 1); its pick is the default.

Latency: for each thread count and batch (224x224, CPU), all graphs of one model are timed
round-robin in one process (each turn: one untimed run, two timed runs), medians over the rounds.
Every session stops its threads spinning when a run ends (``session.force_spinning_stop``): with
several sessions alive, default ones spin on after their run and slow the next session's, which
inflated the GN graphs' times at 2 threads until this round (the "timing method" table, resnet18,
compares the old way, the new one and each graph alone). Ratios GN / BN folded come from process
CPU time at 1 thread (other jobs on a shared machine stretch wall time, not CPU time) and from wall
time at more threads. Then resnet50's per-input stress errors in each lowering, onnxruntime's
profiled kernel time by operator (batch 1, every thread count) for the BN graph and the GN lowerings
of resnet50 and mobilenetv3_large_100; then what ``--center-groups`` buys the native op on
activations with a large per-group mean; then the end-to-end ``export_onnx`` time for a resnet50
checkpoint.
Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import copy
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
from gnsurgeon.onnx_export import center_groups, export_model, fold_for_export
from gnsurgeon.onnx_lowering import FORMS, LoweringChoice, choose_lowering, lower_group_norm, settle_by_timing
from gnsurgeon.onnx_verify import VerifyOptions, runtime_session, verify_model
from gnsurgeon.sources import DataConfig

MODELS = ["resnet18", "resnet50", "mobilenetv3_large_100"]
PROFILED = ["resnet50", "mobilenetv3_large_100"]
STRESS_MODEL = "resnet50"  # its per-input stress table is printed
METHOD_MODEL = "resnet18"  # its timing-method comparison is printed
OPSETS = {"decomposed": 18, "layernorm": 18, "native": 21}
PROFILED_OPS = [
    "Conv", "InstanceNormalization", "LayerNormalization", "GroupNormalization", "Reshape", "ReorderInput",
    "ReorderOutput", "Mul", "Add", "ReduceMean", "Sub", "Sqrt", "Div",
]  # fmt: skip
CONFIG = DataConfig(input_size=(3, 224, 224))


def session(path: Path, threads: int, profile: bool = False, stop_spinning: bool = True) -> ort.InferenceSession:
    """A CPU session at ``threads``; ``stop_spinning``: its workers stop spinning when a run ends, as
    ``runtime_session(..., timed=True)`` does, so that sessions timed in turn do not slow each other
    (see :func:`timing_method`)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.enable_profiling = profile
    if stop_spinning:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def samples_ms(runners: list, rounds: int, pause: float = 0.0) -> list[list[tuple[float, float]]]:
    """``(wall, process CPU)`` ms of every timed run of each runner, round-robin so that machine
    drift hits all alike. Each turn (after ``pause`` s) runs once untimed, then times two runs."""
    out: list[list[tuple[float, float]]] = [[] for _ in runners]
    for _ in range(rounds):
        for i, run in enumerate(runners):
            time.sleep(pause)
            run()
            for _ in range(2):
                start, start_cpu = time.perf_counter(), time.process_time()
                run()
                out[i].append(((time.perf_counter() - start) * 1e3, (time.process_time() - start_cpu) * 1e3))
    return out


def latencies_ms(runners: list, rounds: int) -> list[tuple[float, float]]:
    """Median ``(wall, process CPU)`` ms per run for each runner (:func:`samples_ms`)."""
    return [
        (statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs))
        for runs in samples_ms(runners, rounds)
    ]


def kernel_ms_by_op(path: Path, x: np.ndarray, threads: int, runs: int = 20) -> dict[str, float]:
    """onnxruntime's profiled kernel time per operator type, ms per run (after its graph optimizations).
    Per node the minimum over ``runs`` (contention only adds time), then summed by operator type."""
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


def _ops():
    import onnxscript

    def emit(op_type: str, *inputs, **attributes):
        out = getattr(onnxscript.opset18, op_type)(*inputs, **attributes)
        return out[0] if isinstance(out, (tuple, list)) else out

    return onnxscript.opset18, emit


def ln_affine_in_scale(input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    """Tried: LayerNormalization over (N, G, C/G, H·W) with γ/β as its broadcast scale and bias
    (shape (G, C/G, 1)): no separate affine node at all."""
    op, _ = _ops()
    n, c, h, w = input.shape
    x = op.Reshape(input, op.Constant(value_ints=[0, num_groups, c // num_groups, h * w]))
    shape = op.Constant(value_ints=[num_groups, c // num_groups, 1])
    y = op.LayerNormalization(x, op.Reshape(weight, shape), op.Reshape(bias, shape), axis=2, epsilon=eps)
    y = y[0] if isinstance(y, (tuple, list)) else y
    return op.Reshape(y, op.Constant(value_ints=[0, c, h, w]))


def ln_mul_add(input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    """Tried: the layernorm form with a Mul/Add affine instead of the depthwise 1x1 Conv."""
    op, emit = _ops()
    y = lower_group_norm(emit, input, list(input.shape), num_groups, eps, form="layernorm", static=True)
    shape = op.Constant(value_ints=[input.shape[1], 1, 1])
    return op.Add(op.Mul(y, op.Reshape(weight, shape)), op.Reshape(bias, shape))


def export_variant(model, x, translation, path: Path) -> None:
    program = torch.onnx.export(
        model, (torch.cat([x, x]),), dynamo=True, opset_version=18, dynamic_shapes=({0: torch.export.Dim("batch")},),
        input_names=["input"], custom_translation_table={torch.ops.aten.group_norm.default: translation}, verbose=False,
    )  # fmt: skip
    path.write_bytes(program.model_proto.SerializeToString())


VARIANTS = {"layernorm, γ/β in its scale": ln_affine_in_scale, "layernorm, Mul/Add affine": ln_mul_add}


FLOOR = "floor: one NCHW pass per GN"
ACTIVATIONS = {"Relu", "HardSwish", "HardSigmoid", "Sigmoid", "Clip", "LeakyRelu"}


def floor_graph(decomposed: Path, out: Path) -> None:
    """Not GN: a lower bound on what any GN costs in onnxruntime's CPU provider while onnxruntime
    has no NCHWc kernel for it. The ``decomposed`` graph with each GN, together with what its
    affine Conv fuses (a following activation, or residual Add [+ Relu]), replaced by ONE
    elementwise node that has no NCHWc kernel either: ``Neg(x)``, or ``Max(x, skip)`` where a
    residual Add is absorbed. A GN kernel outside NCHWc (a graph of standard ops, a custom op)
    pays the same layout round trip and at least this one pass, and more: the statistics need a
    read of ``x`` before the pass that normalises."""
    import onnx
    from onnx import helper

    model = onnx.load(str(decomposed))
    nodes = list(model.graph.node)
    consumers = defaultdict(list)
    for n in nodes:
        for name in n.input:
            consumers[name].append(n)
    drop, place, claimed = set(), {}, set()
    for i, n in enumerate(nodes[:-3]):
        if n.op_type != "Reshape" or nodes[i + 1].op_type != "InstanceNormalization":
            continue
        chain, x = nodes[i : i + 4], n.input[0]  # Reshape, InstanceNormalization, Reshape, affine
        after = consumers[chain[-1].output[0]]
        new = helper.make_node("Neg", [x], [chain[-1].output[0]])
        if len(after) == 1 and after[0].op_type in ACTIVATIONS:
            chain.append(after[0])
            new = helper.make_node("Neg", [x], [after[0].output[0]])
        elif len(after) == 1 and after[0].op_type == "Add" and id(after[0]) not in claimed:
            add = after[0]
            claimed.add(id(add))
            skip = next(t for t in add.input if t != chain[-1].output[0])
            chain.append(add)
            relu = consumers[add.output[0]]
            if len(relu) == 1 and relu[0].op_type == "Relu":
                chain.append(relu[0])
            new = helper.make_node("Max", [x, skip], [chain[-1].output[0]])
        drop.update(id(c) for c in chain)
        place[id(chain[-1])] = new
    kept = [place.get(id(n), n) for n in nodes if id(n) in place or id(n) not in drop]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    onnx.checker.check_model(model)
    out.write_bytes(model.SerializeToString())


def reorders(path: Path) -> str:
    """The ReorderOutput and ReorderInput node counts ("a / b") in onnxruntime's optimised graph of
    ``path``: the NCHWc layout round trips it inserted. The floor graph must have no more than the
    GN graphs, or it would not be a lower bound."""
    import onnx

    optimised = path.with_suffix(".optimised.onnx")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimised)
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(optimised)).graph.node]
    optimised.unlink()
    return f"{ops.count('ReorderOutput')} / {ops.count('ReorderInput')}"


def stress_verdict(report) -> str:
    """The per-layer verdict in a few words: how many GN layers pass every stress input."""
    layers = report.layers
    bad = [r for r in layers if not r["ok"]]
    if not bad:
        return f"pass {len(layers)}/{len(layers)}"
    nan = sum(any(c.get("max_abs") is None for c in r.get("cases", {}).values()) for r in bad)
    return f"FAIL {len(bad)}/{len(layers)}" + (f" (NaN in {nan})" if nan else "")


def stress_table(name: str, reports: dict) -> None:
    """Per input, the worst GN layer's error in each lowering (onnxruntime vs PyTorch), and the
    whole-model check on random inputs."""
    forms = list(reports)
    print(f"\nPer-layer stress results, {name} ({len(reports[forms[0]].layers)} GN layers, worst over layers):\n")
    print("| input | " + " | ".join(forms) + " |")
    print("|---|" + "---:|" * len(forms))
    names = list(reports[forms[0]].layers[0]["cases"])
    for case in names:
        cells = []
        for form in forms:
            rows = [r["cases"][case] for r in reports[form].layers if case in r.get("cases", {})]
            nan = sum(c.get("max_abs") is None for c in rows)
            over = sum(not c["ok"] for c in rows)
            finite = [c["max_abs"] for c in rows if c.get("max_abs") is not None]
            cell = f"{max(finite):.1e}" if finite else ""
            cell += f"{', ' if cell else ''}NaN in {nan}/{len(rows)}" if nan else ""
            cell += f"; {over}/{len(rows)} over limit" if over > nan else ""
            cells.append(cell)
        print(f"| {case} | " + " | ".join(cells) + " |")
    cells = [" / ".join(f"{r['max_rel']:.1e}" for r in reports[f].model_checks) for f in forms]
    print("| whole model, random, batch 1 / 3 (max rel) | " + " | ".join(cells) + " |")


def export_all(name: str, tmp: Path, variants: bool) -> tuple[dict[str, Path], dict[str, str], dict]:
    """The BN-folded and every GN export of ``name``, each GN export's stress verdict and report;
    with ``variants`` also the two forms tried and not kept (profiled only)."""
    x = torch.randn(1, 3, 224, 224)
    bn = with_trained_statistics(timm.create_model(name)).eval()
    gn = gnsurgeon.convert(bn).eval()
    folded, _ = fold_for_export(bn, x)
    files = {"BN folded": tmp / f"{name}-bn.onnx"}
    files["BN folded"].write_bytes(export_model(folded, x).SerializeToString())
    verdicts, reports = {}, {}
    for form in FORMS:
        proto = export_model(gn, x, opset=OPSETS[form], gn_op=form)
        files[form] = tmp / f"{name}-{form}.onnx"
        files[form].write_bytes(proto.SerializeToString())
        reports[form] = verify_model(proto, gn, CONFIG, VerifyOptions(threads=1))
        verdicts[form] = stress_verdict(reports[form])
    files[FLOOR] = tmp / f"{name}-floor.onnx"
    floor_graph(files["decomposed"], files[FLOOR])
    if variants:
        for label, translation in VARIANTS.items():
            files[label] = tmp / f"{name}-{label.replace(' ', '_').replace('/', '')}.onnx"
            export_variant(gn, x, translation, files[label])
    return files, verdicts, reports


def time_model(files: dict[str, Path], threads: list[int], batches: list[int], rounds: int) -> dict:
    """``{(batch, threads): {graph: (wall ms, cpu ms)}}``, every graph of one model interleaved."""
    out = {}
    for t in threads:
        sessions = {k: session(p, t) for k, p in files.items() if k not in VARIANTS}
        for b in batches:
            feed = {"input": np.random.default_rng(b).standard_normal((b, 3, 224, 224)).astype(np.float32)}
            runners = [lambda s=s, feed=feed: s.run(None, feed) for s in sessions.values()]
            turns = rounds if b == 1 else max(2, rounds // 2)
            out[(b, t)] = dict(zip(sessions, latencies_ms(runners, turns), strict=True))
        del sessions
    return out


def auto_on_model(name: str, probe: LoweringChoice, files: dict[str, Path], threads: int) -> str:
    """What ``export-onnx --gn-op auto`` writes for this model at ``threads``: the forms that passed
    the probe, timed on the model's own files at batch 1 (:func:`settle_by_timing`, as export does)."""
    choice = copy.deepcopy(probe)
    passing = [c.form for c in choice.candidates if c.passed]
    sessions = {form: runtime_session(str(files[form]), threads, timed=True) for form in passing}
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    form = settle_by_timing(choice, sessions, x) if len(sessions) > 1 else choice.form
    print(f"- auto on {name} at {threads} thread(s): {choice.reason}", flush=True)
    return form


def print_latency(results: dict, verdicts: dict, defaults: dict, threads: list, batches: list) -> None:
    conditions = [(b, t) for b in batches for t in threads]
    head = " | ".join(f"b{b} {t}t ms | / BN" for b, t in conditions)
    print(f"| model | ONNX graph | stress check (per GN layer) | {head} |")
    print("|---|---|---|" + "---:|---:|" * len(conditions))
    for name, timings in results.items():
        for graph in ["BN folded", *FORMS, FLOOR]:
            marks = [f"{t}t" for t in threads if defaults[name][t] == graph]
            label = graph if graph in ("BN folded", FLOOR) else f"GN {graph}"
            label += f" (default at {', '.join(marks)})" if marks else ""
            cells = []
            for b, t in conditions:
                k = 1 if t == 1 else 0  # CPU time at 1 thread, wall time with more
                value, base = timings[(b, t)][graph], timings[(b, t)]["BN folded"]
                cells.append(f"{value[0]:.1f} / {value[1]:.1f} | {value[k] / base[k]:.2f}")
            print(f"| {name} | {label} | {verdicts[name].get(graph, '-')} | " + " | ".join(cells) + " |")


def print_profiles(profiles: dict) -> None:
    print("\nonnxruntime kernel time by operator, ms per batch-1 run (after its graph optimizations; per node the")
    print("minimum of 20 runs):\n")
    for (name, t), by_graph in profiles.items():
        graphs = list(by_graph)
        print(f"| {name}, {t} thread(s) | " + " | ".join(graphs) + " |")
        print("|---|" + "---:|" * len(graphs))
        ops = [op for op in PROFILED_OPS if any(by_graph[g].get(op) for g in graphs)]
        for op in [*ops, "other", "total"]:
            cells = []
            for g in graphs:
                listed = sum(v for o, v in by_graph[g].items() if o in PROFILED_OPS)
                total = sum(by_graph[g].values())
                value = total if op == "total" else total - listed if op == "other" else by_graph[g].get(op, 0.0)
                cells.append(f"{value:.2f}")
            print(f"| {op} | " + " | ".join(cells) + " |")
        print()


def centring_demo(tmp: Path) -> None:
    """resnet18-GN whose GN inputs carry a per-channel offset (conv bias + 100·N(0, 1)): the native op
    with and without --center-groups, worst over layers, on the real activations and on the stress
    inputs (which centring cannot change: they are fed to the GN directly)."""
    torch.manual_seed(0)
    gn = gnsurgeon.convert(with_trained_statistics(timm.create_model("resnet18"))).eval()
    with torch.no_grad():
        for m in gn.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.bias = torch.nn.Parameter(100 * torch.randn(m.out_channels))
    x = torch.randn(1, 3, 224, 224)
    centred, rows = center_groups(gn, torch.randn(4, 3, 224, 224))
    print("\n`--center-groups` and the native GroupNormalization on resnet18-GN with conv biases 100·N(0, 1)")
    print(f"(centred {sum(r['action'] == 'centred' for r in rows)} of {len(rows)} GN layers):\n")
    print("| model | GN as | worst κ, activations | worst max abs, activations | activation checks | stress check |")
    print("|---|---|---:|---:|---|---|")
    for label, model in (("as is", gn), ("centred", centred)):
        for form in ("native", "layernorm", "decomposed"):
            proto = export_model(model, x, opset=OPSETS[form], gn_op=form)
            report = verify_model(proto, model, CONFIG, VerifyOptions(threads=1))
            acts = [c for r in report.layers for n, c in r["cases"].items() if n.startswith("activation")]
            errs = [c.get("max_abs") for c in acts]
            worst = "NaN" if None in errs else f"{max(errs):.1e}"
            ok = sum(c["ok"] for c in acts)
            stress = sum(
                all(c["ok"] for n, c in r["cases"].items() if not n.startswith("activation")) for r in report.layers
            )
            print(
                f"| resnet18 | {form}, {label} | {max(c['kappa'] for c in acts):.3g} | {worst} | {ok}/{len(acts)} pass "
                f"| {stress}/{len(report.layers)} layers pass |"
            )


def end_to_end(tmp: Path) -> None:
    checkpoint = tmp / "resnet50-gn.safetensors"
    gnsurgeon.convert_source("timm:resnet50", checkpoint, gnsurgeon.ConvertOptions(probe=False))
    start = time.perf_counter()
    report = gnsurgeon.export_onnx(str(checkpoint), tmp / "resnet50-gn-e2e.onnx")
    total = time.perf_counter() - start
    steps = ", ".join(f"{k} {v:.1f}" for k, v in report.timings.items())
    print(
        f"\n`gnsurgeon export-onnx` resnet50 checkpoint, defaults, end to end: {total:.1f} s ({steps}); GN as "
        f"{report.graph.gn_op}; verification {'passed' if report.ok else 'FAILED'}: "
        f"{len(report.verification.layers)} GN layers"
    )


TIMING_GRAPHS = ["BN folded", "decomposed", "layernorm"]


def timing_method(name: str, files: dict[str, Path], threads: int, rounds: int) -> None:
    """The same graphs at ``threads``, batch 1, timed three ways: round-robin with the session
    defaults and a 10 ms pause per turn (how this benchmark and ``auto`` timed until this round),
    round-robin with ``session.force_spinning_stop`` (how they time now), and each graph alone (one
    session alive, a block of runs: what a deployed model sees). Default sessions keep their workers
    spinning after a run, and with several sessions alive those spin on the cores the next session
    runs on."""
    x = {"input": np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    rows: dict[str, list[list[float]]] = {}
    for label, stop, pause in (("round-robin, default sessions, 10 ms pause", False, 0.01),
                               ("round-robin, force_spinning_stop", True, 0.0)):  # fmt: skip
        sessions = [session(files[g], threads, stop_spinning=stop) for g in TIMING_GRAPHS]
        runs = samples_ms([lambda s=s: s.run(None, x) for s in sessions], rounds, pause)
        rows[label] = [[w for w, _ in r] for r in runs]
        del sessions
    alone = []
    for g in TIMING_GRAPHS:
        s = session(files[g], threads, stop_spinning=False)
        samples_ms([lambda s=s: s.run(None, x)], 1)  # a warm-up turn
        runs = samples_ms([lambda s=s: s.run(None, x)], 3 * rounds)[0]
        alone.append([w for w, _ in runs])
        del s
    rows["each graph alone, default session, in a block of runs"] = alone
    print(f"\nTiming method, {name} at {threads} threads, batch 1: median (10th-90th percentile) ms per run\n")
    print("| method | " + " | ".join(f"{g} | / BN" if g != "BN folded" else g for g in TIMING_GRAPHS) + " |")
    print("|---|" + "---:|" * (2 * len(TIMING_GRAPHS) - 1))
    for label, per_graph in rows.items():
        base = statistics.median(per_graph[0])
        cells = []
        for i, runs in enumerate(per_graph):
            p10, med, p90 = np.percentile(runs, [10, 50, 90])
            cells.append(f"{med:.2f} ({p10:.2f}-{p90:.2f})" + ("" if i == 0 else f" | {med / base:.2f}"))
        print(f"| {label} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="round-robin rounds at batch 1 (half at larger batches)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-centring", action="store_true")
    parser.add_argument("--no-end-to-end", action="store_true")
    parser.add_argument("--no-method", action="store_true", help="skip the timing-method comparison (resnet18)")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    print(
        f"onnxruntime {ort.__version__}, torch {torch.__version__}, CPU ({os.cpu_count()} cores), 224x224, "
        f"onnxruntime default graph optimizations; load average at start {os.getloadavg()[0]:.1f}\n"
    )
    probes = {t: choose_lowering(FORMS, OPSETS, threads=t) for t in threads}
    for t, choice in probes.items():
        print(f"- auto's probe at {t} thread(s): {choice.reason}")
    tmp = Path(tempfile.mkdtemp(prefix="gnsurgeon-onnx-bench-"))
    results, verdicts, profiles, stress, defaults = {}, {}, {}, {}, {}
    method = None
    for name in args.models.split(","):
        files, verdicts[name], reports = export_all(name, tmp, not args.no_profile and name in PROFILED)
        defaults[name] = {t: auto_on_model(name, probes[t], files, t) for t in threads}
        counts = ", ".join(f"{g} {reorders(files[g])}" for g in ["BN folded", *FORMS, FLOOR])
        print(f"- {name}: NCHWc reorders in onnxruntime's optimised graph (ReorderOutput / ReorderInput): {counts}")
        if name == STRESS_MODEL:
            stress = reports
        results[name] = time_model(files, threads, batches, args.rounds)
        if not args.no_method and name == METHOD_MODEL and max(threads) > 1:
            method = (name, files, max(threads))
        if not args.no_profile and name in PROFILED:
            x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
            for t in threads:
                profiled = {g: p for g, p in files.items() if g not in ("native", FLOOR)}
                profiles[(name, t)] = {g: kernel_ms_by_op(p, x, t) for g, p in profiled.items()}
        print(f"- {name}: exported, verified and timed; load average {os.getloadavg()[0]:.1f}", flush=True)
    print("\nRatios GN / BN folded from CPU time at 1 thread, from wall time at 2. Cells: wall / CPU ms per run.\n")
    print_latency(results, verdicts, defaults, threads, batches)
    if method:
        timing_method(*method, args.rounds * 2)
    if stress:
        stress_table(STRESS_MODEL, stress)
    if profiles:
        print_profiles(profiles)
    if not args.no_centring:
        centring_demo(tmp)
    if not args.no_end_to_end:
        end_to_end(tmp)


if __name__ == "__main__":
    main()
