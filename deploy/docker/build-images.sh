#!/usr/bin/env bash
# Build the SSJF images on a host that may have no registry access (`make images`).
#
#   deploy/docker/build-images.sh [ssjf] [valkey] [monitoring]   (default: ssjf valkey)
#   monitoring: Prometheus from Debian's package (Grafana is pull-only: docs/deploy.md)
#
# Environment (all optional):
#   BASE_IMAGE   image the Dockerfiles start FROM. Default: python:3.11-slim-bookworm when it
#                is present or can be pulled, else ssjf-base:bookworm, built here with
#                debootstrap from the host's Debian mirror (about a minute).
#   DEBIAN_MIRROR  mirror for debootstrap (default: the first deb.debian.org-style URI in
#                the host's apt sources, else http://deb.debian.org/debian).
#   EXTRA_CA     a PEM bundle pip must trust inside the build (default: the `cert` this
#                host's pip is configured with, if any; EXTRA_CA= to disable).
#   WHEELHOUSE   a directory of wheels searched before the index (default: the `find-links`
#                this host's pip is configured with, if any; WHEELHOUSE= to disable).
#   TAG          tag of the ssjf image (default: cpu, i.e. ssjf:cpu as docker-compose.yml uses).
#   NICE         nice level of the builds (default 10: the host is shared).
# Build logs go to ${LOG_DIR:-runs/images}/<image>.log; sizes and times to images.json there.
set -euo pipefail
cd "$(dirname "$0")/../.."

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(ssjf valkey)
TAG=${TAG:-cpu}
NICE=${NICE:-10}
LOG_DIR=${LOG_DIR:-runs/images}
LOCAL=deploy/docker/local
mkdir -p "$LOG_DIR"
summary="$LOG_DIR/images.tsv"
: > "$summary"

pip_config() {  # the value pip on this host uses for KEY (global or env), or nothing
  python3 -m pip config list 2>/dev/null | sed -n "s/^[^.]*\.$1='\(.*\)'$/\1/p" | head -1
}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

build_base() {
  local name=ssjf-base:bookworm
  if image_exists "$name"; then echo "base: $name exists"; return; fi
  local mirror=${DEBIAN_MIRROR:-}
  if [ -z "$mirror" ]; then
    mirror=$(grep -hoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' \
      /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list \
      2>/dev/null | head -1 | awk '{print $2}' || true)  # missing files: grep fails
    mirror=${mirror:-http://deb.debian.org/debian}
  fi
  command -v debootstrap >/dev/null || { echo "need debootstrap (apt-get install debootstrap)"; exit 1; }
  local root
  root=$(mktemp -d /tmp/ssjf-base.XXXXXX)
  echo "base: debootstrap bookworm from $mirror into $root (log $LOG_DIR/base.log)"
  local start=$SECONDS
  nice -n "$NICE" debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$root" "$mirror" \
    > "$LOG_DIR/base.log" 2>&1
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'CMD ["/bin/bash"]' - "$name" >> "$LOG_DIR/base.log"
  rm -rf "$root"
  record "$name" $((SECONDS - start))
}

pick_base() {
  if [ -n "${BASE_IMAGE:-}" ]; then return; fi
  if image_exists python:3.11-slim-bookworm \
    || timeout 60 docker pull -q python:3.11-slim-bookworm >/dev/null 2>&1; then
    BASE_IMAGE=python:3.11-slim-bookworm
  else
    echo "base: python:3.11-slim-bookworm cannot be pulled: building one from Debian packages"
    build_base
    BASE_IMAGE=ssjf-base:bookworm
  fi
}

stage_local() {  # copy the CA bundle and the wheelhouse into the build context
  find "$LOCAL" -mindepth 1 ! -name README.md -exec rm -rf {} +
  build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
  local ca=${EXTRA_CA-$(pip_config cert)}
  if [ -n "$ca" ]; then
    cp "$ca" "$LOCAL/ca-bundle.pem"
    build_args+=(--build-arg EXTRA_CA_BUNDLE=ca-bundle.pem)
    echo "extra CA bundle: $ca"
  fi
  local wheels=${WHEELHOUSE-$(pip_config find-links)}
  if [ -n "$wheels" ] && [ -d "$wheels" ]; then
    mkdir -p "$LOCAL/wheels"
    cp -l "$wheels"/*.whl "$LOCAL/wheels/" 2>/dev/null || cp "$wheels"/*.whl "$LOCAL/wheels/"
    build_args+=(--build-arg WHEELHOUSE=wheels)
    echo "wheelhouse: $wheels ($(ls "$LOCAL/wheels" | wc -l) wheels)"
  fi
}

record() {  # image, seconds
  local size
  size=$(docker image inspect -f '{{.Size}}' "$1")
  printf '%s\t%s\t%s\n' "$1" "$size" "$2" >> "$summary"
  printf 'built %s: %.2f GB in %ss\n' "$1" "$(awk "BEGIN{print $size/1e9}")" "$2"
}

build() {  # image, dockerfile, log name
  local start=$SECONDS
  echo "building $1 from $2 (log $LOG_DIR/$3.log)"
  if ! nice -n "$NICE" docker build "${build_args[@]}" -f "$2" -t "$1" . > "$LOG_DIR/$3.log" 2>&1; then
    tail -30 "$LOG_DIR/$3.log"
    exit 1
  fi
  record "$1" $((SECONDS - start))
}

pick_base
stage_local
for target in "${targets[@]}"; do
  case $target in
    ssjf) build "ssjf:$TAG" deploy/docker/Dockerfile ssjf ;;
    valkey) build ssjf-valkey:local deploy/docker/Dockerfile.valkey valkey ;;
    # Grafana has no Debian package and no offline build here: it stays pull-only.
    monitoring) build ssjf-prometheus:local deploy/docker/Dockerfile.prometheus prometheus ;;
    *) echo "unknown image $target (ssjf, valkey, monitoring)"; exit 2 ;;
  esac
done
find "$LOCAL" -mindepth 1 ! -name README.md -exec rm -rf {} +
column -t "$summary"
