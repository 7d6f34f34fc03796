"""gnsurgeon: BatchNorm -> GroupNorm (or frozen BN*) surgery on timm/torchvision models, verified.

Every public name is loaded on first use (PEP 562): ``import gnsurgeon`` and ``gnsurgeon --help``
cost no torch, timm or onnx import; ``gnsurgeon.convert_source`` or ``from gnsurgeon import load``
import the stage that defines it then.

Stage: the package root. It imports: nothing at import time; each name's stage module on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_HOMES = {
    "CalibrationOptions": "calibration",
    "CalibrationReport": "calibration",
    "calibrate": "calibration",
    "load": "checkpoint",
    "read_checkpoint": "checkpoint",
    "save": "checkpoint",
    "ConvertOptions": "conversion",
    "ConvertReport": "conversion",
    "convert_source": "conversion",
    "inspect_source": "conversion",
    "GNSurgeonError": "errors",
    "VerificationError": "errors",
    "FinetuneOptions": "finetuning",
    "FinetuneReport": "finetuning",
    "NonFiniteLossError": "finetuning",
    "finetune": "finetuning",
    "ExportOptions": "onnx_export",
    "ExportReport": "onnx_export",
    "export_onnx": "onnx_export",
    "VerifyOptions": "onnx_verify",
    "VerifyReport": "onnx_verify",
    "verify_onnx": "onnx_verify",
    "RunReport": "pipeline",
    "run_recipe": "pipeline",
    "GroupPolicy": "plan",
    "LayerPlan": "plan",
    "Plan": "plan",
    "Selection": "plan",
    "DataConfig": "sources",
    "SourceOptions": "sources",
    "SourceSpec": "sources",
    "build_model": "sources",
    "apply_plan": "surgery",
    "convert": "surgery",
    "make_plan": "surgery",
    "ExportWeightsReport": "targets",
    "export_weights": "targets",
}

__all__ = ["__version__", *sorted(_HOMES)]


def __getattr__(name: str):
    """Import the stage that defines ``name``, then keep the value here so the next access is free."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
