"""Images or clips with integer labels that can also name them (class folders, per-sample prompts)."""

from __future__ import annotations

import torch


class LabelledData(tuple):
    """``(x, labels)`` that also names its labels; still unpacks as a pair, so image callers are unchanged.

    Why: a text model trains each clip on its own prompt, but transfer's data path carries only integer
    labels. ``classes[i]`` names label i: a class subfolder, or with ``prompted`` the prompt of every sample
    labelled i (transfer's ``--prompt`` template then defaults to ``{label}``: each sample its own prompt).
    """

    classes: list[str] | None
    prompted: bool

    def __new__(cls, x: torch.Tensor, labels: torch.Tensor, classes: list[str] | None = None,
                prompted: bool = False) -> LabelledData:
        self = super().__new__(cls, (x, labels))
        self.classes, self.prompted = classes, prompted
        return self

    def __getnewargs__(self) -> tuple:  # pickling and copy.copy rebuild through __new__
        return (*self, self.classes, self.prompted)

    @classmethod
    def from_prompts(cls, x: torch.Tensor, prompts: list[str]) -> LabelledData:
        """One prompt per sample -> labels indexing the distinct prompts (in order of first use)."""
        index: dict[str, int] = {}
        labels = torch.tensor([index.setdefault(p, len(index)) for p in prompts], dtype=torch.long)
        return cls(x, labels, list(index), prompted=True)
