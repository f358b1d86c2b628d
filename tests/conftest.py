"""Shared fixtures. The offline environment (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1, a temporary
HF_HOME) is set by the repo-root conftest.py before any Hugging Face import."""

import pytest


@pytest.fixture(scope="session")
def digits():
    from hf_pmi.testing import load_digits_dataset

    return load_digits_dataset()


@pytest.fixture(scope="session")
def processor():
    from hf_pmi.testing import build_processor

    return build_processor()
