#!/usr/bin/env bash
# Regenerate the Python stubs of protos/*.proto with grpcio-tools (requirements-dev.txt).
#
#   scripts/generate_protos.sh            write protos/*_pb2.py and *_pb2_grpc.py in place, with
#                                         their type stubs (.pyi: protoc's own for the messages,
#                                         mypy-protobuf's for the service stubs)
#   scripts/generate_protos.sh OUT_DIR    write them under OUT_DIR/protos/ instead (the
#                                         staleness test compares those with the committed ones)
#
# PYTHON names the interpreter (default: .venv/bin/python, else python3).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root}"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
mkdir -p "$out/protos"
cd "$root"
# Paths relative to the repository root, so the stubs import each other as `protos.…`.
bin="$(dirname "$python")"
grpc_stubs="$bin/protoc-gen-mypy_grpc"
[[ -x "$grpc_stubs" ]] || grpc_stubs="$(command -v protoc-gen-mypy_grpc)"
"$python" -m grpc_tools.protoc -I . --python_out="$out" --grpc_python_out="$out" \
  --pyi_out="$out" --plugin=protoc-gen-mypy_grpc="$grpc_stubs" --mypy_grpc_out=quiet:"$out" \
  protos/*.proto
