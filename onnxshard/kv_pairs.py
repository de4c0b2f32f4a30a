"""A decoder's KV cache as the plan records it: each layer's past/present pair (plain data, part of plan.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# When generating, every stage makes these inputs from its cached lengths; none receives them across a cut.
MADE_PER_STAGE = ("attention_mask", "position_ids")


@dataclass(frozen=True)
class KvPair:
    """A decoder's cache input ``past`` and the output ``present`` that is the past with this call's keys or
    values appended, for one layer (``kind`` is ``key`` or ``value``)."""

    layer: int
    kind: str
    past: str
    present: str

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> KvPair:
        return cls(int(d["layer"]), str(d["kind"]), str(d["past"]), str(d["present"]))
