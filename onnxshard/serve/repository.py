"""What a server serves, fixed at start-up: a plan folder, an ONNX model, or a repository folder holding one plan
or model per subfolder (each served under its folder name; a model as ``NAME/model.onnx``, Triton's
``NAME/1/model.onnx``, or the one ``.onnx`` file in ``NAME/``). ``NAME/serve.json`` may set that model's own
dynamic batching and replicas, as Triton's per-model config does: ``{"max_batch_size": 8, "max_queue_delay_ms":
2, "max_queue_size": 64, "micro_batch_size": "auto", "replicas": 2}``. Requests name models only from this list: no
name or path from a request ever reaches the filesystem."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from onnxshard.errors import PlanError
from onnxshard.plans import Plan, is_plan_dir

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
CONFIG = "serve.json"
PER_MODEL = ("max_batch_size", "max_queue_delay_ms", "max_queue_size", "micro_batch_size", "replicas")


@dataclass(frozen=True)
class Source:
    """One served model: its name, where it is (a plan folder or an ONNX file), and its stage workers."""

    name: str
    path: Path
    workers: int
    is_plan: bool
    overrides: dict = field(default_factory=dict)  # from NAME/serve.json: PER_MODEL keys


def discover(source: str | Path, *, stages: int | None = None) -> list[Source]:
    """The models under ``source``, by name. ``stages``: how a bare ONNX model is split (default 2)."""
    path = Path(source).expanduser()
    if is_plan_dir(path) or path.is_file():
        # a plan by its folder; a model by its file name, or its folder's when it is just model.onnx
        name = path.name if not path.is_file() else path.parent.name if path.stem == "model" else path.stem
        return [_one(_name(name, path), path, stages)]
    if not path.is_dir():
        raise PlanError(f"{path} is neither a plan folder, an ONNX model, nor a model repository folder")
    found = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        model = sub if is_plan_dir(sub) else _model_file(sub)
        if model is None:
            raise PlanError(f"repository {path}: {sub.name}/ holds no plan.json and no ONNX model; remove it or add "
                            "model.onnx (or a plan made with `onnxshard plan`)")
        found.append(_one(_name(sub.name, sub), model, stages, _overrides(sub / CONFIG)))
    if not found:
        raise PlanError(f"repository {path} holds no model folders (one subfolder per model: NAME/plan.json or "
                        "NAME/model.onnx)")
    return found


def _one(name: str, path: Path, stages: int | None, overrides: dict | None = None) -> Source:
    if is_plan_dir(path):
        return Source(name, path.resolve(), Plan.load(path).num_workers, True, overrides or {})
    if path.suffix != ".onnx":
        raise PlanError(f"{path} is not an ONNX model (.onnx) nor a plan folder")
    return Source(name, path.resolve(), 2 if stages is None else stages, False, overrides or {})


def _overrides(path: Path) -> dict:
    """A model's own settings (checked with the server's, by ServeArgs)."""
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PlanError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(values, dict) or set(values) - set(PER_MODEL):
        unknown = sorted(set(values) - set(PER_MODEL)) if isinstance(values, dict) else values
        raise PlanError(f"{path}: unknown settings {unknown}; a model may set {list(PER_MODEL)}")
    return values


def _model_file(folder: Path) -> Path | None:
    for candidate in (folder / "model.onnx", folder / "1" / "model.onnx"):
        if candidate.is_file():
            return candidate
    models = sorted(folder.glob("*.onnx"))
    if len(models) > 1:
        raise PlanError(f"{folder} holds {len(models)} ONNX files ({', '.join(m.name for m in models[:4])}); name "
                        "the one to serve model.onnx")
    return models[0] if models else None


def _name(name: str, path: Path) -> str:
    if not NAME.match(name):
        raise PlanError(f"{path}: {name!r} cannot be a model name (letters, digits, '_', '.', '-'; at most 128)")
    return name
