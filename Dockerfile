# syntax=docker/dockerfile:1
# kvm-cpu-exporter container image. Build:  docker build -t kvm-cpu-exporter .
# Run (see docs/deploy.md for what each flag is for):
#   docker run -d --name kvm-cpu-exporter --pid=host --device /dev/kvm \
#     --group-add "$(getent group kvm | cut -d: -f3)" \
#     -v /proc:/host/proc:ro -v /sys:/host/sys:ro -v kvm-cpu-exporter:/var/lib/kvm-cpu-exporter \
#     -p 10437:10437 kvm-cpu-exporter --path.procfs=/host/proc --path.sysfs=/host/sys
ARG DEBIAN_IMAGE=debian:12-slim

# ---------------------------------------------------------------- builder: wheel, venv, canary image
FROM ${DEBIAN_IMAGE} AS builder
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# The canary image is assembled from Debian's own packages (kernel, busybox, cryptsetup, GNU dd),
# so these are build-time only; the runtime image carries the finished kernel + initramfs.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-pip ca-certificates \
      busybox-static cryptsetup-bin dmsetup cpio kmod coreutils
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter ./exporter
RUN python3 -m pip wheel --no-deps --wheel-dir /wheels . \
 && python3 -m venv /opt/kvm-cpu-exporter \
 && /opt/kvm-cpu-exporter/bin/pip install /wheels/*.whl
RUN /opt/kvm-cpu-exporter/bin/kvm-cpu-exporter canary build --path.cache-dir=/var/cache/kvm-cpu-exporter

# ---------------------------------------------------------------- runtime
FROM ${DEBIAN_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
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
