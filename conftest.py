"""pytest setup for the whole repo (tests/ and the doctests of hf_pmi/): fully offline, caches in a
temporary folder. Set before any Hugging Face import."""

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
    HF_PMI_CACHE=os.path.join(_home, "hf_pmi"),  # the letters backbone of hf_pmi.testing
    TOKENIZERS_PARALLELISM="false",
    WANDB_DISABLED="true",
)
