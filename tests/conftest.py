import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if "CHAINTUNE_CACHE" not in os.environ:  # tests never write to the user's ~/.cache/chaintune
    import tempfile

    os.environ["CHAINTUNE_CACHE"] = tempfile.mkdtemp(prefix="chaintune-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

# tiny models: one thread is fastest and avoids oversubscription when processes share cores
torch.set_num_threads(1)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def tiny_unet_model():
    from chaintune.testing import tiny_unet_model

    return tiny_unet_model()
