# One image for every role: prepare, superlink, bank, register, submit.
# BASE_IMAGE: any Debian-like image with python3.11 and venv (the official slim image by
# default; the e2e test builds one with debootstrap). With wheels in ./wheelhouse the
# build needs no network at all (an air-gapped bank); otherwise it uses the index.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
# CPU-only torch when building from the network (the default index's torch is CUDA).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY wheelhouse/ /tmp/wheelhouse/
RUN if ls /tmp/wheelhouse/*.whl >/dev/null 2>&1; then \
        pip install --no-cache-dir --no-index --find-links /tmp/wheelhouse torch==2.13.0; \
    else \
        pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" torch==2.13.0; \
    fi
COPY pyproject.toml README.md /app/
COPY common /app/common
COPY client /app/client
COPY server /app/server
RUN if ls /tmp/wheelhouse/*.whl >/dev/null 2>&1; then \
        pip install --no-cache-dir --no-index --find-links /tmp/wheelhouse /app; \
    else \
        pip install --no-cache-dir /app; \
    fi

FROM ${BASE_IMAGE}
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    OMP_NUM_THREADS=1
# Named volumes start as copies of these folders, so the app user owns them.
RUN useradd --create-home --uid 1000 fedfraud \
    && mkdir -p /app/runs /app/data /state/models /tmp/flwr /registrations \
    && chown fedfraud /app/runs /state /state/models /tmp/flwr /registrations
USER fedfraud
WORKDIR /app
CMD ["fedfraud", "--help"]
