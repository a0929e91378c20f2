# syntax=docker/dockerfile:1
# kvm-cpu-exporter container image. Build (the version, revision and date end up in the OCI labels
# and in `kvm-cpu-exporter --version`):
#   docker build -t ghcr.io/kvm-cpu-exporter/kvm-cpu-exporter:0.1.0 \
#     --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" .
# Run (see docs/deploy.md for what each flag is for):
#   docker run -d --name kvm-cpu-exporter --pid=host --device /dev/kvm \
#     --group-add "$(getent group kvm | cut -d: -f3)" \
#     -v /proc:/host/proc:ro -v /sys:/host/sys:ro -v kvm-cpu-exporter:/var/lib/kvm-cpu-exporter \
#     -p 10437:10437 ghcr.io/kvm-cpu-exporter/kvm-cpu-exporter:0.1.0 --path.procfs=/host/proc --path.sysfs=/host/sys
# Run as root with eight capabilities instead (--user 0:0 --cap-drop ALL --cap-add SYS_PTRACE ...), it asks
# each guest with the guest's own (the host's) QEMU inside the host's root: docs/deploy.md, "The host's QEMU".
#
# Reproducible: the base is an exact Debian point release (pin its digest too where your registry
# allows: debian:12.11-slim@sha256:...), and the Python dependencies come from requirements.lock
# with hashes (regenerate it with: bash scripts/dev.sh lock).
ARG DEBIAN_IMAGE=debian:12.11-slim

# ---------------------------------------------------------------- builder: venv, wheel, canary image
FROM ${DEBIAN_IMAGE} AS builder
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# The canary image is assembled from Debian's own packages (kernel, busybox, cryptsetup, GNU dd),
# so these are build-time only; the runtime image carries the finished kernel + initramfs.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-pip ca-certificates \
      busybox-static cryptsetup-bin dmsetup cpio kmod coreutils
# Dependency layer first: it only changes when requirements.lock does, so a code change rebuilds
# from the COPY of exporter/ on and reuses the installed dependencies.
COPY requirements.lock /src/requirements.lock
RUN python3 -m venv /opt/kvm-cpu-exporter \
 && /opt/kvm-cpu-exporter/bin/pip install --require-hashes --no-deps -r /src/requirements.lock
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY exporter ./exporter
# --no-deps: everything the package needs is already installed, from the lock, with hashes checked
RUN python3 -m pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/kvm-cpu-exporter/bin/pip install --no-deps /wheels/*.whl \
 && /opt/kvm-cpu-exporter/bin/pip check
RUN /opt/kvm-cpu-exporter/bin/kvm-cpu-exporter canary build --path.cache-dir=/var/cache/kvm-cpu-exporter

# ---------------------------------------------------------------- runtime
FROM ${DEBIAN_IMAGE} AS runtime
ARG DEBIAN_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="kvm-cpu-exporter" \
      org.opencontainers.image.description="Prometheus exporter for KVM/QEMU hosts: CPU features guests get, AES-NI use and canary benchmarks" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="https://github.com/kvm-cpu-exporter/kvm-cpu-exporter" \
      org.opencontainers.image.url="https://github.com/kvm-cpu-exporter/kvm-cpu-exporter" \
      org.opencontainers.image.documentation="https://github.com/kvm-cpu-exporter/kvm-cpu-exporter/blob/main/docs/deploy.md" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/${DEBIAN_IMAGE}"
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    KVMCPU_BUILD_REVISION=${REVISION} KVMCPU_BUILD_DATE=${CREATED}
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 qemu-system-x86 \
 && rm -rf /var/lib/apt/lists/* \
 && (getent group kvm >/dev/null || groupadd --system kvm) \
 && useradd --system --uid 10437 --user-group --groups kvm \
      --home-dir /var/lib/kvm-cpu-exporter --shell /usr/sbin/nologin kvm-cpu-exporter \
 && install -d -o kvm-cpu-exporter -g kvm-cpu-exporter -m 0750 /var/lib/kvm-cpu-exporter
COPY --from=builder /opt/kvm-cpu-exporter /opt/kvm-cpu-exporter
COPY --from=builder --chown=kvm-cpu-exporter:kvm-cpu-exporter /var/cache/kvm-cpu-exporter /var/cache/kvm-cpu-exporter
ENV PATH=/opt/kvm-cpu-exporter/bin:$PATH KVMCPU_HEALTHCHECK_PORT=10437
USER kvm-cpu-exporter:kvm-cpu-exporter
WORKDIR /var/lib/kvm-cpu-exporter
VOLUME ["/var/lib/kvm-cpu-exporter"]
EXPOSE 10437
# Healthy = the HTTP server answers /-/healthy, over HTTP or (with a web config) HTTPS; a 401 from
# basic auth also proves it is alive. No curl in the image: Python's urllib does it.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
  CMD ["/opt/kvm-cpu-exporter/bin/python", "-c", "import os, ssl, sys, urllib.error, urllib.request\nport = os.environ.get('KVMCPU_HEALTHCHECK_PORT', '10437')\nfor scheme in ('http', 'https'):\n    try:\n        urllib.request.urlopen(f'{scheme}://127.0.0.1:{port}/-/healthy', timeout=4, context=ssl._create_unverified_context())\n        sys.exit(0)\n    except urllib.error.HTTPError as err:\n        sys.exit(0 if err.code == 401 else 1)\n    except OSError:\n        pass\nsys.exit(1)\n"]
ENTRYPOINT ["/opt/kvm-cpu-exporter/bin/kvm-cpu-exporter"]
CMD ["serve"]
