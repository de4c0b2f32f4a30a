"""The plan: what a partitioned model is, as frozen data that round-trips through ``plan.json`` (its stages and
tensor specs are in :mod:`onnxshard.plan_parts`, re-exported here).

A plan folder holds ``plan.json``, one ONNX file per stage and (unless the plan references the model's own
folder) a ``weights/`` folder. Loading a plan parses JSON only, never pickle, and refuses any path that leaves
the plan folder or the model folder it names.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

from onnxshard.digests import FULL_CHECK_BYTES, sample_digest, sha256_file
from onnxshard.errors import PlanError
from onnxshard.kv_pairs import KvPair
from onnxshard.plan_parts import (
    NON_TENSOR,
    Dim,
    Reduce,
    Stage,
    Step,
    TensorSpec,
    is_batch_name,
    shares,
    spec_bytes,
    specs_from_json,
    starts,
    unsized,
)
from onnxshard.units import human_bytes

__all__ = ["NON_TENSOR", "PLAN_FILE", "Dim", "Plan", "Reduce", "Stage", "Step", "TensorSpec", "Weights",
           "contained", "is_batch_name", "is_plan_dir", "read_plan_json", "shares", "spec_bytes", "starts"]

FORMAT = "onnxshard.plan"
# 2 added tensor-parallel stages (``steps``); 3 added weight digests, which every plan must now carry
VERSION = 3
READS = (3,)
PLAN_FILE = "plan.json"

@dataclass(frozen=True)
class Weights:
    """Where the stages' external weights live.

    ``mode`` is ``link`` (hard links to the model's weight files in ``weights/``: no bytes copied), ``copy``
    (a self-contained per-stage copy in ``weights/``), ``external`` (the model's own folder, ``dir`` absolute;
    used when hard links are impossible) or ``none`` (all weights inline in the stage files).
    ``files`` maps each weight file, relative to ``dir``, to its size in bytes; ``sample`` to its
    :func:`sample_digest` (checked at every load) and ``sha256`` to the digest of all its bytes (files up to
    ``FULL_CHECK_BYTES``, and every file of a plan made with ``hash_weights``), recorded when the plan is saved.
    """

    mode: str = "none"
    dir: str = "weights"
    files: dict[str, int] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)
    sample: dict[str, str] = field(default_factory=dict)

    def folder(self, root: Path | None) -> Path | None:
        """The folder ``files`` are relative to (``None`` without weight files)."""
        if self.mode == "none":
            return None
        if self.mode == "external":
            wdir = Path(self.dir)
            if not wdir.is_absolute():
                raise PlanError(f"external weights folder {wdir} must be absolute in plan.json")
            return wdir
        if self.mode in ("link", "copy"):
            return root
        raise PlanError(f"plan in {root} has unknown weights mode {self.mode!r}")


@dataclass(frozen=True)
class Plan:
    """A partitioned model. ``root`` is the folder it was saved to or loaded from (not serialised)."""

    model: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    stages: tuple[Stage, ...]
    weights: Weights = Weights()
    cost_source: str = "analytic"
    root: Path | None = field(default=None, compare=False)
    # per symbolic input dim, the nodes whose result for one sample depends on the others along it (see
    # partitioner.coupling): cutting or joining batches along that dim changes their results
    batch_coupled: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # a decoder's cache pairs (empty for other models): each stage worker keeps its own layers' cache when generating
    kv_cache: tuple[KvPair, ...] = ()
    # where the plan was read from when that is a URI (``s3://bucket/plan``; see plan_store): what workers are given
    uri: str | None = field(default=None, compare=False)
    # each symbolic dim of the inputs and the size the analytic costs used for it (``None``: not given, counted 1)
    cost_dims: dict[str, int | None] = field(default_factory=dict)
    # copies of the stages a Pipeline runs by default (``plan(workers=W)`` chose them)
    replicas: int = 1

    @property
    def unsized_dims(self) -> list[str]:
        """Symbolic dims other than the batch that the analytic costs counted as 1 (no size given: ``dims=`` or
        ``example_inputs=``). Costs are per sample, so the batch is never sized."""
        return unsized(self.cost_dims) if self.cost_source == "analytic" else []

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_workers(self) -> int:
        """Workers one replica needs: one per stage, T per tensor-parallel stage."""
        return sum(s.tensor_parallel for s in self.stages)

    def stage_path(self, stage: Stage | int) -> Path:
        stage = self.stages[stage] if isinstance(stage, int) else stage
        if self.root is None:
            raise PlanError("this plan has not been saved; call plan.save(dir) or onnxshard.load_plan(dir) first")
        return self.root / stage.file

    @property
    def location(self) -> str:
        """What a stage worker is given to find the plan: its URI, else its folder."""
        if self.uri is None and self.root is None:
            raise PlanError("this plan has not been saved; call plan.save(dir) or onnxshard.load_plan(dir) first")
        return self.uri or str(self.root)

    def weights_dir(self) -> Path | None:
        """The folder ONNX Runtime must resolve external-data locations against, or ``None`` for the stage's own."""
        return Path(self.weights.dir) if self.weights.mode == "external" else None

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "model": self.model,
            "cost_source": self.cost_source,
            "inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs],
            "weights": asdict(self.weights), "stages": [s.to_json() for s in self.stages],
            "batch_coupled": {dim: list(notes) for dim, notes in self.batch_coupled.items()},
            "kv_cache": [pair.to_json() for pair in self.kv_cache],
            "cost_dims": dict(self.cost_dims),
            "replicas": self.replicas,
        }

    def save(self, directory: str | os.PathLike, *, hash_weights: bool = False) -> Plan:
        """Write ``plan.json`` into ``directory`` (where the stage files already are) and return the bound plan.
        Records each stage file's sha256 and each weight file's :func:`sample_digest`; the sha256 of every byte
        for weight files up to ``FULL_CHECK_BYTES`` (the same work) and, with ``hash_weights``, for all of them
        (reads every weight byte once: seconds per GB)."""
        root = Path(directory)
        stages = tuple(
            replace(s, steps=tuple(replace(st, sha256=tuple(sha256_file(root / f) for f in st.files)) for st in s.steps))
            if s.steps else replace(s, sha256=sha256_file(root / s.file)) for s in self.stages)
        wdir = self.weights.folder(root)
        paths = {name: contained(wdir, name, what="weight file") for name in self.weights.files}
        sample = {n: sample_digest(p) for n, p in paths.items()}
        sha256 = {n: sample[n] if p.stat().st_size <= FULL_CHECK_BYTES else sha256_file(p) for n, p in paths.items()
                  if hash_weights or p.stat().st_size <= FULL_CHECK_BYTES}
        bound = replace(self, stages=stages, weights=replace(self.weights, sha256=sha256, sample=sample), root=root)
        tmp = root / (PLAN_FILE + ".tmp")
        tmp.write_text(json.dumps(bound.to_json(), indent=1))
        tmp.replace(root / PLAN_FILE)
        return bound

    @classmethod
    def load(cls, directory: str | os.PathLike, *, full_check: bool = False) -> Plan:
        """Read and check a plan folder: format, paths, wiring, stage file hashes, and weight files (size and
        sampled digest; every byte with ``full_check``)."""
        root = Path(directory)
        plan = cls.from_json(read_plan_json(root), root)
        plan.check_files(full=full_check)
        return plan

    @classmethod
    def from_json(cls, d: dict, root: Path | None = None) -> Plan:
        """A plan from parsed ``plan.json`` (format and version checked; files are not looked at)."""
        path = (root or Path(".")) / PLAN_FILE
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise PlanError(f"{path} is not an onnxshard plan (format {d.get('format') if isinstance(d, dict) else d!r})")
        if d.get("version") not in READS:
            raise PlanError(f"{path} has plan version {d.get('version')}, this onnxshard reads version(s) "
                            f"{', '.join(map(str, READS))}; re-run `onnxshard plan`")
        try:
            if not all(isinstance(d.get(k), list) for k in ("inputs", "outputs", "stages")):
                raise TypeError("'inputs', 'outputs' and 'stages' must be lists")
            weights = d.get("weights", {})
            if not isinstance(weights, dict) or not all(isinstance(weights.get(k, {}), dict)
                                                        for k in ("files", "sha256", "sample")):
                raise TypeError("'weights' must be an object whose files, sha256 and sample are objects")
            return cls(
                model=str(d["model"]), cost_source=str(d.get("cost_source", "analytic")),
                inputs=specs_from_json(d["inputs"]),
                outputs=specs_from_json(d["outputs"]),
                stages=tuple(Stage.from_json(s) for s in d["stages"]),
                weights=Weights(**weights), root=root,
                batch_coupled={str(dim): tuple(map(str, notes)) for dim, notes in d.get("batch_coupled", {}).items()},
                kv_cache=tuple(KvPair.from_json(pair) for pair in d.get("kv_cache", ())),
                cost_dims={str(k): None if v is None else int(v) for k, v in d.get("cost_dims", {}).items()},
                replicas=int(d.get("replicas", 1)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlanError(f"{path} is malformed ({type(e).__name__}: {e}); re-run `onnxshard plan`") from e

    def check_files(self, *, full: bool = False, stages: set[int] | None = None,
                    weight_files: set[str] | None = None) -> None:
        """Raise :class:`PlanError` unless the stages connect and every stage and weight file is present, inside
        its folder and unaltered. Weight files are checked by size and :func:`sample_digest` (whole files up to
        ``FULL_CHECK_BYTES``); ``full`` hashes every byte. ``stages`` and ``weight_files``: check only those (a
        node's copy of one stage of a plan on object storage)."""
        if not self.stages:
            raise PlanError(f"plan in {self.root} has no stages")
        for i, stage in enumerate(self.stages):
            if stage.index != i:
                raise PlanError(f"plan in {self.root}: stage {i} is listed with index {stage.index}")
            if stage.tensor_parallel > 1 and not stage.steps:
                raise PlanError(f"plan in {self.root}: stage {i} has tensor_parallel={stage.tensor_parallel} but no steps")
            for name, digest in stage.files() if stages is None or i in stages else ():
                file = contained(self.root, name, what=f"stage {i} file")
                if not file.is_file():
                    raise PlanError(f"stage {i} file {file} is missing; re-run `onnxshard plan`")
                if not isinstance(digest, str) or len(digest) != 64:
                    raise PlanError(f"stage {i} file {name!r} has no sha256 in plan.json ({digest!r}); it cannot be "
                                    "checked: re-run `onnxshard plan`")
                if sha256_file(file) != digest:
                    raise PlanError(f"stage {i} file {file} was altered after planning (sha256 differs); "
                                    "re-run `onnxshard plan`")
        self.check_wiring()
        wdir = self.weights.folder(self.root)
        for name, size in self.weights.files.items():
            if weight_files is not None and name not in weight_files:
                continue
            file = contained(wdir, name, what="weight file")
            if not file.is_file():
                raise PlanError(f"weight file {file} is missing; restore it or re-plan with --copy-weights")
            if file.stat().st_size != size:
                raise PlanError(f"weight file {file} is {file.stat().st_size} bytes, the plan expects {size}; "
                                "it changed after planning: re-run `onnxshard plan`")
            want = (self.weights.sha256 if full else self.weights.sample).get(name)
            if full and name not in self.weights.sha256:
                raise PlanError(f"weight file {name!r} is over {human_bytes(FULL_CHECK_BYTES)} and the plan holds only "
                                "its sampled digest; re-plan with --hash-weights to record a digest of every byte")
            if not isinstance(want, str) or len(want) != 64:
                raise PlanError(f"weight file {name!r} has no digest in plan.json; it cannot be checked: re-run "
                                "`onnxshard plan`")
            if (sha256_file(file) if full else sample_digest(file)) != want:
                raise PlanError(f"weight file {file} changed after planning (same size, different bytes); restore "
                                "it or re-run `onnxshard plan`")

    def check_wiring(self) -> None:
        """Every stage reads only what reaches it (graph inputs, or what the stage before sends on), and the last
        stage sends every graph output: a duplicated, dropped or reordered stage entry is refused here."""
        arriving = {t.name for t in self.inputs}
        for stage in self.stages:
            missing = [n for n in stage.input_names + list(stage.carry) if n not in arriving]
            if missing:
                raise PlanError(f"plan in {self.root}: stage {stage.index} reads {missing}, which no earlier stage "
                                "sends; plan.json was edited or damaged: re-run `onnxshard plan`")
            arriving = set(stage.output_names) | set(stage.carry)
        missing = [n for n in self.output_names if n not in arriving]
        if missing:
            raise PlanError(f"plan in {self.root}: no stage sends the model outputs {missing}; plan.json was edited "
                            "or damaged: re-run `onnxshard plan`")

    def listing(self) -> set[str]:
        """Every file this plan wrote into its folder (relative POSIX paths), ``plan.json`` included."""
        names = {PLAN_FILE} | {f for s in self.stages for f, _ in s.files()}
        if self.weights.mode in ("link", "copy"):
            names |= set(self.weights.files)
        return {Path(n).as_posix() for n in names}

    def spec(self, name: str) -> TensorSpec:
        """The spec of any tensor the plan names (graph inputs and outputs, stage and step boundaries)."""
        return self._by_name[name]

    @cached_property
    def _by_name(self) -> dict[str, TensorSpec]:  # the coordinator asks for every request: look up, do not scan
        named = self.inputs + self.outputs + tuple(t for s in self.stages for t in s.inputs + s.outputs) + tuple(
            t for s in self.stages for step in s.steps for t in step.inputs + step.outputs)
        return {t.name: t for t in reversed(named)}  # the first listing of a name wins

    def boundaries(self) -> str:
        """What crosses each cut, a line per tensor with its bytes per sample (symbolic dims counted as 1)."""
        from onnxshard import plan_text

        return plan_text.boundaries(self)

    def table(self) -> str:
        """The stage table `onnxshard inspect` prints."""
        from onnxshard import plan_text

        return plan_text.table(self)

def is_plan_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a plan folder (holds ``plan.json``)."""
    return (Path(path) / PLAN_FILE).is_file()


def read_plan_json(root: Path) -> dict:
    path = root / PLAN_FILE
    if not path.is_file():
        raise PlanError(f"{root} is not a plan folder: {PLAN_FILE} is missing; make one with `onnxshard plan`")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlanError(f"{path} is not valid JSON ({e}); re-run `onnxshard plan`") from e


def contained(root: Path, relative: str, *, what: str) -> Path:
    """``root / relative``, refusing absolute paths and any path (symlinks included) that resolves outside ``root``."""
    if os.path.isabs(relative) or not relative:
        raise PlanError(f"{what} path {relative!r} must be relative to {root}")
    path = root / relative
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
        raise PlanError(f"{what} path {relative!r} leaves its folder {root}; refusing to read it")
    return path
