"""SIGINT / SIGTERM: finish the current step, save, print the resume command, exit 130 / 143."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Optional


class Interrupted(Exception):
    """SIGINT / SIGTERM: the step in flight was finished and a checkpoint saved."""

    def __init__(self, signum: int, checkpoint_path: Optional[Path], step: int):
        self.signum, self.checkpoint, self.step = signum, checkpoint_path, step
        super().__init__(f"{signal.Signals(signum).name} at step {step}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM


class Signals:
    """SIGINT / SIGTERM set a flag the loop reads after each step (finish, save, exit); a second one
    stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._prev = {}

    def install(self) -> "Signals":
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._prev[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave the signals alone
            self._prev = {}
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum
        os.write(2, f"\n[signal] {signal.Signals(signum).name}: finishing the current step, then saving a checkpoint "
                    "and exiting (send it again to stop at once, without saving)\n".encode())

    def restore(self) -> None:
        for sig, h in self._prev.items():
            signal.signal(sig, h)
        self._prev = {}
