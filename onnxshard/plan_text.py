"""A plan as text: the stage table `onnxshard inspect` prints, and what crosses each cut."""

from __future__ import annotations

from onnxshard.kv_pairs import MADE_PER_STAGE
from onnxshard.plans import Plan, spec_bytes
from onnxshard.units import human_bytes


def unsized_note(dims: list[str]) -> str:
    """What to say when the analytic costs counted symbolic dims as 1."""
    return (f"costs per sample with {', '.join(dims)} counted as 1 (no size given): where the work grows faster "
            "than linearly in them (attention in seq), pass their sizes (dims= or example_inputs=; --dim NAME=SIZE "
            "or --inputs FILE.npz) to cut for your workload")


def boundaries(plan: Plan) -> str:
    """What crosses each cut, a line per tensor with its bytes per sample (symbolic dims counted as 1)."""
    lines = []
    for s in plan.stages[:-1]:
        lines.append(f"stage {s.index} -> {s.index + 1}:")
        for name in s.output_names + list(s.carry):
            t = plan.spec(name)
            how = "carried" if name in s.carry else "made"
            lines.append(f"  {name:<30} {t.dtype:<8} {_shape(t.shape):<20} {spec_bytes(t):>10} B/sample ({how})")
    if plan.kv_cache:
        lines += generation(plan)
    return "\n".join(lines)


def generation(plan: Plan) -> list[str]:
    """What crosses each cut per sequence and decode step when generating, and each stage's cache per token."""
    kv = {n for p in plan.kv_cache for n in (p.past, p.present)} | set(MADE_PER_STAGE)
    lines = ["generating (per sequence and decode step; caches stay in their stage, each stage makes the mask and "
             "positions):"]
    for s in plan.stages:
        pasts = [plan.spec(p.past) for p in plan.kv_cache if p.past in s.input_names]
        per_token = sum(spec_bytes(t, {str(t.shape[2]): 1}) for t in pasts if t.shape and len(t.shape) == 4)
        sent = [n for n in s.output_names + list(s.carry) if n not in kv] if s.index < plan.num_stages - 1 else []
        crossing = ", ".join(f"{n} {spec_bytes(plan.spec(n))} B" for n in sent)
        layers = len({p.layer for p in plan.kv_cache if p.past in s.input_names})
        lines.append(f"  stage {s.index}: the cache of {layers} layer{'' if layers == 1 else 's'}, {per_token} B per token"
                     + (f"; sends {sum(spec_bytes(plan.spec(n)) for n in sent)} B ({crossing})" if sent else ""))
    return lines


def table(plan: Plan) -> str:
    """The stage table `onnxshard inspect` prints."""
    rows = [("stage", "nodes", "params", "GFLOP/sample", "inputs", "sends (bytes/sample)")]
    for s in plan.stages:
        ins = ", ".join(s.input_names) or "-"
        sends = ", ".join(s.output_names + list(s.carry)) or "-"
        params = human_bytes(s.param_bytes)
        if s.tensor_parallel > 1:
            params = f"{human_bytes(max(s.rank_param_bytes))}/rank x{s.tensor_parallel}"
        rows.append((str(s.index), str(s.nodes), params, f"{s.flops / 1e9:.4f}",
                     _clip(ins), f"{_clip(sends)} ({s.sends_bytes})"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    total = sum(s.work + s.boundary_work for s in plan.stages)
    if total and plan.num_stages > 1:
        slowest = max(s.work + s.boundary_work for s in plan.stages)
        lines.append(f"slowest stage {slowest / (total / plan.num_stages):.3f}x the mean; "
                     f"weights: {plan.weights.mode}; cost: {plan.cost_source}")
    if plan.replicas > 1:
        lines.append(f"replicas: {plan.replicas} copies of the stages ({plan.replicas * plan.num_workers} workers), "
                     "what a Pipeline runs unless told otherwise")
    if plan.unsized_dims and plan.num_stages > 1:
        lines.append(unsized_note(plan.unsized_dims))
    for s in plan.stages:
        if s.tensor_parallel > 1:
            reduces = sum(len(step.reduces) for step in s.steps)
            per_rank = ", ".join(human_bytes(b) for b in s.rank_param_bytes)
            lines.append(f"stage {s.index}: tensor parallel x{s.tensor_parallel}, {len(s.steps)} steps, "
                         f"{reduces} reduces between ranks; weights per rank: {per_rank}")
        lines += [f"stage {s.index}: {note}" for note in s.notes]
    for dim, notes in plan.batch_coupled.items():  # one line a dim: it matters only if the batch runs along it
        more = f" and {len(notes) - 1} more" if len(notes) > 1 else ""
        lines.append(f"samples depend on each other along {dim!r} (if it is the batch): {notes[0]}{more}")
    return "\n".join(lines)


def _shape(shape) -> str:
    return "?" if shape is None else "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _clip(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
