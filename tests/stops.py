"""What the signal tests' subprocess scripts share: stop a command's workers as a group signal would, then the command."""

from __future__ import annotations

import json
import os
import signal
import time


def stop_workers_then_command(workers: list[int], record: str = "alive.json") -> None:
    """SIGTERM ``workers`` (as GNU timeout's SIGTERM to the group reaches them), record in ``record`` after a
    second which of them still live (a zombie is dead), then SIGTERM this process, the command: kocr ends it
    as an exit with status 143."""
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    time.sleep(1)
    with open(record, "w") as fh:
        json.dump([os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1]
                   .split()[0] != "Z" for pid in workers], fh)
    os.kill(os.getpid(), signal.SIGTERM)
