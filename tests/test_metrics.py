"""FID/KID with the pluggable feature network."""

import pytest
import torch
from torch import nn

from chaintune.data import load_dataset
from chaintune.errors import ChaintuneError
from chaintune.metrics import feature_network, fid_kid


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread; on a shared, loaded CPU two OpenMP threads spin-wait (100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits:test")[0], load_dataset("digits:train")[0]


def test_fid_of_a_set_against_itself_is_zero(digits):
    test, _ = digits
    assert fid_kid(test, test)["fid"] == pytest.approx(0.0, abs=1e-3)


def test_fid_orders_sets_by_distance(digits):
    test, train = digits
    same_domain = fid_kid(test, train)
    glyphs = load_dataset("glyphs:test")[0]
    other_domain = fid_kid(test, glyphs)
    noise = fid_kid(test, torch.rand_like(test))
    assert same_domain["fid"] < 2.0
    assert other_domain["fid"] > 5 * same_domain["fid"]
    assert noise["fid"] > other_domain["fid"]
    assert other_domain["kid"] > same_domain["kid"] + 5 * other_domain["kid_std"]


def test_custom_feature_module(digits):
    test, train = digits

    class Pool(nn.Module):
        def forward(self, x):
            return nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)

    net = feature_network(Pool())
    assert net.num_features == 4
    r = fid_kid(test, train, Pool())
    assert r["fid"] >= 0


def test_inception_needs_weights_on_disk(tmp_path, monkeypatch):
    monkeypatch.delenv("CHAINTUNE_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(ChaintuneError, match="weights on disk"):
        feature_network("inception")
    with pytest.raises(ChaintuneError, match="not found"):
        feature_network(f"inception:{tmp_path / 'missing.pt'}")
    with pytest.raises(ChaintuneError, match="unknown feature network"):
        feature_network("clip")
