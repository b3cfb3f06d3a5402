# Affinity gRPC server image.
# Build:  docker build -t affinity .
# Run:    docker run -p 50051:50051 -e MLFLOW_TRACKING_URI=http://mlflow:5000 affinity
# The builder stage compiles wheels; the final stage has no compilers or build tools.

FROM python:3.11-slim AS builder
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md requirements.lock ./
COPY affinity ./affinity
COPY models ./models
COPY registry ./registry
COPY training ./training
COPY service ./service
COPY protos ./protos
RUN python -m venv /opt/affinity \
    && /opt/affinity/bin/pip install --upgrade pip \
    && /opt/affinity/bin/pip install --constraint requirements.lock .

FROM python:3.11-slim
ENV PATH=/opt/affinity/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OPENBLAS_NUM_THREADS=1 \
    MALLOC_ARENA_MAX=2 \
    AFFINITY_PORT=50051 \
    AFFINITY_CACHE_DIR=/var/cache/affinity \
    NUMBA_CACHE_DIR=/var/cache/affinity/numba
RUN groupadd --system --gid 10001 affinity \
    && useradd --system --uid 10001 --gid affinity --home-dir /home/affinity --create-home affinity \
    && mkdir -p /var/cache/affinity \
    && chown affinity:affinity /var/cache/affinity
COPY --from=builder /opt/affinity /opt/affinity
USER 10001:10001
WORKDIR /home/affinity
EXPOSE 50051 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["affinity", "health", "--target", "127.0.0.1:50051"]
ENTRYPOINT ["affinity", "serve"]
