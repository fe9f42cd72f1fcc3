# syntax=docker/dockerfile:1
#
# Multimodal entity-linking service image.
#
#   CPU (default):  docker build -t otmel-service:cpu .
#   CUDA:           docker build --build-arg VARIANT=cuda -t otmel-service:cuda .
#
# The image installs and serves with the same Makefile targets CI uses (`make install`, `make serve`).
# On first start `make serve` exports the ONNX encoders and builds the index from the MEL data mounted
# at /data/mel into /var/lib/el (mount a volume there to keep them); that takes minutes, hence the long
# health-check start period. Needs BuildKit (the default builder since Docker 23) so that only the
# base image of the chosen variant is pulled.

ARG VARIANT=cpu
ARG CPU_BASE_IMAGE=python:3.11.9-slim-bookworm
# Ubuntu 22.04 ships python3.11 in universe (deadsnakes is not needed); the cuDNN runtime is what
# onnxruntime-gpu's CUDA execution provider loads.
ARG CUDA_BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

FROM ${CPU_BASE_IMAGE} AS base-cpu

FROM ${CUDA_BASE_IMAGE} AS base-cuda
ARG DEBIAN_FRONTEND=noninteractive
# DL3008: apt versions are not pinned; the image is pinned by tag and jammy's archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/*

# ---- base: what both later stages need --------------------------------------------------------------
# DL3006: base-${VARIANT} names one of the two stages above, whose images are pinned by tag.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive
# make runs the Makefile targets; tini is PID 1 and passes SIGTERM on; libgomp1 for faiss/torch.
# DL3008: apt versions are not pinned: this stage sits on Debian bookworm or Ubuntu jammy (by variant),
# so one pinned version cannot fit both; the base images are pinned by tag instead.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends make tini libgomp1 \
 && rm -rf /var/lib/apt/lists/*
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VENV=/opt/venv

# ---- build: `make install` into /opt/venv ----------------------------------------------------------
FROM base AS build
ARG VARIANT
# Extra index for torch. Empty means: the CPU-only wheel index for VARIANT=cpu (the PyPI torch wheel
# is the multi-GB CUDA build), plain PyPI (CUDA build) for VARIANT=cuda.
ARG TORCH_INDEX_URL=""
# Extras to install: `serve` (the API); the compose `cluster` profile adds `scale` (Ray, psycopg).
ARG EXTRAS=serve
WORKDIR /app
COPY . .
# After installing, the cuda variant swaps onnxruntime and faiss-cpu for the `gpu` extra's packages
# (they cannot sit beside the CPU wheels); the versions come from pyproject.toml, not from here.
RUN case "$VARIANT" in \
      cpu)  export PIP_EXTRA_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
      cuda) if [ -n "$TORCH_INDEX_URL" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL"; fi ;; \
      *)    echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 1 ;; \
    esac \
 && make install VENV=/opt/venv EXTRAS="$EXTRAS" \
 && if [ "$VARIANT" = cuda ]; then \
      /opt/venv/bin/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["gpu"], sep="\n")' > /tmp/gpu-requirements.txt \
      && /opt/venv/bin/pip uninstall -y onnxruntime faiss-cpu \
      && /opt/venv/bin/pip install --no-cache-dir -r /tmp/gpu-requirements.txt \
      && /opt/venv/bin/python -c 'import onnxruntime as ort; assert "CUDAExecutionProvider" in ort.get_available_providers(), ort.get_available_providers()'; \
    else \
      /opt/venv/bin/python -c 'import faiss, onnxruntime, torch'; \
    fi

# ---- runtime ----------------------------------------------------------------------------------------
FROM base AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="otmel-service" \
      org.opencontainers.image.description="Multimodal entity linking: ONNX encoders, FAISS retrieval, OT reranking" \
      el.variant="${VARIANT}"
# /var/lib/el holds the ONNX exports and the index (a volume in compose; created here so that a fresh
# named volume starts out owned by the service user). /app/artifacts points there too, so any setting
# that defaults to a path under artifacts/ lands on that writable, persistent volume (numba caches the compiled
# Sinkhorn there too: /app is not writable by the service user).
RUN groupadd --system --gid 10001 el \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/el --shell /usr/sbin/nologin el \
 && mkdir -p /var/lib/el/index /var/lib/el/onnx /var/lib/el/numba /data/mel \
 && chown -R el:el /var/lib/el
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
RUN rm -rf /app/artifacts && ln -s /var/lib/el /app/artifacts
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    EL_HOST=0.0.0.0 \
    EL_PORT=8000 \
    EL_DATA_DIR=/data/mel \
    EL_INDEX__DIR=/var/lib/el/index \
    EL_ENCODER__ONNX_DIR=/var/lib/el/onnx \
    NUMBA_CACHE_DIR=/var/lib/el/numba
USER 10001:10001
EXPOSE 8000
# Readiness, not liveness: /readyz answers 503 until the model and index are loaded and warmed. The
# first start may build the index (minutes), so failures in the first 20 minutes do not count.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20m --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('EL_PORT', '8000'), timeout=4).status == 200 else 1)"]
STOPSIGNAL SIGTERM
# tini -g sends SIGTERM to the whole process group (make and the server it starts), so the server
# drains (readiness 503 first, in-flight requests finish) even when the serve recipe runs in a shell.
ENTRYPOINT ["/usr/bin/tini", "-g", "--"]
# VENV on the command line so the Makefile uses the image's venv whatever its own default is.
CMD ["make", "VENV=/opt/venv", "serve"]
