import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import zoo  # noqa: E402

from onnxshard.distributed.cluster import use_local_worker_env  # noqa: E402

# Every Ray the tests start (this session's, a CLI's, a `ray start` head's) gives its workers this environment:
# without it each Ray Data Parquet read starts 32 footer-reading actors, 20 s a read on this 2-core machine.
use_local_worker_env()


@pytest.fixture
def save_model(tmp_path):
    """Save a ModelProto under tmp_path and return its path: ``save_model(model, external=False)``."""

    def save(model, name="model", external=False):
        return zoo.save(model, tmp_path / name, external=external)

    return save


def start_local_ray():
    """The tests' local Ray. Logical CPUs are oversubscribed so several small pipelines fit on this 2-core machine."""
    import os

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    return ray


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (ray.init takes seconds here)."""
    yield start_local_ray()
    import ray

    ray.shutdown()


def _live_groups() -> dict[str, str]:
    """The local Ray's placement groups not yet removed: id -> name (none when Ray is not running)."""
    import ray

    from onnxshard.distributed.groups import live_groups

    return live_groups() if ray.is_initialized() else {}


@pytest.fixture(scope="module", autouse=True)
def frees_placement_groups(request):
    """Each test module frees the placement groups it made (a pipeline not closed holds its CPUs until the session
    ends, and a later test then waits for CPUs that never come back). The groups of pipelines whose process is
    gone (Ray Data kills its pool actors at a job's end) are first freed as the next pipeline would free them. A
    leak fails the module's last test, naming the groups, and they are removed so later modules do not wait."""
    before = set(_live_groups())
    yield
    import time

    from onnxshard.distributed.groups import free_abandoned, remove

    deadline = time.monotonic() + 10  # removal is asynchronous, and so is an actor's death
    while (left := {g: n for g, n in _live_groups().items() if g not in before}) and time.monotonic() < deadline:
        free_abandoned()
        time.sleep(0.2)
    if left:
        for gid in left:
            remove(gid)
        pytest.fail(f"{request.module.__name__} left {len(left)} placement group(s) not removed: "
                    f"{sorted(n or g[:8] for g, n in left.items())}")
