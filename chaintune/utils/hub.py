"""Quiet the Hugging Face libraries while chaintune loads and saves models.

diffusers, transformers and huggingface_hub draw their own progress bars ("Loading pipeline components",
"Writing model shards") and warn about pipeline slots a pixel-space model leaves empty ("self.vae=None ...
cannot be saved"), several times per run; chaintune shows its own progress bar, so inside :func:`quiet_hub`
those bars are off and only the libraries' errors are logged. The previous settings are restored on exit, so a
caller's own use of the libraries is unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    import diffusers.utils.logging as dlog
    import huggingface_hub.utils as hub
    import transformers.utils.logging as tlog

    bars = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled(), not hub.are_progress_bars_disabled())
    level = dlog.get_verbosity()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    hub.disable_progress_bars()
    dlog.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        dlog.set_verbosity(level)
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()
        if bars[2]:
            hub.enable_progress_bars()
