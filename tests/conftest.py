"""Test session setup: fully offline, caches in a temporary folder, one thread per process."""

import os
import tempfile

_home = tempfile.mkdtemp(prefix="hf_pmi_tests_")
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    HF_HUB_DISABLE_TELEMETRY="1",
    HF_HUB_DISABLE_XET="1",
    HF_HOME=_home,
    HF_DATASETS_CACHE=os.path.join(_home, "datasets"),
    TOKENIZERS_PARALLELISM="false",
    WANDB_DISABLED="true",
)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits():
    from hf_pmi.testing import load_digits_dataset

    return load_digits_dataset()


@pytest.fixture(scope="session")
def processor():
    from hf_pmi.testing import build_processor

    return build_processor()
