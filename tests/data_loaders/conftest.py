from __future__ import annotations

from pathlib import Path

import pytest

from mptrec.data_loaders.synth import generate_aliccp

SPLIT = {"train": 0.8, "valid": 0.1, "test": 0.1}


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20,000 synthetic Ali-CCP rows, 3 shards per split, row groups of 1,000 rows."""
    out = tmp_path_factory.mktemp("synth")
    generate_aliccp(
        out,
        rows=20_000,
        shards=3,
        seed=7,
        split=SPLIT,
        row_group_size=1_000,
        click_rate=0.2,
        purchase_rate=0.3,
    )
    return out
