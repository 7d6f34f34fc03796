"""One ``.safetensors`` file per model: every tensor, plus metadata to rebuild it offline.

Metadata keys (all strings, JSON where structured):

``gnsurgeon.format``       checkpoint format version (this module's :data:`FORMAT_VERSION`)
``gnsurgeon.version``      the gnsurgeon that wrote it
``gnsurgeon.source``       :class:`~gnsurgeon.sources.SourceSpec` (library, name, kwargs)
``gnsurgeon.plan``         :class:`~gnsurgeon.plan.Plan` (one entry per normalization layer)
``gnsurgeon.data_config``  :class:`~gnsurgeon.sources.DataConfig` (input size, mean, std, task)
``gnsurgeon.history``      list of stages applied to the weights (convert, calibrate, finetune, ...)

Anyone can open the file with ``safetensors`` alone; :func:`load` rebuilds the architecture from the
source spec, replays the plan and loads the tensors, with no network access. Every key is checked
by one schema (:func:`gnsurgeon.metadata.parse_metadata`) before anything uses it, and :func:`save`
refuses a model that contradicts its plan (which ``load`` would otherwise rebuild as another model).

Stage: persistence, after any stage that changes weights. It imports: errors, files, layers,
metadata, models, plan, surgery (to replay the plan on load); stage runners (conversion, finetuning) import it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .errors import GNSurgeonError, first_line
from .files import check_output, write_atomically
from .layers import norm_kind
from .metadata import PREFIX, parse_metadata
from .models import DataConfig, SourceSpec, build_model, load_state_dict_strict
from .plan import Action, Plan
from .surgery import apply_plan, check_against_plan, module_paths, replace_module

FORMAT_VERSION = "1"
_PREFIX = PREFIX


@dataclass
class CheckpointInfo:
    """Everything in a checkpoint except the tensors."""

    path: Path
    source: SourceSpec | None
    plan: Plan
    data_config: DataConfig
    history: list = field(default_factory=list)
    format: str = FORMAT_VERSION
    written_by: str = ""

    @property
    def calibrated(self) -> bool:
        """Whether a conversion in this checkpoint's history calibrated GN against the BN original:
        such a start is close to its teacher already, and fine-tuning defaults to a lower lr."""
        return any(h.get("stage") == "convert" and h.get("calibration") for h in self.history)


def history_entry(stage: str, **fields) -> dict:
    """One record of what was done to the weights, for ``gnsurgeon.history``: the stage, the
    gnsurgeon that did it and when (UTC), then the stage's own fields in the order given."""
    return {
        "stage": stage,
        "gnsurgeon_version": __version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **fields,
    }


def save(
    path: str | Path,
    model: nn.Module,
    plan: Plan,
    *,
    source: SourceSpec | None,
    data_config: DataConfig | None = None,
    history: list | None = None,
) -> Path:
    """Write ``model``'s tensors and the metadata that rebuilds it into one ``.safetensors`` file.

    ``source=None`` is allowed for models built by hand; :func:`load` then needs the unconverted
    architecture passed as ``model=``. ``model`` must be what ``plan`` describes (every layer's
    action, channels, groups and eps), else nothing is written and the first contradicting layer is
    named: ``load`` rebuilds the architecture from the plan, not from the model.
    """
    from safetensors.torch import save_file

    path = check_output(path, ".safetensors")
    check_against_plan(model, plan)
    # Clone so no two entries share storage (safetensors refuses aliasing, e.g. tied weights).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {
        _PREFIX + "format": FORMAT_VERSION,
        _PREFIX + "version": __version__,
        _PREFIX + "source": json.dumps(source.to_dict() if source else None),
        _PREFIX + "plan": plan.to_json(),
        _PREFIX + "data_config": json.dumps((data_config or DataConfig()).to_dict()),
        _PREFIX + "history": json.dumps(history or []),
    }
    return write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    if not path.is_file():
        raise GNSurgeonError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as exc:  # safetensors' own error types: header too large, incomplete buffer...
        raise GNSurgeonError(
            f"checkpoint {path} is truncated or corrupt: not a valid safetensors file ({first_line(exc)})"
        ) from None


def is_checkpoint(path: str | Path) -> bool:
    """True for a readable ``.safetensors`` file written by gnsurgeon."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        return _PREFIX + "format" in _read_metadata(path)
    except GNSurgeonError:
        return False


def read_checkpoint(path: str | Path) -> CheckpointInfo:
    """Read a checkpoint's metadata (no tensors, no model), every key checked by the schema."""
    path = Path(path)
    meta = _read_metadata(path)
    if _PREFIX + "format" not in meta:
        raise GNSurgeonError(
            f"{path} is a safetensors file but is not a gnsurgeon checkpoint (no gnsurgeon metadata); to convert "
            "a weights file, name the architecture (timm:NAME or torchvision:NAME) and pass it with --weights"
        )
    data = parse_metadata(meta, path, FORMAT_VERSION)
    try:
        return CheckpointInfo(
            path=path,
            source=SourceSpec.from_dict(data["source"]) if data["source"] else None,
            plan=Plan.from_dict(data["plan"]),
            data_config=DataConfig.from_dict(data["data_config"]),
            history=data["history"],
            format=data["format"],
            written_by=data["version"],
        )
    except GNSurgeonError as exc:
        raise GNSurgeonError(f"checkpoint {path} has a bad {_PREFIX}plan: {exc}") from None


def _restore_frozen_kinds(model: nn.Module, plan: Plan) -> nn.Module:
    """Kept FrozenBatchNorm2d layers come back as BatchNorm2d when torchvision builds without
    weights; swap them back so the rebuilt model behaves like the one that was saved."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    by_path, _ = module_paths(model)
    for lp in plan:
        if lp.action != Action.KEEP or lp.kind != "FrozenBatchNorm2d":
            continue
        module = by_path.get(lp.path)
        if module is not None and getattr(norm_kind(module), "name", None) == "BatchNorm2d":
            replace_module(model, lp.path, FrozenBatchNorm2d(lp.channels, eps=lp.eps))
    return model


def load(path: str | Path, *, model: nn.Module | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by gnsurgeon, in eval mode, with no network access.

    ``model`` is the unconverted architecture, needed only for checkpoints saved with
    ``source=None``; it is not modified.
    """
    from safetensors.torch import load_file

    info = read_checkpoint(path)
    if model is None:
        if info.source is None:
            raise GNSurgeonError(
                f"checkpoint {path} records no source model (saved with source=None); from Python, pass the "
                "unconverted architecture as model= to gnsurgeon.load, export_onnx or verify_onnx"
            )
        base = build_model(info.source, pretrained=False)
        rebuilt = apply_plan(base, info.plan, inplace=True)
    else:
        rebuilt = apply_plan(model, info.plan)
    rebuilt = _restore_frozen_kinds(rebuilt, info.plan)
    check_against_plan(rebuilt, info.plan, f"the model rebuilt from {path}")
    try:
        state = load_file(str(path))
    except Exception as exc:  # a header that reads but tensors cut short
        raise GNSurgeonError(f"checkpoint {path} is truncated or corrupt ({first_line(exc)})") from None
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        rebuilt = rebuilt.to(dtypes.pop())
    load_state_dict_strict(rebuilt, state, f"checkpoint {path}")
    return rebuilt.to(device).eval()
