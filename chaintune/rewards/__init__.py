"""Rewards: one interface for differentiable and black-box rewards.

A reward is a callable ``reward(images, prompts=None, labels=None, metadata=None) -> Tensor[n]`` on
images [n, C, H, W] in [0, 1] (video rewards, :mod:`chaintune.rewards.video`: videos [n, F, C, H, W]),
with ``differentiable`` telling the estimators whether gradients may flow through it. Build one from a
spec with :func:`get_reward`::

    from chaintune.rewards import get_reward
    r = get_reward("0.7*digit:3+0.3*jpeg-compressibility")
    values = r(images)  # [n]

and evaluate samples the way the reward's family declares (held-out twin, its own diagnostics)::

    from chaintune.rewards import reward_evaluation
    row = reward_evaluation("digit:3")(images)  # {'eval/reward': ..., 'eval/class_share': ..., ...}
"""

from chaintune.rewards import catalog  # noqa: F401, E402 - registers the built-in families
from chaintune.rewards.base import (
    FunctionReward,
    NetworkReward,
    Reward,
    WeightedSum,
    validate_reward_output,
)
from chaintune.rewards.builtin import (
    DigitReward,
    ImageNetReward,
    JpegReward,
    imagenet_class_names,
    jpeg_size_kb,
    resolve_imagenet_class,
)
from chaintune.rewards.evaluation import RewardEvaluation, heldout_spec, reward_evaluation
from chaintune.rewards.registry import available_rewards, get_reward, register_reward, split_terms
from chaintune.rewards.scale import AestheticReward, HPSv2Reward, ImageRewardReward, PickScoreReward
from chaintune.rewards.video import (
    FramesReward,
    TemporalConsistencyReward,
    VideoFunctionReward,
    VideoReward,
    is_video_reward,
)

__all__ = [
    "Reward", "FunctionReward", "NetworkReward", "WeightedSum", "validate_reward_output",
    "DigitReward", "JpegReward", "ImageNetReward", "imagenet_class_names", "resolve_imagenet_class", "jpeg_size_kb",
    "AestheticReward", "PickScoreReward", "HPSv2Reward", "ImageRewardReward",
    "get_reward", "register_reward", "available_rewards", "split_terms",
    "RewardEvaluation", "reward_evaluation", "heldout_spec",
    "VideoReward", "VideoFunctionReward", "FramesReward", "TemporalConsistencyReward", "is_video_reward",
]
