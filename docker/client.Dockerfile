# A fedcore training client: the edge SDK (base install) and torch on CPU.
# No FastAPI, SQLAlchemy or database driver: the client never imports them.
#
#   docker build -f docker/client.Dockerfile -t fedcore-client .
#   docker run -e FEDCORE_SERVER=http://aggregator:8000 \
#       -e FEDCORE_ENROLLMENT_TOKEN=fce_... fedcore-client
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Train as an unprivileged user.
RUN useradd --system --uid 10001 --create-home --shell /usr/sbin/nologin fedcore

WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY fedcore ./fedcore
COPY privacy ./privacy
COPY clients ./clients
# scikit-learn only provides the example data set (`--data digits`, the default).
RUN pip install --no-cache-dir -c constraints.txt \
        --extra-index-url https://download.pytorch.org/whl/cpu \
        ".[torch]" "scikit-learn==1.9.1"

USER 10001:10001
WORKDIR /home/fedcore

# Credentials come from the environment (FEDCORE_TOKEN with --federation, or
# FEDCORE_ENROLLMENT_TOKEN), which keeps them out of the process list.
ENV FEDCORE_SERVER=http://127.0.0.1:8000
ENTRYPOINT ["/bin/sh", "-c", "exec python -m clients --server \"$FEDCORE_SERVER\" \"$@\"", "python -m clients"]
CMD ["--data", "digits"]
