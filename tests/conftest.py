"""Shared pytest fixtures for the lamost_ostar test-suite."""

from __future__ import annotations

from pathlib import Path

import pytest

#: Location of the shared real-data folder, found relative to the repository
#: (``<repo>/../shared/data``) so that the tests work from any checkout.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to the shared real-data folder (``../shared/data``).

    Skips the requesting test with a clear reason when the folder is absent
    (for example on a fresh clone without the project's shared data).
    """
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA} "
                    "(real LAMOST/MILES/Pickles files are not in this checkout)")
    return SHARED_DATA
