import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import zoo  # noqa: E402


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
