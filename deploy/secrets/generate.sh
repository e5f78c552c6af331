#!/usr/bin/env bash
# Generate every secret of a secured SSJF deployment (SECURITY.md): a private CA, server and
# client certificates, client (tenant) and worker tokens, the scheduler's auth file (token
# digests only) and Redis ACL credentials. Nothing here is ever committed.
#
#   deploy/secrets/generate.sh                      # -> deploy/secrets/generated/
#   deploy/secrets/generate.sh --tenants acme,globex
#   deploy/secrets/generate.sh --k8s [--namespace ssjf]
#       also creates the Kubernetes secrets ssjf-secrets and ssjf-redis (kubectl), which
#       deploy/k8s mounts; run it before `kubectl apply -k deploy/k8s`.
#   deploy/secrets/generate.sh --from-compose
#       copies ca.crt and the demo token out of the compose stack's secrets volume, for a
#       client on the host:  SSJF_TLS_CA_FILE=deploy/secrets/generated/ca.crt \
#         SSJF_TOKEN_FILE=deploy/secrets/generated/tokens/demo.token \
#         ssjf generate "Hello" --server localhost:50051
#   deploy/secrets/generate.sh --force              # start over: a NEW CA, certificates, tokens and
#                                                   # Redis password (not a rotation: SECURITY.md)
#
# Docker compose needs none of this: its `secrets` service generates the same files into a
# volume on first start.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=deploy/secrets/generated
k8s=0 namespace=ssjf from_compose=0 args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --k8s) k8s=1 ;;
    --namespace) namespace="$2"; shift ;;
    --from-compose) from_compose=1 ;;
    --out) out="$2"; shift ;;
    *) args+=("$1") ;;
  esac
  shift
done

if [ "$from_compose" = 1 ]; then
  mkdir -p "$out/tokens"
  if docker compose version >/dev/null 2>&1; then
    copy() { docker compose cp "scheduler:$1" "$2"; }
  else  # docker-compose v1 (Debian's 1.29) has no cp: docker cp from the scheduler container
    scheduler=$(docker-compose ps -q scheduler)
    [ -n "$scheduler" ] || { echo "no scheduler container: docker-compose up first" >&2; exit 1; }
    copy() { docker cp "$scheduler:$1" "$2"; }
  fi
  copy /secrets/ca.crt "$out/ca.crt"
  copy /secrets/tokens/demo.token "$out/tokens/demo.token"
  chmod 600 "$out/tokens/demo.token"
  echo "copied ca.crt and tokens/demo.token into $out"
  exit 0
fi

ssjf=ssjf
[ -x .venv/bin/ssjf ] && ssjf=.venv/bin/ssjf
ca_path=""
[ "$k8s" = 1 ] && ca_path=/secrets/ca.crt  # where the scheduler pod reads it (redis-url)
"$ssjf" secrets --out "$out" ${ca_path:+--ca-path "$ca_path"} ${args[@]+"${args[@]}"}

if [ "$k8s" = 1 ]; then
  # Secret keys cannot hold "/": tokens/<name>.token become <name>.token.
  from_files=()
  for file in "$out"/*.crt "$out"/*.key "$out"/auth.toml "$out"/redis-url "$out"/tokens/*.token; do
    [ "$(basename "$file")" = ca.key ] && continue  # the CA key never leaves this machine
    from_files+=("--from-file=$(basename "$file")=$file")
  done
  kubectl create namespace "$namespace" --dry-run=client -o yaml | kubectl apply -f -
  kubectl -n "$namespace" create secret generic ssjf-secrets "${from_files[@]}" \
    --dry-run=client -o yaml | kubectl apply -f -
  kubectl -n "$namespace" create secret generic ssjf-redis \
    --from-file="$out/redis/redis.crt" --from-file="$out/redis/redis.key" \
    --from-file="$out/redis/ca.crt" --from-file="$out/redis/users.acl" \
    --dry-run=client -o yaml | kubectl apply -f -
  echo "created secrets ssjf-secrets and ssjf-redis in namespace $namespace"
fi
