"""What a verification concluded, as data: each failure a typed record, and how far over its limit a
comparison came out.

Why types: a report that keeps its failures as sentences has to find the layer failures again by
matching the sentence (``startswith("layer ")``), and the first rewording breaks it silently. Here
the kind of failure is the class, the layer is a field, and the sentence is ``str(failure)``: the
same text the terminal and the JSON report show.

Stage: a leaf, like :mod:`gnsurgeon.errors`. It imports nothing (no torch, no onnx), so that
:mod:`gnsurgeon.report` renders verification results without loading either.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CheckerFailure", "LayerMismatch", "LayerNotFound", "ModelMismatch", "VerifyFailure", "error_ratio"]


@dataclass(frozen=True, kw_only=True)
class VerifyFailure:
    """One reason a verification failed; ``str()`` is the one-line sentence reports show."""

    reason: str

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True, kw_only=True)
class CheckerFailure(VerifyFailure):
    """``onnx.checker`` rejected the file."""

    def __str__(self) -> str:
        return f"onnx.checker rejects the model: {self.reason}"


@dataclass(frozen=True, kw_only=True)
class ModelMismatch(VerifyFailure):
    """The whole model's output on one input is off (or onnxruntime failed on it)."""

    input: str

    def __str__(self) -> str:
        return f"model output on {self.input}: {self.reason}"


@dataclass(frozen=True, kw_only=True)
class LayerMismatch(VerifyFailure):
    """One GN layer's subgraph is off: wrong G or eps in the graph, or outside its limit on an input."""

    layer: str

    def __str__(self) -> str:
        return f"layer {self.layer}: {self.reason}"


@dataclass(frozen=True, kw_only=True)
class LayerNotFound(LayerMismatch):
    """A GN layer PyTorch calls has no subgraph in the ONNX graph (or fewer than its calls)."""

    reason: str = "no GN subgraph found in the ONNX graph"


def error_ratio(result: dict) -> float:
    """How far over its limit one comparison (a ``compare`` result) is: max abs / limit, inf when
    the output was not finite or the limit is 0. Ranks results to show the worst."""
    if result.get("max_abs") is None:
        return float("inf")
    return result["max_abs"] / result["limit"] if result["limit"] > 0 else float("inf")
