"""Shared test fixtures. Tests that need ../shared/data skip with a clear reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SEGICL_SHARED_DATA", REPO.parent / "shared" / "data"))
DATASETS = [
    "kvasir_seg",
    "cvc_clinicdb",
    "fuseg_foot_ulcer",
    "busbra_breast_us",
    "hc18_fetal_head_us",
    "acdc_cardiac_mri",
    "wbc_blood_smear",
    "rossa_octa_vessel",
]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data (the 8 real datasets); skips the test when it is not there."""
    if not (SHARED_DATA / "kvasir_seg" / "dataset.json").is_file():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (set SEGICL_SHARED_DATA or put ../shared beside the repo)")
    return SHARED_DATA
