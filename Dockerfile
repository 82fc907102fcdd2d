# syntax=docker/dockerfile:1
#
# One image for every Clearhouse process: `clearhouse serve <service> --role api|relay|consumer`,
# `clearhouse migrate <service>`, the gateway and the sandbox processor differ only in their
# command and environment (see docker-compose.yml and deploy/k8s/).
#
#   builder  python + pip: a venv with the pinned dependencies, then the project itself
#   runtime  the same python base, the venv and the source, nothing else: no compiler, no pip cache
#
# Both stages use the same base so the venv's interpreter links (/usr/local/bin/python3.11) hold.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /app
# Dependencies first, from pyproject.toml and constraints.txt alone, so a source change does
# not reinstall them. Every pinned dependency ships a wheel for CPython 3.11, hence no compiler.
COPY pyproject.toml constraints.txt ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
 && pip install -c constraints.txt -r /tmp/requirements.txt
COPY . .
# Editable on purpose: migrations/ directories are not Python packages and are read from the
# source tree (clearhouse.serve.migrations_dir), so the image runs the code in /app exactly as
# `clearhouse up` does; the venv holds the dependencies and the `clearhouse` entry point.
# Bytecode is compiled here because the root filesystem is read-only at run time.
RUN pip install --no-deps -c constraints.txt -e . \
 && python -m compileall -q --invalidation-mode checked-hash /app

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0
# A fixed numeric uid/gid so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN groupadd --system --gid 10001 clearhouse \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin clearhouse
# Root-owned and read-only for the service user: a compromised process cannot rewrite its code.
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /app /app
WORKDIR /app
USER 10001:10001
# No HEALTHCHECK: compose and Kubernetes probe /healthz, /readyz and /metrics themselves, per role.
ENTRYPOINT ["clearhouse"]
CMD ["--help"]
