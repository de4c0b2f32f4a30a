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
