"""Shared fixtures: the real data mirror beside the checkout, small configs, deterministic torch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llm.paths import find_mirror

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def mirror() -> Path:
    path = find_mirror(Path(__file__).parent)
    if path is None:
        pytest.fail("data mirror not found: expected ../shared/data beside the checkout or $LLM_DATA_MIRROR")
    return path
