"""Rules for ops that move or regroup a sharded axis: Reshape/Expand (head counts), Split (fused QKV),
Unsqueeze/Squeeze and Concat, with their shape constants rewritten to the per-rank sizes."""

from __future__ import annotations

import numpy as np
from onnx import helper

from onnxshard.partitioner.tensor_parallel.layout import (
    Rewrite,
    State,
)


class ShapeRules:
    """Mixin of the propagation pass."""

    def _reshape(self, node, s: State) -> Rewrite | None:
        if len(s.blocks) > 1:
            return None
        src, out = self.shape(node.input[0]), self.shape(node.output[0])
        if not src or not out:
            return None
        if node.op_type == "Expand":
            axis = len(out) - len(src) + s.axis
            target = out[axis]
            values = self._shape_values(node.input[1])
            if values is None:
                return None
            vals, rebuild = values
            pos = axis - (len(out) - len(vals))
            if pos < 0 or vals[pos] in (1, -1):
                return self._keep(node, [State("S", axis)])
            if vals[pos] != target:
                return None
            vals = list(vals)
            vals[pos] = target // self.t
            return self._keep(node, [State("S", axis)], {1: rebuild(np.array(vals, np.int64))})
        group = reshape_group(src, out, s.axis)
        if group is None:
            return None
        axis = group
        self.divides(out[axis], f"output dim {axis} (a head count, in attention)", node)
        values = self._shape_values(node.input[1])
        if values is None:
            return None
        vals, rebuild = values
        vals = list(int(v) for v in vals)
        if len(vals) != len(out):
            return None
        if s.axis < len(vals) and vals[s.axis] in (0, -2) and s.axis != axis:
            return None  # a copied or computed entry would hold the rank's size where the whole size is meant
        if vals[axis] == -1 or (vals[axis] == 0 and axis == s.axis):
            return self._keep(node, [State("S", axis)])
        if vals[axis] != out[axis]:
            return None
        vals[axis] //= self.t
        return self._keep(node, [State("S", axis)], {1: rebuild(np.array(vals, np.int64))})

    def _shape_values(self, name: str):
        """A shape input's values and how to make a per-rank copy: a constant, or a Concat whose parts are
        constants or computed dims (computed parts are kept; only constant parts may be rewritten)."""
        v = self.const(name)
        if v is not None:
            return list(v.reshape(-1)), lambda new: self.new_const(name, new)
        prod = self.g.producer.get(name)
        if prod is None or self.g.nodes[prod].op_type != "Concat":
            return None
        concat = self.g.nodes[prod]
        parts, vals = [], []
        for x in concat.input:
            c = self.const(x)
            if c is None:
                shape = self.shape(x)
                if not shape or len(shape) != 1 or not isinstance(shape[0], int):
                    return None
                parts.append((x, shape[0], None))
                vals += [None] * shape[0]
            else:
                parts.append((x, c.size, c.reshape(-1)))
                vals += [int(q) for q in c.reshape(-1)]

        def rebuild(new):
            inputs, at = [], 0
            for x, n, c in parts:
                chunk = new[at:at + n]
                if c is not None and not np.array_equal(chunk, c):
                    inputs.append(self.new_const(x, chunk.astype(c.dtype)))
                else:
                    inputs.append(x)
                at += n
            out = f"{name}@tp.{self.i}"
            self._pre.append(helper.make_node("Concat", inputs, [out], name=f"{concat.name}@tp.{self.i}", axis=0))
            return out

        # Computed entries count as "copied" (-2): never the sharded axis' entry.
        return [(-2 if x is None else x) for x in vals], lambda new: rebuild(np.array(new, np.int64))

    def _split(self, node, s: State) -> Rewrite | None:
        rank = len(self.shape(node.input[0]) or ())
        axis = self.attr(node, "axis", 0) % max(rank, 1)
        if axis != s.axis:
            return self._keep(node, [s] * len(node.output))
        sizes = self._split_sizes(node)
        if sizes is None:
            n = len(node.output)
            if len(s.blocks) not in (1, n) or (len(s.blocks) == n and len(set(s.blocks)) != 1):
                return None
            return self._keep(node, [State("S", axis)] * n)
        if tuple(sizes) != s.blocks:
            return None
        local = [x // self.t for x in sizes]
        if self.opset >= 13:
            rw = self._keep(node, [State("S", axis)] * len(node.output),
                            {1: self.new_const(node.input[1], np.array(local, np.int64))})
        else:
            rw = self._keep(node, [State("S", axis)] * len(node.output))
            for a in rw.nodes[0].attribute:
                if a.name == "split":
                    del a.ints[:]
                    a.ints.extend(local)
        return rw

    def _unsqueeze_squeeze(self, node, s: State) -> Rewrite | None:
        src, out = self.shape(node.input[0]), self.shape(node.output[0])
        if not src or out is None:
            return None
        axes = self._axes(node)
        if axes is None:
            return None
        if node.op_type == "Unsqueeze":
            axes = sorted(int(a) % len(out) for a in axes)
            kept = [k for k in range(len(out)) if k not in axes]
            return self._keep(node, [State("S", kept[s.axis], s.blocks)])
        axes = {int(a) % len(src) for a in axes}
        if s.axis in axes:
            return None
        return self._keep(node, [State("S", s.axis - sum(a < s.axis for a in axes), s.blocks)])

    def _axes(self, node) -> list[int] | None:
        """The ``axes`` of an Unsqueeze/Squeeze/Reduce: the attribute (older opsets) or the constant input."""
        axes = self.attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            c = self.const(node.input[1])
            axes = None if c is None else list(c)
        return axes

    def _concat(self, node, ins) -> Rewrite | None:
        out = node.output[0]
        rank = len(self.shape(out) or ())
        axis = self.attr(node, "axis", 0) % max(rank, 1)
        sharded = {(st.axis, st.blocks) for st in ins if st.kind == "S"}
        if len(sharded) != 1:
            return None
        s_axis, blocks = sharded.pop()
        if s_axis == axis:
            return None
        return self._aligned(node, State("S", s_axis, blocks))


def reshape_group(src, out, axis: int) -> int | None:
    """The output axis a reshape moves the leading part of input ``axis`` to, when the dims around it factor into
    matching groups (symbolic dims must map one to one); ``None`` otherwise."""
    i = j = 0
    while i < len(src) and j < len(out):
        if not isinstance(src[i], int) or not isinstance(out[j], int):
            if src[i] is None or src[i] != out[j]:
                return None
            if i == axis:
                return j
            i, j = i + 1, j + 1
            continue
        i2, j2, a, b = i + 1, j + 1, src[i], out[j]
        while a != b:
            if a < b and i2 < len(src) and isinstance(src[i2], int):
                a, i2 = a * src[i2], i2 + 1
            elif b < a and j2 < len(out) and isinstance(out[j2], int):
                b, j2 = b * out[j2], j2 + 1
            else:
                return None
        if i <= axis < i2:
            if any(src[k] != 1 for k in range(i, axis)):
                return None  # the sharded axis must lead its group, or a rank's chunk is not contiguous
            return next((k for k in range(j, j2) if out[k] != 1), None)
        i, j = i2, j2
    return None
