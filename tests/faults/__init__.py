"""Environments for processes that the crash tests start with a fault (see sitecustomize.py)."""

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent


def fault_env(base: dict | None = None, *, kill_in_write: int | None = None,
              kill_at: tuple[int, int] | None = None) -> dict:
    """``base`` (default: this environment) with this folder first on PYTHONPATH and the fault
    asked for: a SIGKILL in the N-th atomic write, or after step STEP of rank RANK."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), *filter(None, [env.get("PYTHONPATH")])])
    if kill_in_write is not None:
        env["DENSENET_TEST_KILL_IN_WRITE"] = str(kill_in_write)
    if kill_at is not None:
        env["DENSENET_TEST_KILL_AT"] = f"{kill_at[0]}:{kill_at[1]}"
    return env
