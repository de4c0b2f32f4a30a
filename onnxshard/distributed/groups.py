"""The names of the placement groups pipelines reserve, and the sweep that frees those their owner left behind.

A group is named ``onnxshard:OWNER:PROCESS:N``: OWNER the actor that reserved it (``driver`` outside an actor),
PROCESS a random id of the reserving process. Ray frees a group when its job ends, not when the actor that
reserved it dies, and an actor can die without running its clean-up: Ray Data ends a job by killing its pool
actors (``ray.kill``: no ``__del__``, so no ``Pipeline.close``), and Ray restarts a pool actor whose process died
in a new process. Either way the dead process's stage CPUs would stay reserved until the driver exits, and a
long-lived driver (a notebook, a server) would wait on them. :func:`free_abandoned` frees them; every pipeline
calls it before it reserves a group, and ``onnxshard serve`` before it deploys."""

from __future__ import annotations

import itertools
import logging
import uuid

import ray
from ray.util import placement_group_table
from ray.util.placement_group import PlacementGroup, remove_placement_group

log = logging.getLogger(__name__)
PREFIX = "onnxshard:"
_PROCESS = uuid.uuid4().hex[:12]
_GROUPS = itertools.count()


def new_name() -> str:
    """A name for the next group this process reserves."""
    return f"{PREFIX}{_owner() or 'driver'}:{_PROCESS}:{next(_GROUPS)}"


def live_groups() -> dict[str, str]:
    """The cluster's placement groups not removed: id (hex) -> name ("" for an unnamed one)."""
    return {gid: g.get("name") or "" for gid, g in placement_group_table().items() if g.get("state") != "REMOVED"}


def free_abandoned() -> list[str]:
    """Free the onnxshard groups whose reserving process is gone for good: those of an actor Ray reports dead, and
    those of an earlier process of the calling actor. A driver's groups, and those of a live actor's current
    process, are left alone. Returns the names freed."""
    me, freed, dead = _owner(), [], {}
    for gid, name in live_groups().items():
        parts = name.split(":")
        if len(parts) != 4 or f"{parts[0]}:" != PREFIX or parts[1] == "driver":
            continue
        _, owner, process, _ = parts
        if owner == me:
            gone = process != _PROCESS
        else:
            if owner not in dead:
                dead[owner] = _actor_dead(owner)
            gone = dead[owner]
        if gone:
            log.warning("freeing placement group %s: the process that reserved it is gone", name)
            if remove(gid):
                freed.append(name)
    return freed


def remove(gid: str) -> bool:
    """Remove the group of id ``gid`` (hex), named or not; False when it is gone already."""
    try:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(gid))))
        return True
    except Exception:  # noqa: BLE001 - removed meanwhile
        return False


def _owner() -> str | None:
    return ray.get_runtime_context().get_actor_id()


def _actor_dead(actor: str) -> bool:
    """Whether Ray reports the actor dead (not restarting: a restarting actor frees its own groups). Ray's public
    state API needs the dashboard, which a local Ray may run without; the actor table is read from the GCS."""
    try:
        from ray._private.state import actors

        return (actors(actor_id=actor) or {}).get("State") == "DEAD"
    except Exception:  # noqa: BLE001 - unknown: keep the group
        return False
