#!/usr/bin/env bash
# Make `docker compose` runnable on a machine with no container registry: start Debian's Docker
# engine and build local stand-ins for the public base images compose.yaml and the Dockerfile
# name (python:3.11-slim and redis:7), from Debian packages. Then `docker-compose up --build`
# runs the real Dockerfile and compose.yaml end to end (tests/test_compose_stack.py does, in
# .ci/run). Idempotent. Cold, measured here: about 75 s (apt 14 s, debootstrap and the redis
# stand-in 60 s); a second run returns at once.
#
#   sudo deploy/standins.sh                     # engine + python:3.11-slim + redis:7
#   STANDINS="python" sudo deploy/standins.sh   # choose which to build (python:3.11-slim always:
#                                               # the others are built on it)
#
# The stand-ins behave like the public images where the project relies on them: `python` and
# `pip` on PATH (pip installs system-wide), the host's CA bundle (package downloads go through
# the same proxy as the host's), redis-server with protected mode off and /data as its working
# directory. They are NOT the public images: a test that passes here still runs on the real
# images elsewhere. Containers live in network namespaces this machine makes itself; publish
# ports on 127.0.0.1 only. A copy of the session tool ../shared/tools/container-standins.sh.
set -euo pipefail
STANDINS=${STANDINS:-"python redis"}
ROOTFS=${ROOTFS:-${XDG_CACHE_HOME:-$HOME/.cache}/standin-rootfs}
MIRROR=${MIRROR:-$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || echo http://deb.debian.org/debian)}

need() { command -v "$1" >/dev/null 2>&1; }
if ! need dockerd || ! need docker-compose || ! need debootstrap; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends docker.io docker-compose debootstrap >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
  (dockerd >/var/log/standin-dockerd.log 2>&1 &)
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start: see /var/log/standin-dockerd.log" >&2; exit 1; }
fi
has_image() { docker image inspect "$1" >/dev/null 2>&1; }

if ! has_image python:3.11-slim; then
  if [ ! -x "$ROOTFS/usr/bin/python3" ]; then
    rm -rf "$ROOTFS"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
      bookworm "$ROOTFS" "$MIRROR" >/var/log/standin-debootstrap.log 2>&1
  fi
  rm -f "$ROOTFS"/usr/lib/python3*/EXTERNALLY-MANAGED
  ln -sf /usr/bin/python3 "$ROOTFS/usr/local/bin/python"
  printf '#!/bin/sh\nexec python3 -m pip "$@"\n' > "$ROOTFS/usr/local/bin/pip"; chmod +x "$ROOTFS/usr/local/bin/pip"
  cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
  tar -C "$ROOTFS" -c . | docker import - python:3.11-slim >/dev/null
fi

build() {  # build TAG from a Dockerfile given on stdin, with an optional extra file
  local tag=$1 dir; dir=$(mktemp -d); cat > "$dir/Dockerfile"
  [ -n "${2:-}" ] && printf '%s' "$2" > "$dir/entry.sh" && chmod +x "$dir/entry.sh"
  docker build -q -t "$tag" "$dir" >/dev/null; rm -rf "$dir"
}
for s in $STANDINS; do case $s in
  python) ;;
  redis) has_image redis:7 || build redis:7 '#!/bin/sh
if [ "$1" = "redis-server" ]; then shift; exec redis-server "$@" --protected-mode no; fi
exec "$@"
' <<'DF'
FROM python:3.11-slim
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server redis-tools >/dev/null && rm -rf /var/lib/apt/lists/*
RUN mkdir -p /data
COPY entry.sh /usr/local/bin/docker-entrypoint.sh
WORKDIR /data
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server"]
DF
  ;;
  *) echo "no stand-in recipe for '$s' (have: python redis); add one here if a test needs it" >&2 ;;
esac; done
echo "ready: $(docker images --format '{{.Repository}}:{{.Tag}}' | grep -E '^(python|redis):' | tr '\n' ' ')"
