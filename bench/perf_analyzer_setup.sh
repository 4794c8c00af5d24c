#!/usr/bin/env bash
# Fetches NVIDIA's perf_analyzer for driving seqserve's Open Inference Protocol endpoint (bench only: none of
# this is a server dependency). The tritonclient manylinux wheels up to 2.50.0 carry the binary
# (tritonclient/bin/perf_analyzer); later ones need a newer glibc than Debian 12's. It links libb64
# (Debian libb64-0d) and libcudart.so.12, taken from the nvidia-cuda-runtime-cu12 wheel (only the .so).
#
# Usage: bench/perf_analyzer_setup.sh [DIR]   (default DIR: bench/.perf_analyzer)
# Then:  DIR/perf_analyzer -m g2p-en -i grpc -u 127.0.0.1:50051 --string-data hello
#        (a wrapper that sets LD_LIBRARY_PATH; see docs/operations.md)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="$(mkdir -p "${1:-$repo_root/bench/.perf_analyzer}" && cd "${1:-$repo_root/bench/.perf_analyzer}" && pwd)"
python="${PYTHON:-python3}"
TRITONCLIENT_VERSION=2.50.0
CUDART_VERSION=12.9.79

if ! dpkg -s libb64-0d >/dev/null 2>&1; then
    SUDO=$( [ "$(id -u)" = 0 ] || echo sudo )
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libb64-0d
fi

wheels="$dir/wheels"
mkdir -p "$wheels" "$dir/lib"
"$python" -m pip download -q --no-deps --only-binary=:all: --platform manylinux1_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 \
    --python-version 3.11 -d "$wheels" "tritonclient==$TRITONCLIENT_VERSION" "nvidia-cuda-runtime-cu12==$CUDART_VERSION"

"$python" - "$wheels" "$dir" <<'PY'
import pathlib
import stat
import sys
import zipfile

wheels, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for wheel in wheels.glob("*.whl"):
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            base = name.rsplit("/", 1)[-1]
            if name.endswith("bin/perf_analyzer"):
                target = out / "perf_analyzer.bin"
            elif base.startswith("libcudart.so.12"):
                target = out / "lib" / "libcudart.so.12"
            else:
                continue
            target.write_bytes(archive.read(name))
            target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            print("extracted", target)
PY

cat > "$dir/perf_analyzer" <<WRAP
#!/usr/bin/env bash
LD_LIBRARY_PATH="$dir/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$dir/perf_analyzer.bin" "\$@"
WRAP
chmod +x "$dir/perf_analyzer"
"$dir/perf_analyzer" --version >/dev/null 2>&1 || "$dir/perf_analyzer" --help 2>&1 | head -3 || true
echo "perf_analyzer ready: $dir/perf_analyzer"
