"""Fault injection for the crash tests, in the processes they start and in nothing else.

Python imports ``sitecustomize`` at start-up from its path, so a test that puts this folder on
``PYTHONPATH`` (``fault_env`` in conftest.py) makes every process of the job it starts - the
``densenet`` command, torchrun and its workers - read the variables below; the product knows
nothing of them.

- ``DENSENET_TEST_KILL_IN_WRITE=N``: SIGKILL the process in its N-th atomic file write, after
  the temporary file is complete and before the rename that would replace the target.
- ``DENSENET_TEST_KILL_AT=RANK:STEP``: SIGKILL the process of that rank (torchrun's ``RANK``,
  0 without it) right after its STEP-th optimizer step.
"""

import os
import signal

_in_write = os.environ.get("DENSENET_TEST_KILL_IN_WRITE")
_at_step = os.environ.get("DENSENET_TEST_KILL_AT")

if _in_write:
    _replace, _writes = os.replace, 0

    def _killing_replace(src, dst, *args, **kwargs):
        """An atomic write renames its '.NAME.*.tmp' file over the target: count those."""
        global _writes
        name = os.path.basename(os.fsdecode(src))
        if name.startswith(".") and name.endswith(".tmp"):
            _writes += 1
            if _writes == int(_in_write):
                os.kill(os.getpid(), signal.SIGKILL)
        return _replace(src, dst, *args, **kwargs)

    os.replace = _killing_replace

if _at_step:
    _rank, _step = (int(v) for v in _at_step.split(":"))
    if int(os.environ.get("RANK", "0")) == _rank:
        import torch

        _sgd_step, _steps = torch.optim.SGD.step, 0

        def _killing_step(self, *args, **kwargs):
            global _steps
            out = _sgd_step(self, *args, **kwargs)
            _steps += 1
            if _steps == _step:
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        torch.optim.SGD.step = _killing_step
