# mnemo on a CUDA machine.
#   docker build -t mnemo .
#   docker run --gpus all --ipc=host --rm mnemo make test
#   docker run --gpus all --ipc=host --rm mnemo python -m torch.distributed.run --standalone --nproc-per-node 8 \
#       -m train config=configs/memory_373m.yaml
# The base is the official PyTorch image with torch 2.11.0 (pyproject.toml needs torch >= 2.11), CUDA 12.8 and
# cuDNN 9, pinned by its version tag. The devel flavour carries a C compiler and the CUDA toolkit, which Triton
# and torch.compile use at run time to build their launchers and kernels, and which builds the compiled
# product-key search and pair sort (ops/cuda_search.py, ops/cuda_sort.py; nvcc) at their first use.
FROM pytorch/pytorch:2.11.0-cuda12.8-cudnn9-devel

WORKDIR /workspace/mnemo
COPY pyproject.toml README.md Makefile ./
COPY model model
COPY ops ops
COPY data data
COPY train train
COPY eval eval
COPY launch launch
COPY configs configs
COPY scripts scripts
COPY tests tests

# pip must never replace the image's CUDA torch with a build from the package index: every install in the image
# (this one and any later `make setup`) is constrained to the torch that is already there.
ENV PIP_CONSTRAINT=/etc/mnemo-torch-constraint.txt
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /etc/mnemo-torch-constraint.txt

# `make setup`: .venv with the image's packages visible (its torch and triton are used as they are) and the
# project installed into it with its dev extra (tests, lm-eval, plotting). xformers (optional) is left out: its
# wheels require one exact torch version.
RUN make setup PYTHON=python && rm -rf /root/.cache/pip
# FlashAttention-4 (the flash4 extra): the attention kernels of the presets' model.attention_backend=auto on Hopper
RUN .venv/bin/python -m pip install --no-cache-dir -e ".[flash4]"
ENV PATH=/workspace/mnemo/.venv/bin:$PATH \
    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1

CMD ["python", "-m", "train", "config=configs/tiny.yaml"]
