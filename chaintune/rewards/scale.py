"""Adapters for the rewards used at scale: LAION aesthetic, PickScore, HPSv2, ImageReward.

Weights are never downloaded: each adapter loads from paths the user gives and fails with one
clear message naming what is missing (the files, or the package to pip install). All four are
differentiable here (the image path is re-implemented on tensors: resize + CLIP normalisation),
so they can drive the first-order term of RLR as in AlignProp / DRaFT.

Spec syntax: ``name:key=VALUE,key=VALUE`` or ``name:PATH`` for the main file (see each class).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from chaintune.errors import ChaintuneError
from chaintune.rewards.base import NetworkReward, frozen

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def parse_options(arg: str | None, keys: tuple[str, ...], positional: str, reward: str) -> dict[str, str]:
    """``'clip=DIR,head=FILE'`` -> dict; a bare ``'PATH'`` is the ``positional`` key."""
    if not arg:
        return {}
    if "=" not in arg:
        return {positional: arg}
    out: dict[str, str] = {}
    for part in arg.split(","):
        k, sep, v = part.partition("=")
        k = k.strip()
        if not sep or k not in keys:
            expected = ", ".join(f"{x}=..." for x in keys)
            raise ChaintuneError(f"{reward} reward: bad option {part!r}; expected {expected}")
        out[k] = v.strip()
    return out


def _require_path(value: str | None, what: str, usage: str, want_dir: bool = False) -> Path:
    if not value:
        raise ChaintuneError(f"{what} not given; {usage}")
    p = Path(value).expanduser()
    if not p.exists() or (want_dir and not p.is_dir()):
        raise ChaintuneError(f"{what} not found at {p}; {usage}")
    return p


def _require_package(module: str, pip_name: str, reward: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ChaintuneError(f"the {reward} reward needs the {pip_name!r} package: pip install {pip_name}") from e


def clip_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """CLIP's preprocessing on tensors, differentiably: short side to ``size``, centre crop, normalise."""
    x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images[:, :3]
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def _embeds(out) -> torch.Tensor:
    """transformers < 5 returns the projected features as a tensor, >= 5 as ``pooler_output``."""
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("image_embeds", "text_embeds", "pooler_output"):
        v = getattr(out, attr, None)
        if v is not None:
            return v
    return out[0]


def _normed(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class AestheticHead(nn.Module):
    """The MLP of LAION's improved aesthetic predictor (``layers.{0,2,4,6,7}``, 768 -> 1).

    Layer sizes are read from the state dict, so other CLIP widths load too.
    """

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        state = {k.removeprefix("layers."): v for k, v in state.items()}
        linear = {int(k.split(".")[0]): v.shape for k, v in state.items() if k.endswith("weight")}
        if not linear:
            raise ChaintuneError("aesthetic head: the state dict holds no linear layers")
        # dropout positions are kept as Identity so the state-dict indices line up (eval only)
        self.layers = nn.Sequential(*(nn.Linear(linear[i][1], linear[i][0]) if i in linear else nn.Identity()
                                      for i in range(max(linear) + 1)))
        self.layers.load_state_dict(state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _AestheticNet(nn.Module):
    def __init__(self, clip: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.clip = clip
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.clip.parameters()).dtype
        emb = _embeds(self.clip(pixel_values=clip_preprocess(images).to(dtype)))
        return self.head(_normed(emb.float()).to(next(self.head.parameters()).dtype)).squeeze(-1)


class AestheticReward(NetworkReward):
    """``aesthetic:clip=DIR,head=FILE`` — LAION aesthetic score (CLIP ViT-L/14 image embedding + MLP).

    ``clip`` is a local transformers CLIP directory (e.g. a snapshot of openai/clip-vit-large-patch14);
    ``head`` the predictor's state dict (``sac+logos+ava1-l14-linearMSE.pth``, .pth or .safetensors).
    A bare ``aesthetic:DIR`` looks for a CLIP model in DIR or DIR/clip and one head file in DIR.
    """

    differentiable = True
    USAGE = ("the aesthetic reward needs the CLIP ViT-L/14 weights directory and the MLP head "
             "(sac+logos+ava1-l14-linearMSE.pth); pass aesthetic:clip=DIR,head=FILE")

    def __init__(self, arg: str | None = None) -> None:
        super().__init__()
        opts = parse_options(arg, ("clip", "head"), "head", "aesthetic")
        if set(opts) == {"head"} and Path(opts["head"]).expanduser().is_dir():
            opts = self._from_dir(Path(opts["head"]).expanduser())
        self.head_path = _require_path(opts.get("head"), "aesthetic: MLP head", self.USAGE)
        self.clip_dir = _require_path(opts.get("clip"), "aesthetic: CLIP weights directory", self.USAGE, want_dir=True)
        self.name = "aesthetic"

    def _from_dir(self, d: Path) -> dict[str, str]:
        clip = next((c for c in (d, d / "clip") if (c / "config.json").exists()), None)
        heads = sorted(p for p in d.iterdir() if p.suffix in (".pth", ".pt", ".safetensors")
                       and not p.stem.startswith(("model", "pytorch_model")))
        if clip is None or len(heads) != 1:
            raise ChaintuneError(f"aesthetic: {d} should hold a CLIP model (config.json, in it or in clip/) and "
                                 f"exactly one head file; {self.USAGE}")
        return {"clip": str(clip), "head": str(heads[0])}

    def load(self) -> nn.Module:
        transformers = _require_package("transformers", "transformers", "aesthetic")
        try:
            clip = transformers.CLIPVisionModelWithProjection.from_pretrained(str(self.clip_dir), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ChaintuneError(f"aesthetic: could not load CLIP from {self.clip_dir}: {e}; {self.USAGE}") from e
        return _AestheticNet(frozen(clip), frozen(AestheticHead(_load_state(self.head_path, "aesthetic head"))))

    def forward(self, images, prompts, labels, metadata):
        return self.network(images.device)(images).float()


def _load_state(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated download, a pickle with code, a wrong file
        raise ChaintuneError(f"could not read the {what} at {path}: {e}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ChaintuneError(f"the {what} at {path} is not a state dict")
    return state


class _CLIPScorer(nn.Module):
    """logit_scale * cos(image, text) with a transformers CLIPModel (PickScore's score)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        img = _normed(_embeds(self.model.get_image_features(pixel_values=clip_preprocess(images).to(dtype))).float())
        txt = _normed(_embeds(self.model.get_text_features(**tokens)).float())
        return self.model.logit_scale.exp().float() * (img * txt).sum(-1)


class PickScoreReward(NetworkReward):
    """``pickscore:model=DIR,processor=DIR`` — PickScore (CLIP-H fine-tuned on Pick-a-Pic preferences).

    ``model`` is a local copy of yuvalkirstain/PickScore_v1, ``processor`` one of
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K (only its tokenizer is used; defaults to ``model``).
    Needs prompts.
    """

    differentiable = True
    needs_prompts = True
    USAGE = ("the PickScore reward needs a local PickScore_v1 model directory and the CLIP-H processor (tokenizer); "
             "pass pickscore:model=DIR,processor=DIR")

    def __init__(self, arg: str | None = None) -> None:
        super().__init__()
        opts = parse_options(arg, ("model", "processor"), "model", "pickscore")
        self.model_dir = _require_path(opts.get("model"), "pickscore: model directory", self.USAGE, want_dir=True)
        self.processor_dir = _require_path(opts.get("processor", str(self.model_dir)), "pickscore: processor directory",
                                           self.USAGE, want_dir=True)
        self.name = "pickscore"
        self._tokenizer = None

    def load(self) -> nn.Module:
        transformers = _require_package("transformers", "transformers", "pickscore")
        try:
            model = transformers.AutoModel.from_pretrained(str(self.model_dir), local_files_only=True)
            self._tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.processor_dir), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ChaintuneError(f"pickscore: could not load from {self.model_dir} / {self.processor_dir}: {e}; "
                                 f"{self.USAGE}") from e
        return _CLIPScorer(model)

    def forward(self, images, prompts, labels, metadata):
        net = self.network(images.device)
        tokens = self._tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        tokens = {k: v.to(images.device) for k, v in tokens.items()}
        return net(images, tokens)


class _OpenCLIPScorer(nn.Module):
    def __init__(self, model: nn.Module, scale: float) -> None:
        super().__init__()
        self.model = model
        self.scale = scale

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        img = _normed(self.model.encode_image(clip_preprocess(images)).float())
        txt = _normed(self.model.encode_text(tokens).float())
        return self.scale * (img * txt).sum(-1)


class HPSv2Reward(NetworkReward):
    """``hpsv2:FILE`` — Human Preference Score v2 (open_clip ViT-H-14 fine-tuned on HPD v2).

    FILE is ``HPS_v2_compressed.pt`` or ``HPS_v2.1_compressed.pt``. Needs the ``hpsv2`` and
    ``open-clip-torch`` packages and prompts. Reported on the scale of the RLR/DDPO tables:
    100 x cosine(image, text) (the ``hpsv2`` package's ``score`` returns the cosine itself).
    """

    differentiable = True
    needs_prompts = True
    USAGE = "the HPSv2 reward needs the HPSv2 checkpoint (HPS_v2_compressed.pt); pass hpsv2:FILE"

    def __init__(self, arg: str | None = None) -> None:
        super().__init__()
        opts = parse_options(arg, ("ckpt",), "ckpt", "hpsv2")
        self.ckpt = _require_path(opts.get("ckpt"), "hpsv2: checkpoint", self.USAGE)
        self.name = "hpsv2"
        self._tokenizer = None

    def load(self) -> nn.Module:
        _require_package("hpsv2", "hpsv2", "hpsv2")
        open_clip = _require_package("open_clip", "open-clip-torch", "hpsv2")
        model = open_clip.create_model("ViT-H-14", pretrained=None)
        model.load_state_dict(_load_state(self.ckpt, "HPSv2 checkpoint"))
        self._tokenizer = open_clip.get_tokenizer("ViT-H-14")
        return _OpenCLIPScorer(model, 100.0)

    def forward(self, images, prompts, labels, metadata):
        net = self.network(images.device)
        return net(images, self._tokenizer(prompts).to(images.device))


class _ImageRewardScorer(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.score_gard(ids, mask, clip_preprocess(images)).reshape(-1)


class ImageRewardReward(NetworkReward):
    """``imagereward:ckpt=FILE,med_config=FILE`` — ImageReward (BLIP fine-tuned on human rankings).

    Needs the ``image-reward`` package, ``ImageReward.pt`` and its ``med_config.json`` (defaults to
    the file beside the checkpoint), and BLIP's bert-base-uncased tokenizer in the local Hugging
    Face cache (HF_HUB_OFFLINE). Scores with the package's differentiable ``score_gard`` (ReFL).
    """

    differentiable = True
    needs_prompts = True
    USAGE = ("the ImageReward reward needs ImageReward.pt and med_config.json; "
             "pass imagereward:ckpt=FILE,med_config=FILE")

    def __init__(self, arg: str | None = None) -> None:
        super().__init__()
        opts = parse_options(arg, ("ckpt", "med_config"), "ckpt", "imagereward")
        self.ckpt = _require_path(opts.get("ckpt"), "imagereward: checkpoint", self.USAGE)
        default_cfg = str(self.ckpt.with_name("med_config.json"))
        self.med_config = _require_path(opts.get("med_config", default_cfg), "imagereward: med_config.json", self.USAGE)
        self.name = "imagereward"

    def load(self) -> nn.Module:
        rm = _require_package("ImageReward", "image-reward", "imagereward")
        try:
            model = rm.load(str(self.ckpt), device="cpu", med_config=str(self.med_config))
        except OSError as e:
            raise ChaintuneError(f"imagereward: could not load ({e}); BLIP's bert-base-uncased tokenizer must be in "
                                 f"the local Hugging Face cache") from e
        return _ImageRewardScorer(model)

    def forward(self, images, prompts, labels, metadata):
        net = self.network(images.device)
        tok = net.model.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35,
                                       return_tensors="pt")
        return net(images, tok.input_ids.to(images.device), tok.attention_mask.to(images.device)).float()
