#!/usr/bin/env bash
# Prove that the Dockerfile builds and that the image serves, on a machine WITHOUT a Docker engine
# (and without reaching Docker Hub):
#   1. debootstrap Debian bookworm (python3, python3-venv, ca-certificates) into a folder, with
#      this machine's CA bundle and pip configuration, so pip inside the build trusts and reaches
#      the same package index this machine does;
#   2. import that folder into buildah as localhost/qhx-base:bookworm;
#   3. `buildah bud` the Dockerfile with BASE_IMAGE=localhost/qhx-base:bookworm;
#   4. run `qhx-server serve --sim 1` from the image on 127.0.0.1, wait for /health and /ready,
#      POST /v1/completions to the simulated phone and print the answer;
#   5. stop the server and remove the working container (the images stay, as a build cache).
#
# Needs root (debootstrap, buildah). Heavy steps run under `nice -n 19`. Not part of CI.
#
# Environment:
#   QHX_IMAGE_WORK    working folder (default /var/tmp/qhx-image): rootfs, logs
#   QHX_TEST_PORT     port the server listens on (default 18000)
#   QHX_REBUILD_BASE  1: debootstrap and import the base again
#   QHX_KEEP_IMAGES   0: also remove the base and test images at the end (default 1: keep)
#   DEBIAN_MIRROR     (default http://deb.debian.org/debian)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
work=${QHX_IMAGE_WORK:-/var/tmp/qhx-image}
port=${QHX_TEST_PORT:-18000}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
base=localhost/qhx-base:bookworm
image=localhost/qhx-server:test
url=http://127.0.0.1:$port
nice=(nice -n 19)

log() { printf '\n== %s\n' "$*"; }
die() { printf 'test-image: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap and buildah)"
mkdir -p "$work"

# --- 0. tools ------------------------------------------------------------------------------------
missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v curl >/dev/null || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${nice[@]}" apt-get install -y -q "${missing[@]}"
fi
buildah --version

# --- 1. base rootfs ------------------------------------------------------------------------------
rootfs=$work/rootfs
if [ "${QHX_REBUILD_BASE:-0}" = 1 ] || [ ! -f "$rootfs/.qhx-complete" ]; then
  log "debootstrap bookworm into $rootfs (log: $work/debootstrap.log)"
  rm -rf "$rootfs" "$rootfs.new"
  "${nice[@]}" debootstrap --variant=minbase \
    --include=python3,python3-venv,ca-certificates,passwd \
    bookworm "$rootfs.new" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log"; die "debootstrap failed"; }
  rm -rf "$rootfs.new"/var/cache/apt/archives/*.deb "$rootfs.new"/var/lib/apt/lists/*
  mv "$rootfs.new" "$rootfs"
  touch "$rootfs/.qhx-complete"
  QHX_REBUILD_BASE=1
fi

# This machine's trust and pip settings, so that pip in the build verifies and reaches the index
# the way pip here does. Host-local sources (file:// indexes, find-links folders) named in a
# user's pip config or PIP_* variables do not exist inside the build and are not copied: the
# build uses the index these files name, PyPI by default.
install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
rm -rf "$rootfs/etc/pip.conf" "$rootfs/etc/xdg/pip"
[ -f /etc/pip.conf ] && install -D -m 0644 /etc/pip.conf "$rootfs/etc/pip.conf"
if [ -d /etc/xdg/pip ]; then
  mkdir -p "$rootfs/etc/xdg"
  cp -a /etc/xdg/pip "$rootfs/etc/xdg/pip"
fi

# --- 2. base image -------------------------------------------------------------------------------
if [ "${QHX_REBUILD_BASE:-0}" = 1 ] || ! buildah inspect --type image "$base" >/dev/null 2>&1; then
  log "importing $rootfs as $base"
  ctr=$(buildah from scratch)
  mnt=$(buildah mount "$ctr")
  cp -a "$rootfs/." "$mnt/"
  rm -f "$mnt/.qhx-complete"
  buildah umount "$ctr" >/dev/null
  buildah config \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 \
    --cmd /bin/bash "$ctr"
  buildah commit --quiet --rm "$ctr" "$base" >/dev/null
fi
buildah images "$base"

# --- 3. build ------------------------------------------------------------------------------------
log "building $image from $repo/Dockerfile"
# docker format: OCI image configs have no HEALTHCHECK
"${nice[@]}" buildah bud --isolation chroot --layers --format docker --pull=never \
  --build-arg "BASE_IMAGE=$base" -t "$image" -f "$repo/Dockerfile" "$repo"
buildah images "$image"
buildah inspect --type image --format \
  'user={{.Docker.Config.User}} entrypoint={{.Docker.Config.Entrypoint}} cmd={{.Docker.Config.Cmd}} ports={{.Docker.Config.ExposedPorts}} healthcheck={{.Docker.Config.Healthcheck}}' \
  "$image"

# --- 4. run --------------------------------------------------------------------------------------
run_ctr=$(buildah from --pull=never "$image")
server_pid=""
ctr_ns=()  # the mount namespaces that `buildah run` made for the server (/proc/PID/ns/mnt)

descendants() {  # pid: every process below it
  local child
  for child in $(cat /proc/"$1"/task/*/children 2>/dev/null); do
    echo "$child"
    descendants "$child"
  done
}
in_container() {  # pids of the processes in the server's container (its mount namespaces)
  local p ns
  for p in /proc/[0-9]*; do
    ns=$(readlink "$p/ns/mnt" 2>/dev/null) || continue
    case " ${ctr_ns[*]} " in *" $ns "*) echo "${p#/proc/}" ;; esac
  done
}
note_namespaces() {  # remember the mount namespaces of everything below `buildah run`
  local p ns own
  own=$(readlink /proc/self/ns/mnt)
  for p in $(descendants "$server_pid"); do
    ns=$(readlink "/proc/$p/ns/mnt" 2>/dev/null) || continue
    [ "$ns" = "$own" ] || ctr_ns+=("$ns")
  done
}
cleanup() {
  local rc=$? left=()
  set +e
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    # SIGTERM, as `docker stop` sends (buildah run passes it on to the server)
    kill -TERM "$server_pid"
    for _ in $(seq 30); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$server_pid" 2>/dev/null && kill -KILL "$server_pid"
  fi
  # What the server left running (Docker would end it with the container's namespace): end it
  # here too, by pid, and say so.
  mapfile -t left < <(in_container)
  if [ ${#left[@]} -gt 0 ]; then
    echo "test-image: still running in the container after the server stopped; ending them:"
    ps -o pid,user,args -p "$(IFS=,; echo "${left[*]}")"
    kill -KILL "${left[@]}" 2>/dev/null
  fi
  buildah rm "$run_ctr" >/dev/null 2>&1
  if [ "${QHX_KEEP_IMAGES:-1}" = 0 ]; then
    buildah rmi "$image" "$base" >/dev/null 2>&1
  fi
  exit "$rc"
}
trap cleanup EXIT

log "whoami inside the image"
buildah run --isolation chroot "$run_ctr" -- sh -c 'id; command -v adb qhx-server; adb version | head -1'

log "starting qhx-server serve --sim 1 on $url (log: $work/serve.log)"
# buildah run applies the image's user and environment, not its ENTRYPOINT: name the command.
# Fork-only: `buildah run` stays the parent of the server, so its pid is the one to stop.
buildah run --isolation chroot "$run_ctr" -- \
  qhx-server serve --sim 1 --host 127.0.0.1 --port "$port" >"$work/serve.log" 2>&1 &
server_pid=$!

wait_for() {  # path, seconds
  local deadline=$((SECONDS + $2))
  until curl -fsS "$url$1" >/dev/null 2>&1; do
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/serve.log"; die "server exited before $1 answered"; }
    [ $SECONDS -lt $deadline ] || { cat "$work/serve.log"; die "$1 did not answer 200 within $2 s"; }
    sleep 1
  done
  printf '%s: ' "$1"; curl -fsS "$url$1"; echo
}
wait_for /health 120
note_namespaces
wait_for /ready 180
note_namespaces

log "GET /v1/models"
models=$(curl -fsS "$url/v1/models")
echo "$models"
model=$(printf '%s' "$models" | python3 -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])')

log "POST /v1/completions (model $model)"
body=$(printf '{"model": "%s", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}' "$model")
echo "request: $body"
response=$(curl -fsS -H 'Content-Type: application/json' -d "$body" "$url/v1/completions")
printf '%s' "$response" | python3 -m json.tool
printf '%s' "$response" | python3 -c '
import json, sys
r = json.load(sys.stdin)
assert r["object"] == "text_completion", r
assert r["choices"][0]["text"], "empty completion"
assert r["usage"]["completion_tokens"] > 0, r["usage"]
'

log "server log (tail)"
tail -20 "$work/serve.log"
log "image size"
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$image"
echo "test-image: OK"
