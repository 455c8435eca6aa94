"""Fixtures for the data / eval tests: a generated three-benchmark suite in three formats."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _modest_threads():
    # The suite shares small CPU machines: one torch thread here, restored afterwards.
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def suite(tmp_path_factory):
    """fvqa-like verl parquet (em), V*-like jsonl + JPEG folder (choice), MathVision-like HF dataset
    on disk (no data_source column: pass source="MathVision"; choice and math rows)."""
    import synthetic_datasets as sd

    root = tmp_path_factory.mktemp("suite")
    return {
        "fvqa": sd.verl_parquet(root / "fvqa.parquet", "fvqa", 3),
        "vstar": sd.jsonl_vstar(root / "vstar", 3),
        "mathvision": sd.hf_mathvision(root / "mathvision", 3),
    }


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
