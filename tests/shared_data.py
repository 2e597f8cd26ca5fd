"""Where the read-only shared data (../shared beside the project) is, in a checkout or in CI."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """``$EARMARK_SHARED_DIR``, else ``../shared`` beside the project, else /work/shared."""
    candidates = [
        Path(os.environ["EARMARK_SHARED_DIR"]) if os.environ.get("EARMARK_SHARED_DIR") else None,
        PROJECT_ROOT.parent / "shared",
        Path("/work/shared"),
    ]
    for candidate in candidates:
        if candidate is not None and (candidate / "data" / "intel").is_dir():
            return candidate
    return PROJECT_ROOT.parent / "shared"


INTEL_DIR = shared_dir() / "data" / "intel"
