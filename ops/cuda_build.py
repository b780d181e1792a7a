"""Building mnemo's compiled CUDA extensions at first use (torch.utils.cpp_extension.load_inline: needs nvcc and
ninja; the build lands in torch's extension cache, so later processes only load it). Each extension module keeps
its own functools.cache around `load` and its own fallback when the build fails."""
import os
import shutil


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
