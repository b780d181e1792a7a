"""Building mnemo's compiled CUDA extensions at first use (torch.utils.cpp_extension.load_inline: needs nvcc and
ninja; the build lands in torch's extension cache, so later processes only load it). Each extension module keeps
its own functools.cache around `load` and around `builds`, and its own fallback when the build fails."""
import os
import shutil
import warnings


def _ninja_on_path() -> None:
    """torch's build runs `ninja` from PATH; the `ninja` package installed in a virtual environment is only on PATH
    while that environment is activated (not for `.venv/bin/python -m train`), so add its directory when missing."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return  # the build then fails with torch's own message, and the caller falls back
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def load(name: str, cpp: str, cuda: str, functions: list[str]):
    """The extension `name` built from these sources (or loaded from the cache when they did not change)."""
    from torch.utils.cpp_extension import load_inline

    _ninja_on_path()
    return load_inline(name=name, cpp_sources=cpp, cuda_sources=cuda, functions=functions,
                       extra_cuda_cflags=["-O3"], verbose=False)


def builds(extension, failure: str) -> bool:
    """Whether `extension()` (a module's cached `load`) builds and loads here. A failure warns once per process (the
    caller caches the answer) with `failure` and the reason: no compiler, no ninja and a build error all mean that
    the caller falls back to its slower path."""
    try:
        extension()
        return True
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"{failure} ({type(e).__name__}: {str(e)[:300]})", stacklevel=3)
        return False
