# syntax=docker/dockerfile:1
# One image for every loraforge process: the entrypoint is the `loraforge` CLI, the command picks
# the part (`api`, `worker`, `celery worker`, `celery beat`, `operator`, `migrate`).
#
#   docker build -t loraforge:cpu .                          # CPU torch (CI, dev, the operator)
#   docker build --build-arg VARIANT=cuda -t loraforge:cuda . # CUDA torch (GPU trainers)
#
# The CUDA variant needs no CUDA base image: PyPI's torch wheels carry the CUDA runtime, and the
# node's driver is mounted by the NVIDIA container toolkit. Both variants are built from wheels
# only, so neither stage needs a compiler.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# cpu | cuda: which torch build goes into the image.
ARG VARIANT=cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
# The project as a wheel (not editable): only what the distribution contains.
COPY pyproject.toml README.md ./
COPY loraforge ./loraforge
COPY control_plane ./control_plane
COPY workers ./workers
COPY operators ./operators
COPY migrations ./migrations
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/loraforge
# torch first, from the index of the variant (its version is the one pyproject pins), then the
# wheel with every other dependency from PyPI.
RUN if [ "${VARIANT}" = "cpu" ]; then torch_index=(--index-url "${TORCH_CPU_INDEX}"); \
    elif [ "${VARIANT}" = "cuda" ]; then torch_index=(); \
    else echo "VARIANT must be cpu or cuda, not ${VARIANT}" >&2; exit 1; fi \
    && torch_pin="$(grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')" \
    && /opt/loraforge/bin/pip install --no-cache-dir "${torch_index[@]}" "${torch_pin}" \
    && /opt/loraforge/bin/pip install --no-cache-dir /wheels/loraforge-*.whl \
    && find /opt/loraforge -name '__pycache__' -type d -prune -exec rm -rf {} +

FROM ${PYTHON_IMAGE} AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="loraforge" \
      org.opencontainers.image.description="Kubernetes-native LoRA fine-tuning platform (${VARIANT})" \
      org.opencontainers.image.licenses="Apache-2.0" \
      dev.loraforge.variant="${VARIANT}"
# A fixed numeric non-root user, so that runAsNonRoot can verify it without a name lookup.
RUN groupadd --system --gid 10001 loraforge \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/loraforge --create-home \
       --shell /usr/sbin/nologin loraforge
COPY --from=build /opt/loraforge /opt/loraforge
ENV PATH=/opt/loraforge/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/loraforge \
    LORAFORGE_HOME=/var/lib/loraforge \
    LORAFORGE_HOST=0.0.0.0 \
    LORAFORGE_PORT=8000
RUN mkdir -p /var/lib/loraforge && chown 10001:10001 /var/lib/loraforge
USER 10001:10001
WORKDIR /var/lib/loraforge
EXPOSE 8000
ENTRYPOINT ["loraforge"]
CMD ["api"]
