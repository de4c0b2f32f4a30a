"""How much of a model's weights each tensor-parallel rank holds: the largest rank's share against 1/T.

    .venv/bin/python benchmarks/tp_weights.py [--d 256] [--layers 2] [--degrees 2,3,4]

Builds GPT-2-like and BERT-like (masked-LM head, decoder tied to the word embeddings or not) models in code with
the real vocabularies (50,257 and 30,522: odd, or not divisible by 4), plans each at every degree, and prints the
largest rank's weight bytes as a share of the whole model, how far that is over 1/T (norms, biases and position
embeddings every rank holds whole, and the extra head or row of an uneven split) and the plan's notes. Planning
only: no Ray, no ONNX Runtime session.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import onnxshard
from onnxshard import models


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--degrees", default="2,3,4")
    args = p.parse_args()
    degrees = [int(x) for x in args.degrees.split(",")]
    builds = {
        "GPT-2-like, vocab 50,257": lambda: models.gpt2(layers=args.layers, d=args.d, heads=4, vocab=50257),
        "BERT-like + MLM head, vocab 30,522, tied": lambda: models.bert_mlm(args.layers, args.d, 4, 4 * args.d,
                                                                             vocab=30522),
        "BERT-like + MLM head, vocab 30,522, untied": lambda: models.bert_mlm(args.layers, args.d, 4, 4 * args.d,
                                                                               vocab=30522, tied=False),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, build) in enumerate(builds.items()):
            path = models.save(build(), Path(tmp) / f"m{k}", external=True)
            whole = onnxshard.plan(path, Path(tmp) / f"m{k}-whole").stages[0].param_bytes
            for degree in degrees:
                (stage,) = onnxshard.plan(path, Path(tmp) / f"m{k}-t{degree}", tensor_parallel=degree).stages
                largest = max(stage.rank_param_bytes)
                rows.append([name, f"T={degree}", f"{whole / 1e6:.1f} MB", f"{largest / whole:.1%}",
                             f"{1 / degree:.1%}", f"{largest / whole - 1 / degree:+.1%}", str(len(stage.notes))])
    head = ["model", "degree", "weights", "largest rank", "1/T", "over 1/T (norms, biases, uneven parts)", "notes"]
    for row in [head, ["---"] * len(head), *rows]:  # a Markdown table, as RESULTS.md records it
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
