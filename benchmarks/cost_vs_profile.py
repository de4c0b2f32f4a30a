"""The analytic cost model against ONNX Runtime's own per-node profile: each stage's predicted share of the work
against its measured share, for the 2- and 3-stage cuts the analytic costs choose.

    .venv/bin/python benchmarks/cost_vs_profile.py [--batch 4] [--seq 128]

Models built in code (a BERT-style encoder, GPT-2-style and LLaMA-style decoders, a BERT masked-LM head, a stacked
LSTM, a CNN), planned with ``example_inputs`` (their sizes of the symbolic dims size the costs); each node's time
measured by ORT's profiler on the same inputs (1 thread, optimisations off so the names match, median of 5 runs).
Prints, per model and cut, the predicted and measured shares and the largest gap in percentage points.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

import onnxshard
from onnxshard import models
from onnxshard.partitioner import analyse_model
from onnxshard.runtime import tools


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--large", action="store_true", help="also the GPT-2-small-sized and BERT-base-sized models "
                   "(12 layers, d=768; minutes)")
    args = p.parse_args()
    b, s = args.batch, args.seq
    builds = {
        "BERT-style encoder, 4 layers, d=256": (lambda: models.transformer(4, 256, 4, 1024), {"seq": s}),
        "GPT-2-style decoder, 4 layers, d=256, vocab 8192": (lambda: models.gpt2(4, 256, 4, 8192, max_seq=s), {}),
        "LLaMA-style decoder, 4 layers, d=256": (lambda: models.llama(4, 256, 8, 4, 1024), {}),
        "BERT masked-LM, 4 layers, d=256, vocab 8192": (lambda: models.bert_mlm(4, 256, 4, 1024, vocab=8192), {}),
        "LSTM, 4 layers, 256 hidden": (lambda: models.lstm(4, 64, 256), {}),
    }
    if args.large:
        builds["GPT-2-small-sized, 12 layers, d=768, vocab 50257"] = (
            lambda: models.gpt2(12, 768, 12, 50257, max_seq=s), {})
        builds["BERT-base-sized encoder, 12 layers, d=768"] = (lambda: models.transformer(12, 768, 12, 3072), {})
    worst = 0.0
    print("| model | stages | predicted shares | measured shares | largest gap |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, (build, _)) in enumerate(builds.items()):
            path = models.save(build(), Path(tmp) / f"m{k}", external=True)
            specs = analyse_model(path).specs
            inputs = [specs[n] for n in analyse_model(path).graph.inputs]
            dims = {"batch": b, "seq": s}
            feeds = tools.random_feeds(tuple(inputs), dims=dims, seed=0)
            if "ids" in feeds:
                feeds["ids"] = np.random.default_rng(0).integers(0, 8192, feeds["ids"].shape)
            if "x" in feeds and name.startswith("LSTM"):  # time-major: [seq, batch, inputs]
                feeds["x"] = np.random.default_rng(0).standard_normal((s, b, 64)).astype(np.float32)
            analysis = analyse_model(path)
            times = tools.profile_node_times(analysis.graph.model, analysis.graph.folder, feeds)
            for stages in (2, 3):
                plan = onnxshard.plan(path, Path(tmp) / f"m{k}-s{stages}", stages=stages, example_inputs=feeds)
                bounds = np.cumsum([0] + [st.nodes for st in plan.stages])
                nodes = analysis.graph.nodes
                measured = np.array([sum(times.get(n.name, 0.0) for n in nodes[a:z])
                                     for a, z in zip(bounds, bounds[1:])])
                predicted = np.array([st.work for st in plan.stages])
                predicted, measured = predicted / predicted.sum(), measured / measured.sum()
                gap = float(np.max(np.abs(predicted - measured))) * 100
                worst = max(worst, gap)
                print(f"| {name} | {stages} | {' / '.join(f'{x:.0%}' for x in predicted)} | "
                      f"{' / '.join(f'{x:.0%}' for x in measured)} | {gap:.1f} pp |")
    print(f"\nlargest gap over every model and cut: {worst:.1f} percentage points (batch {b}, seq {s})")


if __name__ == "__main__":
    main()
