# The inference-broker image: one image for every role (policy, worker, gateway, demo, health checks).
#   docker build -t inference-broker:local .      (compose.yaml builds it for you)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Dependencies first, read from pyproject.toml alone: this layer is rebuilt only when the
# dependency list changes, not on every code change. All of them ship manylinux wheels, so
# the slim image needs no compiler.
COPY pyproject.toml /tmp/src/
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/src/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the package itself (README.md is the project's readme, the build needs it).
COPY README.md /tmp/src/
COPY broker /tmp/src/broker
COPY workers /tmp/src/workers
COPY policies /tmp/src/policies
COPY evaluation /tmp/src/evaluation
COPY cli /tmp/src/cli
COPY gateway /tmp/src/gateway
RUN pip install --no-deps /tmp/src && rm -rf /tmp/src

RUN useradd --system --create-home --uid 10001 --user-group broker
USER broker
# Not the source tree: `python -m cli` (how the roles spawn each other) must import the
# installed package.
WORKDIR /home/broker

ENTRYPOINT ["inference-broker"]
CMD ["--help"]
