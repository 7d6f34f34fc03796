"""Gradient norms of the fine-tune's loss on calibrated checkpoints: why ``finetune`` clips at 5.

    .venv/bin/python benchmarks/grad_norms.py [--data bench-data] [--batches 10]

For each default calibrated regions checkpoint that ``fidelity.py`` wrote (resnet18 and
mobilenetv3_small_100, G=32 and 16 channels per group), ``--batches`` batches of 8 training crops
(every other one flipped) go through the student in training mode. Each batch's loss is
cross-entropy plus the KL to the BN teacher, the fine-tune's loss with labels. The script prints
the L2 norm of the whole gradient for each batch, and the largest. GN on a handful of values per
group (MobileNetV3's last 2×2 maps at 64×64) divides by a small standard deviation, and it shows
here as batches with norms 10-30× the usual.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import photos
import torch
import torch.nn.functional as F
from fidelity import ARCHS, POLICIES, checkpoint_path, open_bench

import gnsurgeon


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="bench-data", type=Path)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench = open_bench("regions", args.data)
    x, y = photos.load_tensors(bench.train, bench.config)
    print("| model | policy | gradient norm per batch (CE + KD, batch 8) | largest |")
    print("|---|---|---|---:|")
    for arch in ARCHS:
        _, teacher = bench.teacher(arch)
        for policy in POLICIES:
            path = checkpoint_path(bench, arch, policy)
            if not path.exists():
                raise SystemExit(f"{path} is missing: run benchmarks/fidelity.py --benchmarks regions first")
            student = gnsurgeon.load(path).train()
            gen = torch.Generator().manual_seed(0)
            norms = []
            for i in range(args.batches):
                idx = torch.randint(0, len(x), (8,), generator=gen)
                batch = x[idx].flip(-1) if i % 2 else x[idx]
                with torch.no_grad():
                    target = F.softmax(teacher(batch), 1)
                out = student(batch)
                loss = F.cross_entropy(out, y[idx]) + F.kl_div(F.log_softmax(out, 1), target, reduction="batchmean")
                student.zero_grad()
                loss.backward()
                grads = [p.grad.pow(2).sum() for p in student.parameters() if p.grad is not None]
                norms.append(float(torch.stack(grads).sum().sqrt()))
            row = ", ".join(f"{n:.2f}" for n in norms)
            print(f"| {arch} | {policy} | {row} | {max(norms):.2f} |", flush=True)


if __name__ == "__main__":
    main()
