"""The built-in reward families, registered with :func:`chaintune.rewards.registry.register_reward`.

The registry is the mechanism (names, specs, user code); this module is its content. The package's ``__init__``
imports it, so every spec resolves whichever rewards module was imported first, and no family module imports the
registry's content back (no import circle).
"""

from __future__ import annotations

from chaintune.errors import ChaintuneError, shown
from chaintune.rewards import builtin, control, moving, scale, video
from chaintune.rewards.base import BlackBox
from chaintune.rewards.evaluation import digit_metrics
from chaintune.rewards.registry import (
    HeldoutFn,
    MetricsFn,
    family_of,
    get_reward,
    int_arg,
    needs_arg,
    no_arg,
    register_reward,
)


def _twin(name: str) -> HeldoutFn:
    """The same family argument under another family: ``digit:3`` -> ``digit-heldout:3``."""
    return lambda arg: name if arg is None or arg == "" else f"{name}:{arg}"


def _digit_metrics(family: str, judge: str) -> MetricsFn:
    """``class_share`` by ``judge`` (the classifier the family's training never sees) and ``nn_distance``."""
    def metrics(arg, images, prompts, labels):
        return digit_metrics(images, int_arg(family, arg, required=False), labels, judge=judge)
    return metrics


def _blackbox_spec(arg: str | None) -> str:
    """SPEC of ``blackbox:SPEC``: a registered reward (a module:function would import code unseen by the
    --trust-code guard; wrap your own function in Python: ``BlackBox(FunctionReward(fn))``)."""
    spec = (arg or "").strip()
    if not spec or family_of(spec) is None:
        raise ChaintuneError(f"blackbox:SPEC takes a registered reward (e.g. blackbox:smoothness, "
                             f"blackbox:digit:3), got {shown(spec)}")
    return spec


def _blackbox(arg: str | None):
    spec = _blackbox_spec(arg)
    return BlackBox(get_reward(spec), spec)


def _blackbox_heldout(arg: str | None) -> str | None:
    """The inner reward's held-out twin, as it is (the judge sees the samples, it is not trained on)."""
    fam = family_of(_blackbox_spec(arg))
    return fam[1].heldout(fam[2]) if fam is not None and fam[1].heldout is not None else None


def _blackbox_metrics(arg: str | None, images, prompts, labels) -> dict[str, float]:
    fam = family_of(_blackbox_spec(arg))
    return {} if fam is None or fam[1].metrics is None else fam[1].metrics(fam[2], images, prompts, labels)


def _register_builtins() -> None:
    register_reward("digit", lambda a: builtin.DigitReward(int_arg("digit", a, required=False)), "digit:K",
                    "log p(K | image) from the shipped digit CNN; plain 'digit' uses each sample's class label", True,
                    heldout=_twin("digit-heldout"), metrics=_digit_metrics("digit", "digits-mlp"))
    register_reward("digit-heldout",
                    lambda a: builtin.DigitReward(int_arg("digit-heldout", a, required=False), "digits-mlp",
                                                  "digit-heldout"),
                    "digit-heldout:K", "log p(K | image) from the held-out digit MLP (a judge training never sees)",
                    True, heldout=_twin("digit"), metrics=_digit_metrics("digit-heldout", "digits-cnn"))
    register_reward("digit-blackbox",
                    lambda a: builtin.DigitBlackBoxReward(int_arg("digit-blackbox", a, required=False)),
                    "digit-blackbox:K", "digit:K as a black box: log p(K) of the 8-bit image, no gradient",
                    heldout=_twin("digit-heldout"), metrics=_digit_metrics("digit", "digits-mlp"))
    register_reward("jpeg-compressibility", no_arg("jpeg-compressibility", lambda: builtin.JpegReward(True)),
                    description="-(JPEG size in kB), PIL quality 95 (DDPO); black-box")
    register_reward("jpeg-incompressibility", no_arg("jpeg-incompressibility", lambda: builtin.JpegReward(False)),
                    description="+(JPEG size in kB), PIL quality 95 (DDPO); black-box")
    register_reward("imagenet", needs_arg("imagenet", "imagenet:CLASS (index or name)", builtin.ImageNetReward),
                    "imagenet:CLASS", "log p(CLASS | image) from EfficientNet-Lite0 (extra chaintune[imagenet])",
                    True)
    register_reward("aesthetic", scale.AestheticReward, "aesthetic:clip=DIR,head=FILE",
                    "LAION aesthetic predictor (CLIP ViT-L/14 + MLP), local weights", True)
    register_reward("pickscore", scale.PickScoreReward, "pickscore:model=DIR,processor=DIR",
                    "PickScore (CLIP-H), local weights; needs prompts", True)
    register_reward("hpsv2", scale.HPSv2Reward, "hpsv2:FILE",
                    "HPSv2 x100 (needs hpsv2 + open-clip-torch), local checkpoint; needs prompts", True)
    register_reward("imagereward", scale.ImageRewardReward, "imagereward:ckpt=FILE,med_config=FILE",
                    "ImageReward (needs image-reward), local checkpoint; needs prompts", True)
    register_reward("blackbox", _blackbox, "blackbox:SPEC",
                    "reward SPEC as a black box: scored on the 8-bit image (or clip), no gradient reaches it",
                    heldout=_blackbox_heldout, metrics=_blackbox_metrics)
    register_reward("frames", video.frames_reward, "frames:AGG[/K]:SPEC",
                    "image reward SPEC on every (K-th) frame of a video, AGG = mean|min|max over frames; "
                    "differentiable when SPEC is", True, heldout=video.frames_heldout, metrics=video.frames_metrics)
    register_reward("temporal-consistency", no_arg("temporal-consistency", video.TemporalConsistencyReward),
                    description="-(mean squared difference of consecutive video frames); a still video scores 0",
                    differentiable=True)
    def fixed(name: str):
        return lambda arg: name

    def digit_arg(name: str):
        return lambda a: int_arg(name, a, required=False)

    def direction_arg(a: str | None) -> str | None:
        return None if a is None or a == "" else a.strip().lower()

    register_reward("moving-digit", lambda a: moving.MovingDigitReward(digit_arg("moving-digit")(a)),
                    "moving-digit[:K]", "mean over frames of log p(K | 8x8 crop at the ink centroid), digit CNN; "
                    "without K the prompt's digit", True, heldout=_twin("moving-digit-heldout"),
                    metrics=moving.metrics)
    register_reward("moving-digit-heldout",
                    lambda a: moving.MovingDigitReward(digit_arg("moving-digit-heldout")(a), "digits-mlp",
                                                       "moving-digit-heldout"),
                    "moving-digit-heldout[:K]", "moving-digit judged by the held-out digit MLP", True,
                    heldout=_twin("moving-digit"), metrics=moving.metrics)
    register_reward("motion", lambda a: moving.MotionReward(direction_arg(a)), "motion[:DIR]",
                    "ink-centroid velocity along DIR (left|right|up|down; without DIR the prompt's), px/frame",
                    True, heldout=_twin("motion-heldout"), metrics=moving.metrics)
    register_reward("motion-heldout", lambda a: moving.MotionReward(direction_arg(a), heldout=True),
                    "motion-heldout[:DIR]", "displacement by frame cross-correlation along DIR, px/frame",
                    heldout=_twin("motion"), metrics=moving.metrics)
    register_reward("smoothness", no_arg("smoothness", moving.SmoothnessReward), "smoothness",
                    "-(mean squared acceleration of the ink centroid), px/frame^2", True,
                    heldout=fixed("smoothness-heldout"), metrics=moving.metrics)
    register_reward("smoothness-heldout", no_arg("smoothness-heldout", lambda: moving.SmoothnessReward(True)),
                    "smoothness-heldout", "-(mean squared acceleration of the cross-correlation track)",
                    heldout=fixed("smoothness"), metrics=moving.metrics)
    register_reward("video-compressibility", no_arg("video-compressibility", moving.VideoCompressibilityReward),
                    "video-compressibility", "-(animated GIF size in kB); black-box",
                    heldout=fixed("video-compressibility-heldout"), metrics=moving.metrics)
    register_reward("video-compressibility-heldout",
                    no_arg("video-compressibility-heldout", lambda: moving.VideoCompressibilityReward(True)),
                    "video-compressibility-heldout", "-(LZMA size of the raw clip in kB); black-box",
                    heldout=fixed("video-compressibility"), metrics=moving.metrics)

    # ControlNets (chaintune align --controlnet RUN): the sample against the control it was drawn with
    register_reward("edge-consistency", no_arg("edge-consistency", lambda: control.ConsistencyReward("edges")),
                    "edge-consistency", "soft IoU of the sample's soft Sobel edges with the control's edges "
                    "(ControlNet++'s consistency reward)", True, heldout=fixed("edge-chamfer"))
    register_reward("edge-chamfer", no_arg("edge-chamfer", control.EdgeChamferReward), "edge-chamfer",
                    "-(symmetric chamfer distance, px) between the sample's edge map and the control's; black-box",
                    heldout=fixed("edge-consistency"))
    register_reward("silhouette-consistency",
                    no_arg("silhouette-consistency", lambda: control.ConsistencyReward("silhouette")),
                    "silhouette-consistency", "soft IoU of the sample's soft silhouette with the control", True,
                    heldout=fixed("silhouette-iou"))
    register_reward("silhouette-iou", no_arg("silhouette-iou", control.SilhouetteIoUReward), "silhouette-iou",
                    "IoU of the sample's silhouette (binarised at 0.5) with the control's; black-box",
                    heldout=fixed("silhouette-consistency"))


_register_builtins()
