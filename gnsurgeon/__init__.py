"""gnsurgeon: BatchNorm -> GroupNorm (or frozen BN*) surgery on timm/torchvision models, verified."""

__version__ = "0.1.0"

from .calibration import CalibrationOptions, CalibrationReport, calibrate  # noqa: E402
from .checkpoint import load, read_checkpoint, save  # noqa: E402
from .conversion import ConvertOptions, ConvertReport, convert_source, inspect_source  # noqa: E402
from .errors import GNSurgeonError, VerificationError  # noqa: E402
from .finetune import FinetuneOptions, FinetuneReport, NonFiniteLossError, finetune  # noqa: E402
from .onnx_export import ExportOptions, ExportReport, export_onnx  # noqa: E402
from .onnx_verify import VerifyOptions, VerifyReport, verify_onnx  # noqa: E402
from .pipeline import RunReport, run_recipe  # noqa: E402
from .plan import GroupPolicy, LayerPlan, Plan, Selection  # noqa: E402
from .sources import DataConfig, SourceSpec, build_model  # noqa: E402
from .surgery import apply_plan, convert, make_plan  # noqa: E402

__all__ = [
    "CalibrationOptions",
    "CalibrationReport",
    "RunReport",
    "calibrate",
    "run_recipe",
    "ConvertOptions",
    "ConvertReport",
    "DataConfig",
    "FinetuneOptions",
    "FinetuneReport",
    "GNSurgeonError",
    "GroupPolicy",
    "LayerPlan",
    "NonFiniteLossError",
    "Plan",
    "Selection",
    "SourceSpec",
    "VerificationError",
    "VerifyOptions",
    "VerifyReport",
    "ExportOptions",
    "ExportReport",
    "export_onnx",
    "verify_onnx",
    "__version__",
    "apply_plan",
    "build_model",
    "convert",
    "convert_source",
    "finetune",
    "inspect_source",
    "load",
    "make_plan",
    "read_checkpoint",
    "save",
]
