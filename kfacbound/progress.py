"""One progress-bar style for every long loop (tqdm on stderr).

Bars refresh at most twice a second, so logs of non-interactive runs stay short; ``enabled=False``
(``--no-progress``) turns them off. Update postfix values with
``bar.set_postfix(..., refresh=False)``.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


def progress_bar(total: int | None = None, desc: str = "", enabled: bool = True,
                 unit: str = "it", **kwargs: Any) -> tqdm:
    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=not enabled, unit=unit, dynamic_ncols=True,
                mininterval=0.5 if interactive else 5.0, leave=interactive, file=sys.stderr,
                **kwargs)
