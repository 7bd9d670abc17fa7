"""Datasets: the built-in offline ones (scikit-learn digits, matplotlib font glyphs) and image folders."""

from chaintune.data.digits import DIGITS_SPLIT_SEED, digits_images, digits_split

__all__ = ["digits_images", "digits_split", "DIGITS_SPLIT_SEED"]


def load_dataset(name: str, size: int = 8):
    """Images in [0, 1] ([N, C, size, size]) and integer labels for a dataset id.

    Ids: ``digits`` / ``digits:train`` / ``digits:test`` (scikit-learn). Other ids are added by
    the transfer package (font glyphs, image folders).
    """
    base, _, split = name.partition(":")
    if base == "digits":
        return digits_split(split or "all", size=size)
    from chaintune.data.registry import resolve

    return resolve(name, size)
