# Start-up hook of moreh_ap: makes `torch.moreh` appear when (and only when) torch is imported.
"""Installed at site-packages' root and imported by ``moreh_ap_startup.pth``.

It runs in every Python process of the environment (pip included), so it is
cheap, idempotent and never raises. It does not import torch or moreh_ap: it
puts a finder on ``sys.meta_path`` that, once torch's own module has run,
sets ``torch.moreh`` to a lazy module importing ``moreh_ap`` on first
attribute access, and ``torch.ops.moreh.FusedLAMB`` to a stand-in importing
``moreh_ap`` on first call. When ``MOREH_ENABLE_ADVANCED_PARALLELIZATION=1``
it also enables advanced parallelization at that point.
"""

import importlib.abc
import os
import sys
import types

_ENV_ENABLE = "MOREH_ENABLE_ADVANCED_PARALLELIZATION"


class _LazyMoreh(types.ModuleType):
    """``torch.moreh`` before ``moreh_ap`` is imported: imports it on first use."""

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        import moreh_ap  # replaces torch.moreh with moreh_ap itself

        return getattr(moreh_ap, name)

    def __dir__(self):
        import moreh_ap

        return dir(moreh_ap)


class _LazyFusedLAMB:
    """``torch.ops.moreh.FusedLAMB`` before ``moreh_ap`` is imported (the import replaces it)."""

    __slots__ = ()

    def __call__(self, *args, **kwargs):
        import moreh_ap

        return moreh_ap.optim.FusedLAMB(*args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        import moreh_ap

        return getattr(moreh_ap.optim.FusedLAMB, name)

    def __repr__(self):
        return "<torch.ops.moreh.FusedLAMB: moreh_ap.optim.FusedLAMB, imported on first use>"


def _attach(torch_module):
    """Give ``torch`` its ``moreh`` attribute; enable AP if the env var says so."""
    try:
        if not hasattr(torch_module, "moreh"):
            torch_module.moreh = _LazyMoreh("torch.moreh")
        ops_moreh = torch_module.ops.moreh  # torch creates and caches this namespace object
        if "FusedLAMB" not in vars(ops_moreh):
            ops_moreh.FusedLAMB = _LazyFusedLAMB()
        if os.environ.get(_ENV_ENABLE, "").strip() == "1":
            import moreh_ap

            moreh_ap.option._enable_from_environment()
    except Exception as exc:  # the hook never breaks the interpreter
        sys.stderr.write(f"moreh_ap: start-up hook could not enable advanced parallelization: {exc}\n")


class _Loader(importlib.abc.Loader):
    """Wraps torch's own loader and attaches ``torch.moreh`` after torch has run."""

    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _attach(module)

    def __getattr__(self, name):  # get_resource_reader, is_package, ...
        return getattr(self._inner, name)


class _TorchFinder(importlib.abc.MetaPathFinder):
    """Finds ``torch`` through the other finders, then wraps its loader."""

    _moreh_ap_hook = True

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torch":
            return None
        for finder in sys.meta_path:
            if finder is self or getattr(finder, "_moreh_ap_hook", False):
                continue
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install():
    """Idempotent: one finder however often the .pth line runs."""
    try:
        if "torch" in sys.modules:
            _attach(sys.modules["torch"])
            return
        if not any(getattr(f, "_moreh_ap_hook", False) for f in sys.meta_path):
            sys.meta_path.insert(0, _TorchFinder())
    except Exception:
        pass


install()
