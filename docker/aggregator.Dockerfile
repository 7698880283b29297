# The fedcore aggregator service: FastAPI + uvicorn, SQLite in /data by default,
# PostgreSQL when FEDCORE_DATABASE_URL is set (see compose.yaml).
#
#   docker build -f docker/aggregator.Dockerfile -t fedcore-aggregator .
#   docker run -p 8000:8000 -v fedcore-data:/data fedcore-aggregator
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Never run the service as root; /data holds blobs, the SQLite database and the
# generated admin token, so it belongs to the service user.
RUN useradd --system --uid 10001 --create-home --shell /usr/sbin/nologin fedcore \
    && mkdir /data \
    && chown fedcore:fedcore /data

WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY fedcore ./fedcore
COPY privacy ./privacy
COPY clients ./clients
COPY aggregator ./aggregator
COPY api ./api
# The CPU index keeps the image free of the multi-GB CUDA build of torch;
# constraints.txt pins the versions the project is tested with, torch included.
RUN pip install --no-cache-dir -c constraints.txt \
        --extra-index-url https://download.pytorch.org/whl/cpu \
        ".[server,torch]"

USER 10001:10001
WORKDIR /home/fedcore

ENV FEDCORE_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8000

# Python, not curl: the slim image has no curl, and the check needs nothing else.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]

CMD ["fedcore", "serve", "--host", "0.0.0.0", "--port", "8000"]
