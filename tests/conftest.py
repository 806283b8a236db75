"""Test-wide settings: CPU only, quiet tokenizers, and the location of the read-only `shared/` folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """`../shared` beside the checkout (design docs, reference configs); tests needing it skip without it."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: the reference files live beside the checkout in CI and development")
    return SHARED


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on one intra-op thread: more threads only fight over the shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
