"""The table check compiled (table_check.cpp): the same answers as the Python check in plan.py,
for about 20 ns per tensor instead of about 150, which keeps step()'s host time per tensor well
below torch.optim's.

    python -m fusedopt.native        # build it once (a C++ compiler and ninja are needed)

It is never built implicitly: a step() that had to compile first would stall for half a minute.
Once built (kept in $FUSEDOPT_CACHE_DIR or ~/.cache/fusedopt, per torch version and source),
every process loads it; without it, or with FUSEDOPT_NATIVE_CHECK=0, the Python check runs.
"""
import hashlib
import importlib.util
import os
import sys

import torch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "table_check.cpp")

_loaded = None  # the compiled module, once loaded
_looked = False  # whether a cached build has been looked for in this process


def extension_name():
    """Unique per torch version and source, so that a cached build is always the right one."""
    with open(SOURCE, "rb") as source:
        digest = hashlib.sha1(source.read()).hexdigest()[:10]
    version = "".join(c if c.isalnum() else "_" for c in torch.__version__)
    return f"fusedopt_table_check_{version}_{digest}"


def build_directory():
    """Where the build is kept: $FUSEDOPT_CACHE_DIR, else fusedopt/ in the user's cache directory."""
    root = os.environ.get("FUSEDOPT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fusedopt")
    return os.path.join(root, extension_name())


def _import_built():
    """The built module, imported from its library (without torch.utils.cpp_extension, whose
    import alone takes a second)."""
    global _loaded
    name = extension_name()
    spec = importlib.util.spec_from_file_location(name, os.path.join(build_directory(), f"{name}.so"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _loaded = module
    return module


def table_check_class():
    """The compiled TableCheck, or None (not built, or FUSEDOPT_NATIVE_CHECK=0)."""
    global _looked
    if os.environ.get("FUSEDOPT_NATIVE_CHECK", "1") == "0":
        return None
    if _loaded is None and not _looked:
        _looked = True
        try:
            if os.path.exists(os.path.join(build_directory(), f"{extension_name()}.so")):
                _import_built()
        except Exception:  # a broken cache: the Python check
            pass
    return None if _loaded is None else _loaded.TableCheck


def build():
    """Compile the table check (or find it built) and load it; raises RuntimeError if it cannot."""
    global _loaded
    try:
        from torch.utils.cpp_extension import load

        os.makedirs(build_directory(), exist_ok=True)
        _loaded = load(name=extension_name(), sources=[SOURCE], build_directory=build_directory(),
                       extra_cflags=["-O2"], verbose=False)
        return _loaded.TableCheck
    except Exception as error:
        raise RuntimeError(f"fusedopt could not build its compiled table check ({error}); the Python check "
                           "is used instead (needs a C++ compiler and `pip install ninja`)") from error


if __name__ == "__main__":
    try:
        build()
    except RuntimeError as error:
        print(error, file=sys.stderr)
        sys.exit(1)
    print(f"fusedopt: compiled table check ready ({extension_name()})")
