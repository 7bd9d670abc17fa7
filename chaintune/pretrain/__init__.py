"""Pretraining the small pixel-space models chaintune ships (``chaintune pretrain``): a UNet DDPM on images or a
Wan transformer (flow matching) on text-to-video clips."""

from chaintune._exports import lazy
from chaintune.pretrain.config import ArchConfig, PretrainConfig

__all__ = ["ArchConfig", "PretrainConfig", "pretrain", "OBJECTIVES", "PretrainObjective", "VideoPretrainObjective",
           "build_unet", "build_wan_video", "check_unet_arch", "check_wan_arch", "char_tokenizer"]
__getattr__ = lazy(__name__, dict.fromkeys(
    ["pretrain", "OBJECTIVES", "PretrainObjective", "VideoPretrainObjective", "build_unet", "build_wan_video",
     "check_unet_arch", "check_wan_arch", "char_tokenizer"], "chaintune.pretrain.objective"))
