"""Names of the adapters and of LoRA's target layers, torch-free (the CLI's option table reads them).

LoRA targets name layers the way peft's ``target_modules`` does: a layer matches a target when its dotted name
equals it or ends with ``"." + target``. Two named sets cover what users of the peer tools ask for:

* ``attention``: the attention projections of every diffusers block (UNet2D(Condition)Model, DiT, SD3, FLUX, Wan);
  diffusers' own LoRA training scripts default to these.
* ``attention+ff``: also both linear layers of every diffusers ``FeedForward`` (``ff`` in UNet, DiT, SD3 and FLUX
  blocks, ``ff_context`` in the joint blocks of SD3 and FLUX, ``ffn`` in Wan): Flow-GRPO's Wan recipes train these
  too (its OCR experiments needed them).
"""

from __future__ import annotations

import re

from chaintune.errors import ChaintuneError

PEFT_METHODS = ("none", "lora", "bitfit", "difffit")

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
FEED_FORWARD = tuple(f"{ff}.{layer}" for ff in ("ff", "ff_context", "ffn") for layer in ("net.0.proj", "net.2"))
LORA_TARGET_SETS: dict[str, tuple[str, ...]] = {"attention": ATTENTION, "attention+ff": ATTENTION + FEED_FORWARD}
_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def parse_lora_targets(spec: str) -> list[str]:
    """``attention`` | ``attention+ff`` | a comma list of layer names (or name endings) -> peft target_modules."""
    spec = spec.strip()
    if spec in LORA_TARGET_SETS:
        return list(LORA_TARGET_SETS[spec])
    names = [s.strip() for s in spec.split(",")]
    bad = [n for n in names if not _NAME.fullmatch(n)]
    if not spec or bad:
        raise ChaintuneError(f"lora_targets must be {' | '.join(LORA_TARGET_SETS)} or a comma list of layer names "
                             f"(dotted, e.g. to_q,to_v,ff.net.2), got {spec!r}")
    return list(dict.fromkeys(names))
