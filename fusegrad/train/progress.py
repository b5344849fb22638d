"""A one-line progress bar: step, loss, lr, tokens/s, ETA. Redraws in place on a terminal; elsewhere
(CI, pipes) prints a plain line about every tenth of the run."""
from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class ProgressBar:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, width: int = 24, stream=None):
        self.total, self.start, self.enabled, self.width = total, start, enabled, width
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.last_line = 0
        self.tok_s = None

    def update(self, step: int, loss: float, lr: float, tok_s: float) -> None:
        if not self.enabled:
            return
        self.tok_s = tok_s if self.tok_s is None else 0.9 * self.tok_s + 0.1 * tok_s  # smoothed
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        filled = int(self.width * step / self.total)
        line = (f"{step:>6}/{self.total} [{'#' * filled}{'.' * (self.width - filled)}] loss {loss:.4f} "
                f"lr {lr:.2e} {self.tok_s:,.0f} tok/s ETA {_clock(eta)}")
        if self.tty:
            self.stream.write("\r" + line)
            self.stream.flush()
        elif step == self.total or step - self.last_line >= max(self.total // 10, 1) or done == 1:
            self.stream.write(line + "\n")
            self.last_line = step

    def note(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
