#!/usr/bin/env bash
# `make stubs`: client stubs for the ssjf.v1 contract from protos/, into clients/gen/ (not
# committed: each language regenerates them in its own build, as protoc-based ecosystems do).
#   node/  TypeScript types for @grpc/grpc-js + @grpc/proto-loader (npm; clients/node)
#   go/    protoc-gen-go + protoc-gen-go-grpc      (Debian: protoc-gen-go protoc-gen-go-grpc)
#   cpp/   protoc --cpp_out + grpc_cpp_plugin      (Debian: protobuf-compiler-grpc)
# Languages whose tools are missing are skipped with the package to install; set
# STUBS_STRICT=1 to fail instead.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=clients/gen
PROTOS=$(cd protos && find ssjf -name '*.proto' | sort)
rm -rf "$OUT"
mkdir -p "$OUT"
made=()
skip() {
  echo "skipped $1: $2" >&2
  if [ "${STUBS_STRICT:-0}" = 1 ]; then exit 1; fi
}

if command -v npm >/dev/null; then
  (cd clients/node && { [ -d node_modules/@grpc/proto-loader ] || npm ci --no-audit --no-fund; } \
    && npm run --silent stubs >/dev/null)
  made+=(node)
else
  skip node "install node and npm"
fi

if command -v protoc >/dev/null && command -v protoc-gen-go >/dev/null \
  && command -v protoc-gen-go-grpc >/dev/null; then
  mkdir -p "$OUT/go"
  # module= strips the go_package prefix, so the files land in go/ssjf/v1.
  (cd protos && protoc -I. --go_out="../$OUT/go" --go_opt=module=github.com/ssjf/ssjf/gen/go \
    --go-grpc_out="../$OUT/go" --go-grpc_opt=module=github.com/ssjf/ssjf/gen/go $PROTOS)
  made+=(go)
else
  skip go "apt-get install protobuf-compiler protoc-gen-go protoc-gen-go-grpc"
fi

if command -v protoc >/dev/null && command -v grpc_cpp_plugin >/dev/null; then
  mkdir -p "$OUT/cpp"
  (cd protos && protoc -I. --cpp_out="../$OUT/cpp" --grpc_out="../$OUT/cpp" \
    --plugin=protoc-gen-grpc="$(command -v grpc_cpp_plugin)" $PROTOS)
  made+=(cpp)
else
  skip cpp "apt-get install protobuf-compiler protobuf-compiler-grpc"
fi

echo "stubs in $OUT: ${made[*]:-none}"
find "$OUT" -type f | sort
