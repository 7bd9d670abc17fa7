"""Datasets: the built-in offline ones (scikit-learn digits, matplotlib font glyphs, moving digits), image
folders and folders of clips."""

from __future__ import annotations

from chaintune.data.digits import DIGITS_SPLIT_SEED, digits_images, digits_split
from chaintune.data.registry import resolve, resolve_video

__all__ = ["digits_images", "digits_split", "DIGITS_SPLIT_SEED", "load_dataset"]


def load_dataset(name: str, size: int = 8, *, video: tuple[int, int, int, int] | None = None):
    """Images in [0, 1] ([N, C, size, size]) and integer labels for a dataset id.

    Ids: ``digits`` / ``digits:train`` / ``digits:test`` (scikit-learn). Other ids are added by
    the transfer package (font glyphs, image folders).

    ``video=(frames, channels, height, width)`` (a video model's ``video_shape``): clips ``[N, F, C, H, W]``
    instead, as a :class:`~chaintune.data.registry.LabelledData` that carries their prompts; ids
    ``moving-digits:train`` / ``moving-digits:test`` or a folder of clips (:mod:`chaintune.data.video_folder`).
    """
    if video is not None:
        return resolve_video(name, video)
    base, _, split = name.partition(":")
    if base == "digits":
        return digits_split(split or "all", size=size)

    return resolve(name, size)
