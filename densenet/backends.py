"""How the efficient ops run: one settings object, like ``torch.backends.cudnn``.

    import densenet
    densenet.backends.cpu_kernels = False          # torch ops instead of the C kernels
    with densenet.backends.flags(triton=False):    # torch ops on CUDA inside the block
        ...

=================  =======  ===============================================================
setting            default  what it does
=================  =======  ===============================================================
``cpu_kernels``    True     the fused C kernels for the element-wise passes on the CPU
                            (compiled on first use); off: the same passes as torch ops
``triton``         True     the Triton kernels for the same passes on CUDA; off: torch ops
``buffer_pool``    True     keep the large CPU buffers (8 MB and up) between steps for reuse
``huge_pages``     True     ask Linux for transparent huge pages behind those buffers
=================  =======  ===============================================================

Every setting gives the same results; they exist to compare speeds and to take a part out
when looking for a fault. Each starts from an environment variable, read once when densenet is
imported (``DENSENET_KERNELS``, ``DENSENET_TRITON``, ``DENSENET_POOL``,
``DENSENET_HUGEPAGES``: ``0`` turns it off), so a job script can set them without code; after
import, the attributes are what counts. The ops read them on every call (an attribute lookup),
so a change takes effect at the next step.

``DENSENET_CACHE`` (where the compiled kernels and decoded data sets are kept) is not a
setting here: it is read where the cache is used.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types

_FIELDS = {  # name: (environment variable, what it is, for error messages)
    "cpu_kernels": ("DENSENET_KERNELS", "the fused C kernels on the CPU"),
    "triton": ("DENSENET_TRITON", "the Triton kernels on CUDA"),
    "buffer_pool": ("DENSENET_POOL", "the pool of large CPU buffers"),
    "huge_pages": ("DENSENET_HUGEPAGES", "transparent huge pages for pooled buffers"),
}


def _from_environment() -> dict:
    return {name: os.environ.get(var, "1") != "0" for name, (var, _) in _FIELDS.items()}


class _BackendsModule(types.ModuleType):
    """This module, with its settings checked on assignment (a misspelt name or a non-bool is
    an error, not a silently ignored attribute)."""

    def __init__(self, module: types.ModuleType):
        super().__init__(module.__name__, module.__doc__)
        self.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("__")
                              or k in ("__file__", "__spec__", "__loader__", "__package__")})
        self.__dict__.update(_from_environment())

    def __setattr__(self, name, value):
        if name in _FIELDS:
            if not isinstance(value, bool):
                raise TypeError(f"densenet.backends.{name} ({_FIELDS[name][1]}) is True or False, "
                                f"got {value!r}.")
        elif not name.startswith("_") and name not in self.__dict__:
            raise AttributeError(f"densenet.backends has no setting {name!r}; the settings are "
                                 f"{', '.join(_FIELDS)}.")
        super().__setattr__(name, value)

    @contextlib.contextmanager
    def flags(self, **settings):
        """Change settings inside a ``with`` block and put the old values back after it."""
        old = {}
        try:
            for name, value in settings.items():
                if name not in _FIELDS:
                    raise AttributeError(f"densenet.backends has no setting {name!r}; the settings "
                                         f"are {', '.join(_FIELDS)}.")
                old[name] = getattr(self, name)
                setattr(self, name, value)
            yield self
        finally:
            for name, value in old.items():
                setattr(self, name, value)

    def settings(self) -> dict:
        """The current settings as a dict."""
        return {name: getattr(self, name) for name in _FIELDS}

    def reset(self) -> None:
        """Back to the values the environment gives (read again)."""
        for name, value in _from_environment().items():
            setattr(self, name, value)


sys.modules[__name__] = _BackendsModule(sys.modules[__name__])
