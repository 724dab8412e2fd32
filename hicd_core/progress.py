"""Progress bars: tqdm when it is installed (the optional ``progress`` extra), silence otherwise."""

from __future__ import annotations

__all__ = ["Progress"]


class Progress:
    """A tqdm bar when tqdm is installed and ``enabled``, otherwise nothing (``update`` / ``close`` do nothing)."""

    def __init__(self, total, desc, enabled):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, n, postfix=None):
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()
