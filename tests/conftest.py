"""Shared pytest fixtures for the lamost_ostar test-suite."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

#: The repository's ``scripts/`` folder.
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

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


def _load_script(stem: str, module_name: str | None = None) -> ModuleType:
    """``scripts/<stem>.py`` executed as a new module named ``module_name`` (default: ``stem``)."""
    spec = importlib.util.spec_from_file_location(module_name or stem, SCRIPTS / f"{stem}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def load_script():
    """A loader of the repository's scripts as modules: ``load_script("evaluate_loso")``."""
    return _load_script


@pytest.fixture(scope="session")
def loso_tiny_run(tmp_path_factory):
    """A tiny leave-one-star-out run (fold 0, ``cnn2`` and ``lr2``) with its fold models saved.

    Shared by the LOSO and robustness tests (one run instead of one per module);
    a test that changes the run works on a copy of the folder.  Returns
    ``(run_dir, report_path)``.
    """
    from lamost_ostar import loso

    out = tmp_path_factory.mktemp("loso_tiny")
    cfg = loso.LosoConfig.from_profile("tiny")
    cfg.save_models, cfg.b_per_star = True, 8     # 2 B spectra per S/N bin and star
    path = loso.run_loso(cfg, out, log=lambda *a: None)
    return out, path
