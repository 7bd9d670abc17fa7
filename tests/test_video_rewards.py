"""Video rewards: per-frame image rewards (``frames:AGG[/K]:SPEC``) and ``temporal-consistency``; gradients
against finite differences, the spec syntax, evaluation declarations and the image/video shape checks."""

from __future__ import annotations

import pytest
import torch

from chaintune.errors import ChaintuneError
from chaintune.rewards import (
    FramesReward,
    FunctionReward,
    TemporalConsistencyReward,
    VideoFunctionReward,
    VideoReward,
    WeightedSum,
    get_reward,
    is_video_reward,
    reward_evaluation,
    split_terms,
)
from chaintune.rewards.evaluation import heldout_spec


def _smooth(images: torch.Tensor) -> torch.Tensor:
    """A smooth, non-linear image reward (float64-exact), so finite differences are meaningful."""
    x = images.flatten(1)
    return torch.sin(3 * x).mean(1) + (x**2).mean(1) * x[:, 0]


SMOOTH = FunctionReward(_smooth, differentiable=True, name="smooth")


def _fd_check(reward, videos: torch.Tensor, eps: float, rtol: float, seed: int = 0) -> None:
    """Autograd's directional derivative of sum(reward) along random directions against a central difference."""
    g = torch.Generator().manual_seed(seed)
    x = videos.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(reward(x).sum(), x)
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0
    for _ in range(3):
        d = torch.randn(videos.shape, generator=g, dtype=videos.dtype)
        with torch.no_grad():
            fd = (reward(videos + eps * d).sum() - reward(videos - eps * d).sum()) / (2 * eps)
        assert float((grad * d).sum()) == pytest.approx(float(fd), rel=rtol, abs=rtol * 1e-3)


def _videos(n=2, f=4, c=1, h=8, w=8, seed=0, dtype=torch.float64) -> torch.Tensor:
    return torch.rand(n, f, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 0.8 + 0.1


def test_temporal_consistency_values_and_gradient():
    r = get_reward("temporal-consistency")
    assert isinstance(r, TemporalConsistencyReward) and r.differentiable and is_video_reward(r)
    v = _videos()
    expect = -((v[:, 1:] - v[:, :-1]) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(r(v), expect)
    still = v[:, :1].expand(-1, 4, -1, -1, -1)
    torch.testing.assert_close(r(still), torch.zeros(2, dtype=v.dtype))
    one = v[:, :1].clone().requires_grad_(True)  # a single frame: 0, still with a graph
    assert r(one).tolist() == [0.0, 0.0] and r(one).requires_grad
    _fd_check(r, v, eps=1e-6, rtol=1e-6)
    assert torch.autograd.gradcheck(lambda x: r(x), (v[:1, :3, :, :2, :2].clone().requires_grad_(True),))


@pytest.mark.parametrize("agg", ["mean", "min", "max"])
def test_frames_reward_aggregates_and_matches_finite_differences(agg):
    r = FramesReward(SMOOTH, agg)
    assert r.differentiable and r.name == f"frames:{agg}:smooth"
    v = _videos()
    per_frame = _smooth(v.flatten(0, 1)).view(2, 4)
    expect = {"mean": per_frame.mean(1), "min": per_frame.amin(1), "max": per_frame.amax(1)}[agg]
    torch.testing.assert_close(r(v), expect)
    _fd_check(r, v, eps=1e-6, rtol=1e-6)  # min/max: the arg-min/max frame is unique for random frames


def test_frames_of_a_network_reward_matches_finite_differences():
    """``frames:mean:digit:3`` (the shipped CNN): directional derivatives against central differences."""
    r = get_reward("frames:mean:digit:3")
    assert isinstance(r, FramesReward) and r.differentiable and r.name == "frames:mean:digit:3"
    r.inner.network(torch.device("cpu")).double()  # its private copy in float64: exact differences
    _fd_check(r, _videos(f=3), eps=1e-6, rtol=1e-5)


def test_frames_stride_prompts_and_labels_are_per_frame():
    seen = {}

    def score(images, prompts=None, labels=None):
        seen.update(n=len(images), prompts=prompts, labels=labels.tolist())
        return images.mean(dim=(1, 2, 3)) + labels

    inner = FunctionReward(score, differentiable=True, name="score")
    v = _videos(f=5)
    out = FramesReward(inner, "mean", stride=2)(v, prompts=["a", "b"], labels=[3, 5])
    assert seen == {"n": 6, "prompts": ["a"] * 3 + ["b"] * 3, "labels": [3, 3, 3, 5, 5, 5]}  # frames 0, 2, 4
    torch.testing.assert_close(out, v[:, ::2].mean(dim=(1, 2, 3, 4)) + torch.tensor([3.0, 5.0], dtype=v.dtype))
    assert get_reward("frames:max/2:digit:3").name == "frames:max/2:digit:3"


def test_black_box_frames_reward_has_no_graph():
    r = get_reward("frames:min:jpeg-compressibility")
    assert not r.differentiable
    v = _videos(c=3, dtype=torch.float32).requires_grad_(True)
    out = r(v)
    assert out.shape == (2,) and not out.requires_grad and (out < 0).all()


def test_spec_syntax_sums_and_errors():
    assert split_terms("0.7*frames:mean:digit:3+0.3*temporal-consistency") == [
        (0.7, "frames:mean:digit:3"), (0.3, "temporal-consistency")]
    r = get_reward("0.7*frames:mean:digit:3+0.3*temporal-consistency")
    assert isinstance(r, WeightedSum) and r.differentiable and is_video_reward(r)
    v = _videos(dtype=torch.float32)
    parts = r.parts(v)
    torch.testing.assert_close(r(v), 0.7 * parts["frames:mean:digit:3"] + 0.3 * parts["temporal-consistency"])
    for bad, match in [("frames", "frames:AGG:SPEC"), ("frames:mean", "frames:AGG:SPEC"),
                       ("frames:avg:digit:3", "mean, min, max"), ("frames:mean/x:digit:3", "integer K"),
                       ("frames:mean/0:digit:3", "K >= 1"), ("frames:mean:temporal-consistency", "image reward"),
                       ("frames:mean:os:getcwd", "registered image reward"), ("temporal-consistency:2", "no argument")]:
        with pytest.raises(ChaintuneError, match=match):
            get_reward(bad)


def test_image_rewards_refuse_videos_and_video_rewards_refuse_images():
    video, images = _videos(dtype=torch.float32), torch.rand(2, 1, 8, 8)
    with pytest.raises(ChaintuneError, match=r"\[n, C, H, W\]"):
        get_reward("digit:3")(video)
    for spec in ("temporal-consistency", "frames:mean:digit:3"):
        with pytest.raises(ChaintuneError, match="batch of images"):
            get_reward(spec)(images)
    fn = VideoFunctionReward(lambda videos: videos.mean(dim=(1, 2, 3, 4)), differentiable=True, name="v")
    assert isinstance(fn, VideoReward) and fn(video).shape == (2,)
    with pytest.raises(ChaintuneError, match="frames, C, H, W"):
        fn(images)


def test_frames_evaluation_uses_the_image_familys_twin_and_metrics():
    assert heldout_spec("frames:mean:digit:3") == "frames:mean:digit-heldout:3"
    assert heldout_spec("frames:min/2:digit:3") == "frames:min/2:digit-heldout:3"
    assert heldout_spec("frames:mean:jpeg-compressibility") is None
    assert heldout_spec("frames:mean:digit:3+temporal-consistency") is None  # one term without a twin
    row = reward_evaluation("frames:mean:digit:3")(_videos(dtype=torch.float32))
    assert {"eval/reward", "eval/diversity", "eval/heldout_reward", "eval/class_share", "eval/nn_distance"} <= set(row)
