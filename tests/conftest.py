import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("TTT_META_THREADS", min(2, os.cpu_count() or 1))))


@pytest.fixture
def omniglot_root() -> Path:
    """The data root holding omniglot/omniglot-py, from TTT_META_DATA; the test is skipped without it."""
    root = os.environ.get("TTT_META_DATA")
    if not root or not (Path(root) / "omniglot" / "omniglot-py").is_dir():
        pytest.skip("real Omniglot not available: set TTT_META_DATA to a folder holding omniglot/omniglot-py")
    return Path(root)
