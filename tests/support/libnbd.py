"""libnbd's Python binding for the tests' Python, which may not be Debian's.

Debian ships the binding (`python3-libnbd`) for the system Python only
(/usr/lib/python3/dist-packages: `nbd.py` and the C module `libnbdmod`). The
tests may run on another CPython of the same minor version (pyenv); the C
module's ABI matches, so both files are loaded from there by path. Nothing
else from dist-packages is put on `sys.path`.

    nbd = load()          # the `nbd` module, or ImportError saying what is missing
"""

from __future__ import annotations

import glob
import importlib.util
import sys
from types import ModuleType

DIST_PACKAGES = "/usr/lib/python3/dist-packages"


def _load_file(name: str, path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {name} from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load() -> ModuleType:
    """The `nbd` module (python3-libnbd), importable or loaded from Debian's files."""
    try:
        import nbd  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        pass
    else:
        return nbd  # type: ignore[no-any-return, unused-ignore]
    tag = f"cpython-{sys.version_info.major}{sys.version_info.minor}"
    found = glob.glob(f"{DIST_PACKAGES}/libnbdmod.{tag}-*.so")
    if not found:
        raise ImportError(
            f"libnbd's Python binding for {tag} is not installed (Debian: python3-libnbd, "
            f"looked in {DIST_PACKAGES})")
    if "libnbdmod" not in sys.modules:
        _load_file("libnbdmod", found[0])
    return _load_file("nbd", f"{DIST_PACKAGES}/nbd.py")
