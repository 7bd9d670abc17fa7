"""Progress bars (tqdm) with ETA and the current loss/reward in the postfix."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(iterable=None, desc: str = "", total: int | None = None, disable: bool = False, **kw):
    return tqdm(iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True,
                file=sys.stderr, **kw)
