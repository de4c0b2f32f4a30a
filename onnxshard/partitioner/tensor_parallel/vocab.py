"""The vocabulary split: a large embedding Gather on T ranks, each holding a range of rows."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnxshard.partitioner.tensor_parallel.layout import Rewrite, State
from onnxshard.plans import shares, starts

VOCAB_MIN_BYTES = 1 << 20  # embeddings at least this big are split by vocabulary rows


class Vocab:
    """Mixin of the propagation pass."""

    def _vocab(self, node, vocab: int) -> Rewrite:
        """Rank r holds its share of the rows (``shares``: [start_r, start_r + n_r), the first ranks one row more when
        T does not divide V): ids outside it read row 0 and are zeroed, so the ranks' sum is the lookup. Negative ids
        count from the end, as in ONNX Gather; an id out of [-V, V) gets an index out of the rank's rows, so ONNX
        Runtime raises as it does on the whole model."""
        ids, out = node.input[1], node.output[0]
        p = f"{out}@vocab"
        np_ids = np.dtype(self.specs[ids].dtype if ids in self.specs else "int64")
        rows = [np.array(n, np_ids) for n in shares(vocab, self.t)]
        offset = self.rank_const(f"{p}.offset", [np.array(a, np_ids) for a in starts(vocab, self.t)])
        size = beyond = self.rank_const(f"{p}.size", rows)
        zero, whole = (self.new_const(f"{p}.{n}", np.array(v, np_ids)) for n, v in (("zero", 0), ("vocab", vocab)))
        out_dtype = self.specs[out].dtype if out in self.specs else "float32"
        table = self.weight(node.input[0], 0, (vocab,))
        make = helper.make_node
        nodes = [
            make("Less", [ids, zero], [f"{p}.neg"], name=f"{p}.neg"),
            make("Add", [ids, whole], [f"{p}.wrapped"], name=f"{p}.wrap"),
            make("Where", [f"{p}.neg", f"{p}.wrapped", ids], [f"{p}.ids"], name=f"{p}.ids"),
            make("Sub", [f"{p}.ids", offset], [f"{p}.local"], name=f"{p}.sub"),
            make("GreaterOrEqual", [f"{p}.local", zero], [f"{p}.ge"], name=f"{p}.ge"),
            make("Less", [f"{p}.local", size], [f"{p}.lt"], name=f"{p}.lt"),
            make("And", [f"{p}.ge", f"{p}.lt"], [f"{p}.in"], name=f"{p}.and"),
            make("GreaterOrEqual", [f"{p}.ids", zero], [f"{p}.vge"], name=f"{p}.vge"),
            make("Less", [f"{p}.ids", whole], [f"{p}.vlt"], name=f"{p}.vlt"),
            make("And", [f"{p}.vge", f"{p}.vlt"], [f"{p}.valid"], name=f"{p}.valid"),
            make("Where", [f"{p}.valid", zero, beyond], [f"{p}.elsewhere"], name=f"{p}.elsewhere"),
            make("Where", [f"{p}.in", f"{p}.local", f"{p}.elsewhere"], [f"{p}.safe"], name=f"{p}.where"),
            make("Gather", [table, f"{p}.safe"], [f"{p}.rows"], name=node.name, axis=0),
            unsqueeze_node(f"{p}.in", f"{p}.in1", -1, self.opset, self),
            make("Cast", [f"{p}.in1"], [f"{p}.mask"], name=f"{p}.cast",
                 to=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(out_dtype))),
            make("Mul", [f"{p}.rows", f"{p}.mask"], [f"{out}@partial"], name=f"{p}.mul"),
        ]
        self._set(node, [State("P")])
        return Rewrite(nodes, "vocab")


def unsqueeze_node(src, dst, axis, opset, p):
    """An Unsqueeze of ``src`` at ``axis`` into ``dst`` (axes as an input from opset 13, an attribute before)."""
    if opset >= 13:
        axes = p.new_const(f"{dst}.axes", np.array([axis], np.int64))
        return helper.make_node("Unsqueeze", [src, axes], [dst], name=f"{dst}.unsqueeze")
    return helper.make_node("Unsqueeze", [src], [dst], name=f"{dst}.unsqueeze", axes=[axis])
