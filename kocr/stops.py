"""The signals that stop a command from outside, which its worker processes leave to it.

Ctrl-C (SIGINT) and SIGTERM (``kill``, GNU ``timeout``, ``docker stop``, a CI runner cancelling a job) reach
a whole process group: the command stops on them and ends its workers on the way out, so the workers
ignore them (prepare's pools, ``training.data.workers``; the DataLoader workers of ``training.train``).

    >>> import signal
    >>> STOPS == (signal.SIGINT, signal.SIGTERM)
    True
"""

from __future__ import annotations

import signal

STOPS = (signal.SIGINT, signal.SIGTERM)
