# mnemo on a CUDA machine. Build: docker build -t mnemo .   Run: docker run --gpus all -it mnemo make train
FROM nvcr.io/nvidia/pytorch:25.01-py3
WORKDIR /workspace/mnemo
COPY pyproject.toml README.md ./
COPY model model
COPY ops ops
COPY data data
COPY train train
COPY eval eval
COPY launch launch
COPY configs configs
COPY scripts scripts
COPY tests tests
COPY Makefile ./
# The image's CUDA torch is kept (the Makefile installs torch only where none is present).
RUN python -m pip install --no-cache-dir -e ".[dev]"
ENV HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
CMD ["python", "-m", "train", "config=configs/tiny.yaml"]
