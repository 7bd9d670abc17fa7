"""Moving-digit videos: the procedural clips (chaintune.data.moving) and their rewards, held-out twins and
judge (chaintune.rewards.moving), checked against independent references (numpy centroids, hand-built
clips, finite differences) rather than against the modules' own outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chaintune.data.digits import digits_split
from chaintune.data.moving import (
    DIGIT_SIZE,
    DIRECTIONS,
    JITTER,
    SPEEDS,
    Motion,
    all_prompts,
    moving_digits,
    parse_prompt,
    render,
)
from chaintune.errors import ChaintuneError
from chaintune.rewards import get_reward
from chaintune.rewards.evaluation import reward_evaluation
from chaintune.rewards.moving import (
    MovingDigitReward,
    centroid_crops,
    correlation_track,
    ink_centroids,
    judge,
    judge_summary,
)

FRAMES, CANVAS = 8, 16


def np_centroids(videos: torch.Tensor) -> np.ndarray:
    """Reference ink centroid (x, y) of every frame, [n, F, 2]: np.average with the (channel-mean) pixels as
    weights, no regulariser."""
    x = videos.detach().double().numpy().mean(2)
    n, f, h, w = x.shape
    ys, xs = np.mgrid[0:h, 0:w]
    out = np.zeros((n, f, 2))
    for i in range(n):
        for k in range(f):
            out[i, k] = np.average(xs, weights=x[i, k]), np.average(ys, weights=x[i, k])
    return out


def unit(direction: str) -> np.ndarray:
    return np.array(DIRECTIONS[direction], dtype=np.float64)


def digit_images():
    images, labels = digits_split("test")
    return images, labels


# ---------------------------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("word", list(SPEEDS))
@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_render_moves_the_centroid_at_the_asked_speed_and_keeps_all_ink(direction, word):
    images, labels = digit_images()
    n = 40
    speed = SPEEDS[word]
    motions = [Motion(int(d), direction, speed) for d in labels[:n]]
    clips = render(images[:n], motions, generator=torch.Generator().manual_seed(0))
    assert clips.shape == (n, FRAMES, 1, CANVAS, CANVAS)
    assert float(clips.min()) >= 0.0 and float(clips.max()) <= 1.0
    c = np_centroids(clips)
    steps = np.diff(c, axis=1)  # [n, F-1, 2]: speed along the direction, 0 across it
    np.testing.assert_allclose(steps, np.broadcast_to(unit(direction) * speed, steps.shape), atol=1e-3)
    # every frame holds exactly the digit's own ink: nothing is cut off at the canvas edge, in any frame
    mass = clips.double().sum((-3, -2, -1))
    own = images[:n].double().sum((-3, -2, -1))
    np.testing.assert_allclose(mass.numpy(), own[:, None].expand_as(mass).numpy(), rtol=1e-4)


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_render_paths_are_centred_on_the_canvas_within_the_jitter(direction):
    images, _ = digit_images()
    n = 400
    clips = render(images[:n], [Motion(0, direction, 1.0)] * n, generator=torch.Generator().manual_seed(1))
    # top-left corner of the digit = its centroid on the canvas minus its centroid in its own 8x8 image
    own = np_centroids(images[:n, None])[:, 0]  # [n, 2]
    corner = np_centroids(clips) - own[:, None]  # [n, F, 2]
    room = CANVAS - DIGIT_SIZE
    assert corner.min() > -1e-3 and corner.max() < room + 1e-3  # the whole digit stays on the canvas
    # the path's midpoint: the canvas centre, shifted by at most the jitter on each axis (along the motion by
    # at most what the canvas leaves: 8 px of room - 7 px of travel = 2 x 0.5 px)
    axis = 0 if DIRECTIONS[direction][0] else 1
    slack = np.full(2, JITTER)
    slack[axis] = min(JITTER, (room - 7) / 2)
    off = corner.mean(1) - room / 2
    assert (np.abs(off) <= slack + 1e-3).all()
    # the jitter is used (not a fixed path): the midpoints spread over most of [-slack, slack] on both axes
    assert (off.min(0) < -0.8 * slack).all() and (off.max(0) > 0.8 * slack).all()
    # with no jitter every clip of one direction follows the same path
    fixed = render(images[:8], [Motion(0, direction, 1.0)] * 8, jitter=0.0)
    assert np.abs(np.diff(np_centroids(fixed) - own[:8, None], axis=0)).max() < 1e-4


def test_render_on_a_larger_canvas_and_refusals():
    images, _ = digit_images()
    clips = render(images[:6], [Motion(1, "down", 2.0)] * 3 + [Motion(1, "left", 0.5)] * 3, frames=5, canvas=24,
                   generator=torch.Generator().manual_seed(2))
    assert clips.shape == (6, 5, 1, 24, 24)
    steps = np.diff(np_centroids(clips), axis=1)
    np.testing.assert_allclose(steps[:3], np.broadcast_to(unit("down") * 2.0, steps[:3].shape), atol=1e-3)
    np.testing.assert_allclose(steps[3:], np.broadcast_to(unit("left") * 0.5, steps[3:].shape), atol=1e-3)
    with pytest.raises(ChaintuneError, match="leaves"):  # 9 px of travel on 8 px of room
        render(images[:1], [Motion(1, "right", 1.0)], frames=10)
    with pytest.raises(ChaintuneError, match="motions"):
        render(images[:2], [Motion(1, "right", 1.0)])


def test_prompts_round_trip():
    prompts = all_prompts()
    assert len(prompts) == len(set(prompts)) == 10 * len(DIRECTIONS) * len(SPEEDS)
    parsed = [parse_prompt(p) for p in prompts]
    assert [m.prompt for m in parsed] == prompts
    assert {(m.digit, m.direction, m.speed) for m in parsed} == \
        {(d, k, v) for d in range(10) for k in DIRECTIONS for v in SPEEDS.values()}
    assert parse_prompt("  A 7 Moving LEFT slowly ") == Motion(7, "left", SPEEDS["slowly"])
    assert parse_prompt("a 0 moving down") == Motion(0, "down", SPEEDS[""])


@pytest.mark.parametrize("prompt", ["", "a 7", "7 moving left", "a 12 moving left", "a seven moving left",
                                    "a 7 moving sideways", "a 7 moving left quickly", "a 7 moving left slowly please",
                                    "a 7 moving  left"])
def test_bad_prompts_are_refused(prompt):
    with pytest.raises(ChaintuneError, match="moving-digits prompt"):
        parse_prompt(prompt)
    with pytest.raises(ChaintuneError):
        moving_digits(1, "test", prompts=[prompt])


def test_moving_digits_follows_given_prompts():
    prompts = ["a 4 moving up", "a 9 moving right slowly"]
    clips, out = moving_digits(2, "test", generator=torch.Generator().manual_seed(3), prompts=prompts)
    assert out == prompts and clips.shape == (2, FRAMES, 1, CANVAS, CANVAS)
    disp = np_centroids(clips)[:, -1] - np_centroids(clips)[:, 0]
    np.testing.assert_allclose(disp[0], unit("up") * 1.0 * (FRAMES - 1), atol=1e-3)
    np.testing.assert_allclose(disp[1], unit("right") * 0.5 * (FRAMES - 1), atol=1e-3)


# ---------------------------------------------------------------------------------- centroids and crops


@pytest.mark.parametrize("channels", [1, 3])
def test_ink_centroids_match_numpy(channels):
    g = torch.Generator().manual_seed(4)
    videos = torch.rand(3, 4, channels, 9, 13, generator=g, dtype=torch.float64)
    videos[0, 1] = videos[0, 1] ** 8  # ink concentrated in a few pixels: a centroid far from the centre
    c = ink_centroids(videos)
    assert c.shape == (3, 4, 2)
    # tolerance: ink_centroids adds a tiny blank-frame regulariser (1e-3 ink at the centre), which moves a
    # centroid by at most 1e-3 * (distance to centre <= 7) / (ink >= ~5 here) ~ 1e-3
    np.testing.assert_allclose(c.numpy(), np_centroids(videos), atol=2e-3)
    np.testing.assert_allclose(c[1:].numpy(), np_centroids(videos[1:]), atol=2e-4)  # ~58 ink: bias < 1.2e-4


def test_ink_centroid_of_a_blank_frame_is_the_centre_and_negative_ink_is_ignored():
    blank = torch.zeros(1, 2, 1, 9, 13)
    np.testing.assert_allclose(ink_centroids(blank).numpy(), np.broadcast_to([6.0, 4.0], (1, 2, 2)), atol=1e-6)
    g = torch.Generator().manual_seed(5)
    v = torch.rand(2, 3, 1, 9, 13, generator=g, dtype=torch.float64) * 2 - 1
    np.testing.assert_allclose(ink_centroids(v).numpy(), ink_centroids(v.clamp(min=0)).numpy(), atol=1e-12)


def point_symmetric_pattern(g: torch.Generator) -> torch.Tensor:
    """8x8 pattern in [0.5, 1] symmetric under a 180-degree turn (so its centroid is the window centre, 3.5, 3.5)
    but not under transposition (so a crop with x and y swapped would not match)."""
    r = torch.rand(8, 8, generator=g, dtype=torch.float64) * 0.5 + 0.5
    p = (r + r.flip(0, 1)) / 2
    assert (p - p.T).abs().max() > 0.1
    return p


def test_centroid_crops_return_a_digit_pasted_at_the_canvas_centre_exactly():
    g = torch.Generator().manual_seed(6)
    h, w = 14, 18  # not square: a swapped width/height would move the window
    oy, ox = (h - 8) // 2, (w - 8) // 2  # the pattern's centroid lands on the canvas centre ((w-1)/2, (h-1)/2)
    n, f = 2, 3
    patterns = torch.stack([point_symmetric_pattern(g) for _ in range(n * f)])
    videos = torch.zeros(n, f, 1, h, w, dtype=torch.float64)
    videos[:, :, 0, oy:oy + 8, ox:ox + 8] = patterns.view(n, f, 8, 8)
    crops = centroid_crops(videos)
    assert crops.shape == (n * f, 1, 8, 8)
    torch.testing.assert_close(crops[:, 0], patterns, atol=1e-5, rtol=0)


@pytest.mark.parametrize("oy,ox", [(0, 0), (6, 10), (1, 7), (5, 2)])
def test_centroid_crops_follow_a_digit_anywhere_on_the_canvas(oy, ox):
    g = torch.Generator().manual_seed(7)
    pattern = point_symmetric_pattern(g)
    videos = torch.zeros(1, 2, 1, 14, 18, dtype=torch.float64)
    videos[0, 0, 0, oy:oy + 8, ox:ox + 8] = pattern
    videos[0, 1, 0, 14 - 8 - oy:14 - oy, 18 - 8 - ox:18 - ox] = pattern.flip(0)  # mirrored position, other pattern
    crops = centroid_crops(videos)[:, 0]
    # off the centre the regulariser of ink_centroids pulls the window by <= 1e-3 * 6 / 32 px: crops within 1e-3
    torch.testing.assert_close(crops[0], pattern, atol=1e-3, rtol=0)
    torch.testing.assert_close(crops[1], pattern.flip(0), atol=1e-3, rtol=0)


# ------------------------------------------------------------------------------------------------ tracking


def test_correlation_track_on_rendered_clips():
    images, labels = digit_images()
    n = 64
    dirs = list(DIRECTIONS)
    motions = [Motion(int(labels[i]), dirs[i % 4], SPEEDS["" if i % 8 < 4 else "slowly"]) for i in range(n)]
    clips = render(images[:n], motions, generator=torch.Generator().manual_seed(8))
    track = correlation_track(clips).double().numpy()
    assert track.shape == (n, FRAMES, 2)
    np.testing.assert_allclose(track[:, 0], 0.0, atol=1e-9)
    expected = np.stack([unit(m.direction) * m.speed * (FRAMES - 1) for m in motions])
    normal = np.array([m.speed == 1.0 for m in motions])
    # 1 px/frame: every frame is frame 0 shifted by whole pixels, so the sub-pixel refinement is exact
    for k in range(FRAMES):
        np.testing.assert_allclose(track[normal, k], expected[normal] * k / (FRAMES - 1), atol=1e-3)
    # 0.5 px/frame: the last frame is rendered at another sub-pixel phase (blurred differently) than frame 0;
    # the parabola through the correlation peak is then biased by up to ~0.25 px (seen over 1000 clips),
    # not the 0.1 px one might expect: ~0.035 px/frame over the 7 frames of the clip
    np.testing.assert_allclose(track[~normal, -1], expected[~normal], atol=0.3)
    speed = get_reward("motion-heldout")(clips, [m.prompt for m in motions])
    np.testing.assert_allclose(speed.numpy(), [m.speed for m in motions], atol=0.05)


def test_correlation_track_is_exact_for_integer_shifts_and_keeps_clips_apart():
    g = torch.Generator().manual_seed(9)
    h, w = 14, 18
    paths = [[(0, 0), (2, -1), (-3, 1), (4, 3), (-4, -3)],  # (dx, dy) of each frame relative to frame 0
             [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0)],
             [(0, 0), (0, -2), (-1, 3), (1, 1), (0, 0)]]
    videos = torch.zeros(len(paths), 5, 1, h, w, dtype=torch.float64)
    for i, path in enumerate(paths):
        canvas = torch.zeros(h, w, dtype=torch.float64)
        canvas[4:10, 6:11] = torch.rand(6, 5, generator=g, dtype=torch.float64)  # margins 4 / 6: no wrap-around
        for k, (dx, dy) in enumerate(path):
            videos[i, k, 0] = torch.roll(canvas, shifts=(dy, dx), dims=(0, 1))
    track = correlation_track(videos.clone().requires_grad_(True))
    assert not track.requires_grad
    torch.testing.assert_close(track.double(), torch.tensor(paths, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shift", [7, 8, -8])
def test_correlation_track_at_the_edge_of_its_search_window(shift):
    # on a 16 px canvas the search radius is 8 px, and a digit can move 8 px without leaving the canvas
    # (room = 16 - 8): a shift of exactly the radius must read as itself, not half a pixel further
    g = torch.Generator().manual_seed(21)
    canvas = torch.zeros(CANVAS, CANVAS, dtype=torch.float64)
    x0 = 2 if shift > 0 else 10
    canvas[6:10, x0:x0 + 4] = torch.rand(4, 4, generator=g, dtype=torch.float64) + 0.5
    clip = torch.stack([canvas, torch.roll(canvas, shift, 1)])[None, :, None]
    torch.testing.assert_close(correlation_track(clip)[0, -1].double(), torch.tensor([float(shift), 0.0],
                               dtype=torch.float64), atol=1e-6, rtol=0)
    assert get_reward("motion-heldout:right")(clip).item() == pytest.approx(shift, abs=1e-5)


# ----------------------------------------------------------------------------------------------- gradients


def smooth_videos(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Real clips in float64, lifted off 0 and 1 and jittered: no pixel sits at a clamp or kink."""
    g = torch.Generator().manual_seed(seed)
    clips, prompts = moving_digits(n, "test", generator=g)
    return clips.double() * 0.8 + 0.1 + 0.01 * torch.randn(clips.shape, generator=g, dtype=torch.float64), prompts


def directional_errors(reward, videos, prompts, step: float, directions: int = 4, seed: int = 0) -> float:
    """||autograd - central finite difference|| / ||autograd|| over a few random directions."""
    x = videos.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(reward(x, prompts).sum(), x)
    assert grad.abs().sum() > 0
    g = torch.Generator().manual_seed(seed)
    exact, numeric = [], []
    with torch.no_grad():
        for _ in range(directions):
            d = torch.randn(videos.shape, generator=g, dtype=torch.float64)
            exact.append(float((grad * d).sum()))
            plus = reward(videos + step * d, prompts).double().sum()
            minus = reward(videos - step * d, prompts).double().sum()
            numeric.append(float((plus - minus) / (2 * step)))
    exact, numeric = np.array(exact), np.array(numeric)
    return float(np.linalg.norm(exact - numeric) / np.linalg.norm(exact))


@pytest.mark.parametrize("spec", ["motion:right", "motion", "smoothness"])
def test_centroid_reward_gradients_match_finite_differences(spec):
    videos, prompts = smooth_videos(2, seed=10)
    reward = get_reward(spec)
    assert reward.differentiable
    out = reward(videos, prompts)
    assert out.dtype == torch.float64  # these rewards keep float64, so the check can be tight
    assert directional_errors(reward, videos, prompts, step=1e-4) < 1e-5


class SmoothMovingDigit(MovingDigitReward):
    """MovingDigitReward with a smooth float64 stand-in for the digit CNN; everything else as shipped."""

    def load(self):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.Tanh(),
                                   torch.nn.Linear(32, 10)).double()


def clips_away_from_crop_kinks(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` clips whose every crop window sits >= 0.1 px from where bilinear sampling has a kink.

    centroid_crops samples at centroid - 3.5 + i (i = 0..7): the crop is piecewise linear in the centroid,
    with kinks when a centroid coordinate crosses k + 0.5. A finite-difference step that crosses one compares
    two different linear pieces, so the precise check uses clips that stay away from them."""
    videos, prompts = smooth_videos(200, seed)
    frac = ink_centroids(videos).frac()
    ok = ((frac - 0.5).abs() > 0.1).flatten(1).all(1).nonzero().flatten()[:n]
    assert len(ok) == n, "not enough clips away from the crop kinks; change the seed"
    return videos[ok], [prompts[i] for i in ok.tolist()]


@pytest.mark.parametrize("digit", [3, None])
def test_moving_digit_gradient_matches_finite_differences(digit):
    # The shipped CNN has max-pooling (kinks) and the reward returns float32 log-probabilities (logits are cast
    # to float32 whatever the network's dtype), so a tight finite-difference check of the reward's own code
    # (centroid -> crop -> network -> log p(K), prompt digits) uses a smooth float64 network and a 1e-2 step:
    # truncation error O(step^2), float32 rounding ~1e-6 / 2e-2, both far below the 1e-3 tolerance.
    videos, prompts = clips_away_from_crop_kinks(2, seed=11)
    reward = SmoothMovingDigit(digit)
    assert reward.differentiable and reward.needs_prompts == (digit is None)
    assert directional_errors(reward, videos, prompts if digit is None else None, step=1e-2) < 1e-3


@pytest.mark.parametrize("spec", ["moving-digit:3", "moving-digit"])
def test_moving_digit_gradient_with_the_shipped_cnn(spec):
    # End to end with the real digit CNN, cast to float64 so only the final log-softmax is float32. A small step
    # (3e-5) rarely crosses a max-pool switch, but float32 rounding (~5e-7 / 6e-5) limits the check to a few
    # percent; gradients that miss the path through the ink centroid are off by ~60%, so this still bites.
    videos, prompts = smooth_videos(2, seed=12)
    reward = get_reward(spec)
    reward.network(torch.device("cpu")).double()
    assert directional_errors(reward, videos, prompts, step=3e-5) < 3e-2


def test_moving_digit_reads_the_digit_from_the_prompt():
    videos, _ = smooth_videos(3, seed=13)
    by_prompt = get_reward("moving-digit")(videos.float(), ["a 3 moving left", "a 5 moving up", "a 3 moving down"])
    fixed3, fixed5 = get_reward("moving-digit:3")(videos.float()), get_reward("moving-digit:5")(videos.float())
    torch.testing.assert_close(by_prompt, torch.stack([fixed3[0], fixed5[1], fixed3[2]]))
    # the value: mean over frames of log p(K | crop at the ink centroid), the CNN for training, the MLP held out
    from chaintune.classifiers import load_classifier

    crops = centroid_crops(videos.float())
    for spec, net in (("moving-digit:3", "digits-cnn"), ("moving-digit-heldout:3", "digits-mlp")):
        logp = torch.log_softmax(load_classifier(net).eval()(crops), -1)[:, 3].view(3, FRAMES).mean(1)
        torch.testing.assert_close(get_reward(spec)(videos.float()), logp, atol=1e-5, rtol=1e-5)
    with pytest.raises(ChaintuneError):
        get_reward("moving-digit")(videos.float())


def test_motion_and_smoothness_values_against_references():
    g = torch.Generator().manual_seed(20)
    videos = torch.rand(3, 5, 1, 9, 13, generator=g, dtype=torch.float64)  # no constant velocity here
    c = np_centroids(videos)
    for direction in DIRECTIONS:  # first-to-last centroid displacement along DIR per frame
        expected = ((c[:, -1] - c[:, 0]) @ unit(direction)) / (5 - 1)
        np.testing.assert_allclose(get_reward(f"motion:{direction}")(videos).numpy(), expected, atol=2e-4)
    acc = c[:, 2:] - 2 * c[:, 1:-1] + c[:, :-2]
    np.testing.assert_allclose(get_reward("smoothness")(videos).numpy(), -(acc**2).sum(-1).mean(1), atol=1e-3)
    # a pattern at x = 0, 1, 4, 9, 16 (+ y = 0, 0, 1, 3, 6): accelerations (2, 1), (2, 1), (2, 1) -> -5 on both twins
    canvas = torch.zeros(20, 36, dtype=torch.float64)  # correlation_track searches +-max(H, W) // 2 = 18 px
    canvas[2:8, 2:7] = torch.rand(6, 5, generator=g, dtype=torch.float64) + 0.5
    xs, ys = [0, 1, 4, 9, 16], [0, 0, 1, 3, 6]
    clip = torch.stack([torch.roll(canvas, (y, x), (0, 1)) for x, y in zip(xs, ys, strict=True)])[None, :, None]
    assert get_reward("smoothness")(clip).item() == pytest.approx(-5.0, abs=1e-2)  # centroid regulariser: ~1e-3
    assert get_reward("smoothness-heldout")(clip).item() == pytest.approx(-5.0, abs=1e-5)
    # constant velocity (real clips at 1 px/frame) is perfectly smooth on both
    images, _ = digit_images()
    real = render(images[:8], [Motion(0, d, 1.0) for d in DIRECTIONS] * 2, generator=g)
    assert get_reward("smoothness")(real).abs().max().item() < 1e-5
    assert get_reward("smoothness-heldout")(real).abs().max().item() < 1e-5


# ------------------------------------------------------------------------------------------------ black box


def test_video_compressibility_is_black_box_and_its_twin_ranks_clips_the_same():
    g = torch.Generator().manual_seed(14)
    clips, _ = moving_digits(2, "test", generator=g)
    noise = torch.rand(1, FRAMES, 1, CANVAS, CANVAS, generator=g)
    videos = torch.cat([torch.zeros(1, FRAMES, 1, CANVAS, CANVAS), clips[:1], (clips[1:] + 0.3 * noise).clamp(0, 1),
                        noise])  # blank, clean digit, noisy digit, noise: ever less compressible
    x = videos.clone().requires_grad_(True)
    reward = get_reward("video-compressibility")
    assert not reward.differentiable
    out = reward(x)
    assert not out.requires_grad and out.shape == (4,)
    assert bool((out < 0).all())  # minus a size
    assert out[0] > out[1] > out[2] > out[3]
    twin_spec = reward_evaluation("video-compressibility").heldout_spec
    assert twin_spec == "video-compressibility-heldout"
    twin = get_reward(twin_spec)
    assert not twin.differentiable
    held = twin(x)
    assert not held.requires_grad
    assert held[0] > held[1] > held[2] > held[3]


# --------------------------------------------------------------------------------- held-out twins disagree


def test_fake_motion_moves_the_centroid_but_not_the_correlation_track():
    images, _ = digit_images()
    digit = images[5, 0]
    fake = torch.zeros(1, FRAMES, 1, CANVAS, CANVAS)
    fake[0, :, 0, 4:12, 1:9] = digit  # the digit stays where it is ...
    for k in range(FRAMES):
        fake[0, k, 0, 6:9, 12:15] = k / (FRAMES - 1)  # ... while a blob of ink fades in on its right
    assert get_reward("motion:right")(fake).item() > 0.2
    assert abs(get_reward("motion-heldout:right")(fake).item()) < 0.1
    assert reward_evaluation("motion:right").heldout_spec == "motion-heldout:right"
    # a digit that really moves right scores its speed on both
    real = render(images[5:6], [Motion(0, "right", 1.0)], generator=torch.Generator().manual_seed(15))
    assert get_reward("motion:right")(real).item() == pytest.approx(1.0, abs=1e-3)
    assert get_reward("motion-heldout:right")(real).item() == pytest.approx(1.0, abs=1e-3)
    assert get_reward("motion:left")(real).item() == pytest.approx(-1.0, abs=1e-3)


# ------------------------------------------------------------------------------------------------- judge


def test_judge_passes_real_clips():
    clips, prompts = moving_digits(200, "test", generator=torch.Generator().manual_seed(16))
    s = judge_summary(clips, prompts)
    assert s["identity"] >= 0.8
    assert s["direction"] == 1.0
    assert s["speed_error"] < 0.05
    assert s["follows_prompt"] >= 0.8
    assert s["ink"] == pytest.approx(1.0, abs=0.15)
    # the same clips judged against another digit's prompt: the identity falls, the motion still passes
    wrong = [f"a {(m.digit + 1) % 10} moving {m.direction}" + (" slowly" if m.speed == 0.5 else "")
             for m in map(parse_prompt, prompts)]
    w = judge_summary(clips, wrong)
    assert w["identity"] < 0.2 and w["follows_prompt"] < 0.2 and w["direction"] == 1.0


def test_judge_fails_noise_and_blank_clips():
    g = torch.Generator().manual_seed(17)
    _, prompts = moving_digits(50, "test", generator=g)
    s = judge_summary(torch.rand(50, FRAMES, 1, CANVAS, CANVAS, generator=g), prompts)
    assert s["identity"] < 0.3 and s["direction"] < 0.3 and s["follows_prompt"] < 0.3
    blank = judge(torch.zeros(50, FRAMES, 1, CANVAS, CANVAS), prompts)
    assert float(blank["direction"].max()) == 0.0 and float(blank["ink"].max()) == 0.0


def test_judge_fails_clips_that_move_the_wrong_way():
    images, labels = digit_images()
    n = 64
    dirs = list(DIRECTIONS)
    asked = [Motion(int(labels[i]), dirs[i % 4], SPEEDS["" if i % 8 < 4 else "slowly"]) for i in range(n)]
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    turned = {"left": "up", "up": "right", "right": "down", "down": "left"}
    prompts = [m.prompt for m in asked]
    for wrong in (opposite, turned):
        clips = render(images[:n], [Motion(m.digit, wrong[m.direction], m.speed) for m in asked],
                       generator=torch.Generator().manual_seed(18))
        j = judge(clips, prompts)
        assert float(j["direction"].max()) == 0.0
        speeds = torch.tensor([m.speed for m in asked])
        # opposite: measured -speed along the asked way (error 2*speed); turned: 0 along it (error = speed)
        expected = 2 * speeds if wrong is opposite else speeds
        torch.testing.assert_close(j["speed_error"], expected, atol=1e-3, rtol=0)
        assert judge_summary(clips, prompts)["follows_prompt"] == 0.0
    with pytest.raises(ChaintuneError, match="one prompt per clip"):
        judge(clips, prompts[:-1])


# ---------------------------------------------------------------------------------------------- registry


def test_registry_refuses_bad_arguments_clearly():
    with pytest.raises(ChaintuneError) as e:
        get_reward("motion:sideways")
    msg = str(e.value)
    assert msg.count("sideways") == 1 and all(d in msg for d in DIRECTIONS)
    with pytest.raises(ChaintuneError, match="0..9"):
        get_reward("moving-digit:12")
    with pytest.raises(ChaintuneError):
        get_reward("moving-digit-heldout:-1")
    with pytest.raises(ChaintuneError, match="no argument"):
        get_reward("smoothness:3")
    with pytest.raises(ChaintuneError, match="prompts"):
        get_reward("motion")(torch.zeros(1, FRAMES, 1, CANVAS, CANVAS))


@pytest.mark.parametrize("spec,twin", [("moving-digit:3", "moving-digit-heldout:3"),
                                       ("moving-digit", "moving-digit-heldout"), ("motion:left", "motion-heldout:left"),
                                       ("motion", "motion-heldout"), ("smoothness", "smoothness-heldout")])
def test_heldout_twins(spec, twin):
    assert reward_evaluation(spec).heldout_spec == twin
    assert reward_evaluation(twin).heldout_spec == spec


def test_moving_digit_evaluation_row():
    g = torch.Generator().manual_seed(19)
    prompts = ["a 3 moving left"] * 10 + ["a 3 moving up slowly"] * 10
    clips, _ = moving_digits(20, "test", generator=g, prompts=prompts)
    evaluation = reward_evaluation("moving-digit:3")
    row = evaluation(clips, prompts)
    for key in ("eval/reward", "eval/heldout_reward", "eval/nn_distance", "eval/identity", "eval/class_share",
                "eval/direction", "eval/follows_prompt"):
        assert key in row, key
    # every prompt asks for a 3: the share of frames the MLP reads as 3 is the judge's identity
    assert row["eval/class_share"] == pytest.approx(row["eval/identity"])
    assert row["eval/direction"] == 1.0
    noise = evaluation(torch.rand(clips.shape, generator=g), prompts)
    assert noise["eval/nn_distance"] > row["eval/nn_distance"] + 0.1  # noise crops are far from real digits
    assert noise["eval/reward"] < row["eval/reward"]


@pytest.mark.parametrize("spec", ["moving-digit:3", "moving-digit-heldout:3", "motion:left", "motion-heldout:left",
                                  "smoothness", "smoothness-heldout", "video-compressibility",
                                  "video-compressibility-heldout"])
def test_video_rewards_refuse_images(spec):
    with pytest.raises(ChaintuneError, match="videos"):
        get_reward(spec)(torch.rand(2, 1, CANVAS, CANVAS))
