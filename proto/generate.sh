#!/usr/bin/env bash
# Generates the Python stubs of the seqserve.v1 API (seqserve/v1/*_pb2*.py[i]) from
# proto/seqserve/v1/*.proto, and the descriptor set of the Open Inference Protocol subset
# (seqserve/inference/inference.binpb) from proto/inference/*.proto. This script is the only way either
# is made; never edit them by hand.
#
# The inference protos (package `inference`) become a descriptor set, not _pb2 modules: tritonclient
# registers its own `inference` messages in protobuf's default pool, and a second definition of the same
# names there fails to load; seqserve.inference builds its classes in a private pool from this file.
#
# Usage: proto/generate.sh [OUT_DIR]
#   OUT_DIR defaults to the repository root, where the stubs are committed; the freshness test passes
#   a temporary directory and compares. Set PYTHON to choose the interpreter (default: python).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out_dir="$(mkdir -p "${1:-$repo_root}" && cd "${1:-$repo_root}" && pwd)"
python="${PYTHON:-python}"
cd "$repo_root"

# Include paths beyond proto/: grpc_tools' copy of the well-known types (listed before site-packages
# so google/protobuf/*.proto always comes from the pinned grpcio-tools), and the directory holding
# google/rpc/status.proto, which ships with googleapis-common-protos (a dependency of grpcio-status).
mapfile -t includes < <("$python" - <<'PY'
import pathlib

import google.rpc.status_pb2
import grpc_tools

print(pathlib.Path(grpc_tools.__file__).parent / "_proto")
print(pathlib.Path(google.rpc.status_pb2.__file__).parents[2])
PY
)

# Remove the old stubs first so a deleted .proto leaves no stale module behind.
mkdir -p "$out_dir/seqserve/v1"
rm -f "$out_dir"/seqserve/v1/*_pb2.py "$out_dir"/seqserve/v1/*_pb2.pyi "$out_dir"/seqserve/v1/*_pb2_grpc.py

"$python" -m grpc_tools.protoc \
    -Iproto -I"${includes[0]}" -I"${includes[1]}" \
    --python_out="$out_dir" --pyi_out="$out_dir" --grpc_python_out="$out_dir" \
    proto/seqserve/v1/*.proto

mkdir -p "$out_dir/seqserve/inference"
"$python" -m grpc_tools.protoc \
    -Iproto --include_imports --descriptor_set_out="$out_dir/seqserve/inference/inference.binpb" \
    proto/inference/*.proto
