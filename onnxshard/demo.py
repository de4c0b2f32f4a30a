"""`onnxshard demo`: the main job on a fresh machine, end to end on a local embedded Ray."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from onnxshard import models
from onnxshard.api import plan
from onnxshard.bench import table, timed
from onnxshard.runtime import RuntimeConfig, open_session, tools


def run_demo(*, stages: int = 2, batch: int = 32, seq: int = 64, layers: int = 6, micro_batch_size: int = 4,
             address: str | None = None, repeats: int = 3) -> int:
    from onnxshard.distributed import Pipeline

    with tempfile.TemporaryDirectory(prefix="onnxshard-demo-") as tmp:
        tmp = Path(tmp)
        model = models.save(models.transformer(layers=layers, d=256, heads=4, ffn=1024, vocab=1000), tmp / "model",
                            external=True)
        print(f"built a {layers}-layer transformer (d=256, vocab 1000) at {model}")
        the_plan = plan(model, tmp / "plan", stages=stages, dims={"seq": seq})
        print(the_plan.table())
        feeds = tools.random_feeds(the_plan.inputs, dims={"batch": batch, "seq": seq}, seed=1)
        feeds["mask"] = np.ones_like(feeds["mask"])
        feeds["ids"] = np.random.default_rng(2).integers(0, 1000, feeds["ids"].shape)

        session = open_session(model, RuntimeConfig(intra_op_threads=stages))
        names = [o.name for o in session.get_outputs()]
        reference = dict(zip(names, session.run(names, feeds)))
        ort = timed(f"plain ONNX Runtime, whole model, {stages} threads", lambda: session.run(names, feeds), batch,
                    repeats)
        with Pipeline(the_plan, micro_batch_size=micro_batch_size, address=address) as pipe:
            outputs = pipe.run(feeds)
            ours = timed(f"onnxshard, {stages} stages x 1 thread, micro-batch {micro_batch_size}",
                         lambda: pipe.run(feeds), batch, repeats)
            print()
            print(table([ort, ours], [ort]))
            print(pipe.stats.table())
        diffs = tools.max_differences(reference, outputs)
        ok = all(d <= 1e-5 for d in diffs.values())
        print(f"max |pipeline - ORT| per output: {diffs} -> {'OK' if ok else 'MISMATCH'}")
        return 0 if ok else 1
