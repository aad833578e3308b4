import os

import pytest
import torch

# Keep the suite predictable on 2-core CI machines.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Teachers trained by distill go to a per-session cache, never the user's ~/.cache."""
    monkeypatch.setenv("FMKT_CACHE", str(tmp_path_factory.getbasetemp() / "fmkt-cache"))
