# One image for every service: the command picks the role
#   relay upper|lower ..., endpoint ..., probe ...
#
# BASE: a public Python/Debian image by default. Where no registry is reachable, build a base
# without one (docker/base-image makes a Debian bookworm rootfs with debootstrap and imports it)
# and pass --build-arg BASE=vphone-base:bookworm.
# Wheels: anything in docker/wheels (pip download/wheel on the host) is installed from there
# with no network; with it empty, pip uses the package index.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY docker/wheels/ /wheels/
COPY pyproject.toml README.md ./
COPY relay/ relay/
COPY endpoint/ endpoint/
COPY probe/ probe/
COPY wire/ wire/
COPY rtc/ rtc/
COPY lab/ lab/
COPY webdevice/ webdevice/
RUN python3 -m venv /venv \
 && if ls /wheels/*.whl >/dev/null 2>&1; then \
        /venv/bin/pip install --no-index --find-links /wheels /app; \
    else \
        /venv/bin/pip install /app; \
    fi \
 && rm -rf /wheels
ENV PATH=/venv/bin:$PATH
# Health checks use this: exit 0 when the server answers /healthz.
COPY docker/healthcheck.py /usr/local/bin/vphone-healthcheck
ENTRYPOINT ["python3", "-m"]
CMD ["relay", "--help"]
