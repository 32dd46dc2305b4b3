# lrnserve container image.
#
# CPU (default):  docker build -t lrnserve .
# CUDA:           docker build -t lrnserve:cuda \
#                   --build-arg BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime \
#                   --build-arg TORCH_INDEX_URL=none .
#                 (the PyTorch CUDA runtime image brings torch and CUDA; run with --gpus all)
# Offline torch:  put torch-*.whl into deploy/docker/wheels/; it is used instead of the index.
#
# Run:  docker run -p 8001:8001 -p 8002:8002 lrnserve --plaintext
#       (or mount certificates: --tls-cert /certs/server.pem --tls-key /certs/server.key)
# Config: LRNSERVE_* environment variables, or mount a TOML file and set LRNSERVE_CONFIG.

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# g++ builds the fused LRN kernel here, once, for every x86-64 level (the runtime has no compiler).
# Not pinned: the base image's Debian release decides the compiler, and any g++ >= 11 will do.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
# --system-site-packages: a CUDA base image's own torch stays visible.
RUN python3 -m venv --system-site-packages /opt/lrnserve
ENV PATH=/opt/lrnserve/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY deploy/docker/wheels/ /tmp/wheels/
RUN if ls /tmp/wheels/torch-*.whl > /dev/null 2>&1; then \
        pip install --find-links /tmp/wheels "torch==${TORCH_VERSION}"; \
    elif [ "${TORCH_INDEX_URL}" = "none" ]; then \
        python -c "import torch; print('using the base image torch', torch.__version__)"; \
    else \
        pip install --extra-index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
    fi
COPY pyproject.toml README.md /src/
COPY proto /src/proto
COPY docs /src/docs
COPY client /src/client
COPY server /src/server
RUN pip install "/src[server]" \
    && LRNSERVE_KERNEL_CACHE=/opt/lrnserve/kernels python -m lrnserve.server.ops --build-all

FROM ${BASE_IMAGE} AS runtime
ENV PATH=/opt/lrnserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LRNSERVE_KERNEL_CACHE=/opt/lrnserve/kernels \
    HOME=/tmp
RUN groupadd --gid 10001 lrnserve \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin lrnserve
COPY --from=build /opt/lrnserve /opt/lrnserve
USER 10001:10001
EXPOSE 8001 8002
# lrnserve handles SIGTERM/SIGINT itself (also as PID 1): health NOT_SERVING, drain, exit 0.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["lrnserve", "health", "--target", "127.0.0.1:8001", "--timeout", "4"]
ENTRYPOINT ["lrnserve", "serve"]
