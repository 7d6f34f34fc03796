"""One calibration configuration on a photo benchmark, everything printed: for the README's ablations.

    .venv/bin/python benchmarks/calibration_study.py [--bench regions] [--arch resnet18] [--policy G=32]
        [--opts '{"seed": 1}'] [--split train|iid] [--max-frozen 10%] [--freeze 'blocks.0.*' ...]
        [--data bench-data]

``fidelity.py`` runs the command a user runs (``convert --calibrate``) over every benchmark, arch and
policy; this script calls :func:`gnsurgeon.calibration.calibrate` once, with any
``CalibrationOptions`` field set (``--opts`` JSON, e.g. the seed, copies, photometric) and on either
the training crops (the default, as ``convert`` would be pointed at) or the ``iid`` crops, which
the teacher never trained on (``--split iid``: are the held-out images that keep or undo a pass the
problem because the teacher memorised them?). ``--max-frozen`` keeps as BN* the earliest layers GN
measurably fails, as ``convert --max-frozen`` does (``--rank fit``: the worst-fitting ones instead,
the former rule); ``--freeze`` keeps the layers it names as BN* by hand (is
the measure choosing the right layers?). Prints one JSON line (top-1 on the shifted crops, top-1
agreement with the teacher on calibration-like and shifted crops, the held-out scores before and
after) and the seconds per phase. The teachers are the ones ``fidelity.py`` trained and cached.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import photos
import torch
from fidelity import POLICIES

import gnsurgeon
from gnsurgeon.calibration import CalibrationOptions, calibrate, measure_gn_fit
from gnsurgeon.conversion import FROZEN_FLOOR
from gnsurgeon.plan import FROZEN_RANKS, Selection, freeze_where_gn_fails, frozen_budget


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", default="regions", choices=sorted(photos.BENCHMARKS))
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--policy", default="G=32", choices=list(POLICIES))
    parser.add_argument("--opts", default="{}", help="CalibrationOptions fields, as JSON")
    parser.add_argument("--split", default="train", choices=("train", "iid"), help="the images calibrated on")
    parser.add_argument(
        "--max-frozen", default="0", help="layers kept as BN* where GN measurably fails, earliest first: N or P%%"
    )
    parser.add_argument(
        "--rank",
        default="position",
        choices=FROZEN_RANKS,
        help="which failing layers --max-frozen keeps: the earliest (convert's rule) or the worst own fit",
    )
    parser.add_argument("--freeze", nargs="*", default=[], help="layers kept as BN* by name (globs)")
    parser.add_argument("--data", default="bench-data", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench = photos.BENCHMARKS[args.bench]
    root = args.data / "photos"
    folders = photos.write_photos(root, bench)
    teacher = photos.load_teacher(args.arch, root, bench)
    x_val, y_val = photos.load_tensors(folders["val"], bench.config)
    x_iid, y_iid = photos.load_tensors(folders["iid"], bench.config)
    policy = gnsurgeon.GroupPolicy(**{"groups": None, **POLICIES[args.policy]})
    plan = gnsurgeon.make_plan(teacher, policy, Selection(freeze=tuple(args.freeze)))
    overrides = json.loads(args.opts)
    options = CalibrationOptions(data=str(folders[args.split]), **overrides)
    budget = frozen_budget(args.max_frozen, len(plan.with_action("gn")))
    if budget:
        errors = measure_gn_fit(teacher, plan, bench.config, options)
        plan = freeze_where_gn_fails(plan, errors, budget, FROZEN_FLOOR, rank=args.rank)
        print("kept as BN*:", [(lp.path, round(errors[lp.path], 3)) for lp in plan.with_action("frozen")])
    student = gnsurgeon.apply_plan(teacher, plan).eval()
    start = time.perf_counter()
    calibrated, report = calibrate(teacher, student, plan, bench.config, options)
    seconds = time.perf_counter() - start
    teacher_top1 = photos.top1(teacher, x_val, y_val)
    result = {
        "bench": args.bench,
        "arch": args.arch,
        "policy": args.policy,
        "split": args.split,
        "opts": overrides,
        "max_frozen": args.max_frozen,
        "freeze": args.freeze,
        "rank": args.rank,
        "frozen": len(plan.with_action("frozen")),
        "teacher_val": teacher_top1,
        "copy_val": photos.top1(student, x_val, y_val),
        "calibrated_val": photos.top1(calibrated, x_val, y_val),
        "calibrated_iid": photos.top1(calibrated, x_iid, y_iid),
        "agree_iid": photos.agreement(calibrated, teacher, x_iid),
        "agree_val": photos.agreement(calibrated, teacher, x_val),
        "holdout_before": report.before,
        "holdout_after": report.after,
        "seconds": round(seconds),
    }
    result["ratio"] = result["calibrated_val"] / teacher_top1
    print(json.dumps(result))
    print("phases (s):", json.dumps({k: round(v) for k, v in report.phases.items()}))


if __name__ == "__main__":
    main()
