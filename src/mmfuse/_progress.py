"""One progress-bar convention for every long loop (decode, diffusion, training)."""
from __future__ import annotations

from typing import Iterable

from tqdm.auto import tqdm


def progress_bar(iterable: Iterable | None = None, progress: bool | None = None, **kwargs) -> tqdm:
    """tqdm shown when ``progress`` is True, hidden when False, and when None only if stderr is a terminal."""
    return tqdm(iterable, disable=None if progress is None else not progress, **kwargs)
