"""Commands stopped as a user stops them (Ctrl-C, SIGTERM to the group as GNU timeout or docker stop send it)
end with one line and their outputs whole, at any moment: also in their first seconds, while they load."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tests.conftest import REPO

# Ctrl-C while `import torch` runs, as it does in the first one or two seconds of every kocr command
STOPPED_IN_IMPORT = '''\
import os, signal, sys
class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, CtrlC())
from kocr.cli import main
sys.argv = ["kocr", *sys.argv[1:]]
sys.exit(main())
'''


def test_ctrl_c_while_kocr_loads_torch_is_its_one_line_not_a_traceback_or_an_abort(tmp_path):
    done = subprocess.run([sys.executable, "-c", STOPPED_IN_IMPORT, "score", "--gt", "gt", "--pred", "pred"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=120, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # was: a traceback from `import torch` in main (outside its handler), or SIGABRT from torch's C++ start
    assert done.stderr == "kocr score: interrupted\n", done.stderr[-2000:]
    assert done.returncode == -signal.SIGINT
