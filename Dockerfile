# ckptfs image: `docker run --privileged --device /dev/fuse ... IMAGE mount s3://B/P /mnt --cache-dir /cache --foreground`
# pyfuse3 has no wheels: build it against libfuse3 in a builder stage, install the wheels in a slim runtime.
FROM python:3.11-slim AS build
# Debian's versions within one release are the pin: the base image fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev pkg-config libfuse3-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY mount ./mount
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends fuse3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
 && ln -s "$(command -v mount.ckptfs)" /sbin/mount.fuse.ckptfs \
 && ln -s "$(command -v mount.ckptfs)" /sbin/mount.ckptfs \
 && ckptfs --help >/dev/null
ENTRYPOINT ["ckptfs"]
CMD ["--help"]
