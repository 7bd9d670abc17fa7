"""ControlNet training with Diff-Tuning's timestep law (``chaintune controlnet``), condition extractors, and the
pixel-space class-token base ``builtin:digits-cond``."""

from chaintune.controlnet.config import ControlNetConfig

__all__ = ["ControlNetConfig", "train_controlnet", "load_controlled", "sample_controlled"]


def __getattr__(name: str):  # torch-free import of the config (the CLI's --help)
    if name in ("train_controlnet", "sample_controlled"):
        from chaintune.controlnet import trainer

        return getattr(trainer, name)
    if name == "load_controlled":
        from chaintune.backends.controlled import load_controlled

        return load_controlled
    raise AttributeError(f"module 'chaintune.controlnet' has no attribute {name!r}")
