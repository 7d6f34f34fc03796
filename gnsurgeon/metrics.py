"""Numbers that compare two models, written once: the distillation divergence and max errors.

Calibration's end-to-end pass and the fine-tune's KD loss minimise the same divergence; the fold
check and the ONNX verifier report the same max abs / relative error. One definition each, so a
"KL 0.15" or a "max rel 1e-6" means the same in every report.

Stage: a leaf utility. It imports only torch and numpy.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["kl_divergence", "max_errors"]


def kl_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the class distributions (dim 1) softened by ``temperature``, times T²
    (Hinton's KD: gradients keep their scale as T changes), averaged over the batch.

    Dense outputs ``(N, K, H, W)`` work as they are: dim 1 is the class dim, and ``batchmean`` then
    sums over pixels, so per-pixel divergences add up.
    """
    t = temperature
    log_p = F.log_softmax(student / t, 1)
    log_q = F.log_softmax(teacher / t, 1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * (t * t)


def max_errors(reference, output) -> dict[str, float]:
    """``{"max_abs", "max_rel"}`` of ``output`` against ``reference`` (tensors or arrays), in float64;
    max_rel = max |Δ| / max |reference| (max |Δ| itself when the reference is all zeros)."""
    ref = np.asarray(reference.detach().double().cpu() if isinstance(reference, torch.Tensor) else reference, "f8")
    out = np.asarray(output.detach().double().cpu() if isinstance(output, torch.Tensor) else output, "f8")
    if ref.size == 0:
        return {"max_abs": 0.0, "max_rel": 0.0}
    diff = float(np.abs(ref - out).max())
    scale = float(np.abs(ref).max())
    return {"max_abs": diff, "max_rel": diff / scale if scale > 0 else diff}
