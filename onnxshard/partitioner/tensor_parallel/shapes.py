"""Rules for ops that move or regroup a sharded axis: Reshape/Expand (head counts), Split (fused QKV),
Unsqueeze/Squeeze and Concat, with their shape constants rewritten to the per-rank sizes."""

from __future__ import annotations

import math

import numpy as np
from onnx import helper

from onnxshard.partitioner.tensor_parallel.layout import (
    Regrain,
    Rewrite,
    State,
)
from onnxshard.plans import shares


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
                return self._keep(node, [s.at(axis)])
            if vals[pos] != target or not isinstance(target, int):
                return None
            per_rank = [list(vals) for _ in range(self.t)]
            for r, n in enumerate(shares(target, self.t, s.unit)):
                per_rank[r][pos] = n
            return self._keep(node, [s.at(axis)], {1: rebuild(per_rank)})
        group = reshape_group(src, out, s.axis)
        if group is None:
            return None
        axis = group
        moved = self._regrouped(node, s, src[s.axis], out[axis])
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
            return self._keep(node, [moved.at(axis)])
        if vals[axis] != out[axis]:
            return None
        per_rank = [vals[:axis] + [n] + vals[axis + 1:] for n in shares(out[axis], self.t, moved.unit)]
        return self._keep(node, [moved.at(axis)], {1: rebuild(per_rank)})

    def _regrouped(self, node, s: State, size: int, new: int) -> State:
        """The split of a sharded axis of ``size`` that a reshape turns into an axis of ``new`` (heads from a
        width, or a width from heads). Each rank's part must stay whole items of the new axis: when an uneven
        split would cut a head, the split is made again in whole heads (``Regrain``); too few heads for T ranks
        roll it back, as does a size shape inference left unknown."""
        if not (isinstance(size, int) and isinstance(new, int)):
            self.fits(None, "output dim", node)  # raises: a split of unknown size cannot be checked
        self.fits(new, "head count" if new < size else "output dim", node, max(1, s.unit * new // size))
        if new < size:
            width = size // new  # one item of the new axis, in elements of the old
            if any(n % width for n in shares(size, self.t, s.unit)):
                raise Regrain(self.starts_of(node), math.lcm(s.unit, width))
            return self.sharded(0, (new,), max(1, s.unit // width))
        return self.sharded(0, (new,), s.unit * (new // size))

    def _shape_values(self, name: str):
        """A shape input's values and how to make per-rank copies (``rebuild`` takes each rank's values): a
        constant, or a Concat whose parts are constants or computed dims (computed parts are kept; only constant
        parts may be rewritten)."""
        v = self.const(name)
        if v is not None:
            return list(v.reshape(-1)), lambda new: self.rank_const(name, [np.array(x, np.int64) for x in new])
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

        def rebuild(news):
            news = [np.array(new, np.int64) for new in news]
            inputs, at = [], 0
            for x, n, c in parts:
                chunks = [new[at:at + n] for new in news]
                if c is not None and not all(np.array_equal(chunk, c) for chunk in chunks):
                    inputs.append(self.rank_const(x, [chunk.astype(c.dtype) for chunk in chunks]))
                else:
                    inputs.append(x)
                at += n
            out = f"{name}@tp.{self.i}"
            self._pre.append(helper.make_node("Concat", inputs, [out], name=f"{concat.name}@tp.{self.i}", axis=0))
            return out

        # Computed entries count as "copied" (-2): never the sharded axis' entry.
        return [(-2 if x is None else x) for x in vals], rebuild

    def _split(self, node, s: State) -> Rewrite | None:
        rank = len(self.shape(node.input[0]) or ())
        axis = self.attr(node, "axis", 0) % max(rank, 1)
        if axis != s.axis:
            return self._keep(node, [s] * len(node.output))
        sizes = self._split_sizes(node)
        if sizes is None:
            n = len(node.output)
            if len(s.blocks) != n or len(set(s.blocks)) != 1:
                return None
            return self._keep(node, [self.sharded(axis, s.blocks[:1], s.unit)] * n)
        if tuple(sizes) != s.blocks:
            return None
        local = [[shares(b, self.t, s.unit)[r] for b in sizes] for r in range(self.t)]
        outs = [self.sharded(axis, (b,), s.unit) for b in sizes]
        if self.opset >= 13:
            return self._keep(node, outs, {1: self.rank_const(node.input[1], [np.array(x, np.int64) for x in local])})
        if any(x != local[0] for x in local):
            return None  # the sizes are an attribute, the same on every rank
        rw = self._keep(node, outs)
        for a in rw.nodes[0].attribute:
            if a.name == "split":
                del a.ints[:]
                a.ints.extend(local[0])
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
            return self._keep(node, [s.at(kept[s.axis])])
        axes = {int(a) % len(src) for a in axes}
        if s.axis in axes:
            return None
        return self._keep(node, [s.at(s.axis - sum(a < s.axis for a in axes))])

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
        sharded = {(st.axis, st.split) for st in ins if st.kind == "S"}
        if len(sharded) != 1:
            return None
        s_axis, (blocks, unit) = sharded.pop()
        if s_axis == axis:
            return None
        return self._aligned(node, State("S", s_axis, blocks, unit))


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
