"""The Dockerfile builds on a CUDA PyTorch image that satisfies the project's torch pin, copies only what exists,
and passes hadolint (installed with the dev extra on x86-64 Linux)."""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _instructions():
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        text = re.sub(r"\\\n", " ", f.read())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _version(text):
    return tuple(int(x) for x in text.split("."))


def test_base_image_is_pinned_and_satisfies_the_torch_pin():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pin = re.search(r'"torch>=([0-9.]+)"', f.read()).group(1)
    froms = [args for word, args in _instructions() if word == "FROM"]
    assert len(froms) == 1, froms
    image = froms[0].split()[0]
    # pinned: a digest, or a full version tag (never latest or a floating major tag)
    assert "@sha256:" in image or re.search(r":\d+\.\d+\.\d+-", image), image
    m = re.match(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda", image)
    assert m, f"{image}: expected an official CUDA pytorch/pytorch image, whose tag names its torch version"
    assert _version(m.group(1)) >= _version(pin), f"{image} has torch {m.group(1)}, pyproject.toml needs >= {pin}"


def test_copy_sources_exist_and_the_project_is_installed():
    instructions = _instructions()
    copies = [args.split() for word, args in instructions if word in ("COPY", "ADD")]
    assert copies
    for parts in copies:
        for src in [p for p in parts[:-1] if not p.startswith("--")]:
            assert not os.path.isabs(src) and ".." not in src.split("/"), src
            assert os.path.exists(os.path.join(ROOT, src)), f"COPY source {src} is not in the repository"
    copied = {src.rstrip("/") for parts in copies for src in parts[:-1]}
    # everything the installed package and `make test` need is in the image
    for needed in ("pyproject.toml", "Makefile", "model", "ops", "data", "train", "eval", "launch", "configs", "tests"):
        assert needed in copied, needed
    runs = " ".join(args for word, args in instructions if word == "RUN")
    assert "make setup" in runs or "pip install" in runs
    # the image's torch must not be replaced from the package index
    env = " ".join(args for word, args in instructions if word == "ENV")
    assert "PIP_CONSTRAINT" in env and "torch==" in runs


def _hadolint():
    found = shutil.which("hadolint") or os.path.join(os.path.dirname(sys.executable), "hadolint")
    return found if os.path.exists(found) else None


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (dev extra on x86-64 Linux)")
def test_hadolint_passes():
    proc = subprocess.run([_hadolint(), os.path.join(ROOT, "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
