#!/usr/bin/env bash
# The GPU checks and benchmarks as ONE prepared run, for a session that is lent a GPU machine (the `device` tool).
#
#   here, once (needs the package index): the wheels the GPU image lacks, into .whl/ (ignored by git)
#       bash bench/gpu_checks.sh --fetch
#   then one device run: command "bash bench/gpu_checks.sh", carry [".whl"], timeout_s 580
#
# There (python3 is the image's CUDA torch) in under 9 minutes, each step with its own time limit and its log under
# $OUT: nvidia-smi and torch's device name; the CUDA tests of tests/test_inference.py (the device path against the
# CPU path, the maps run ahead of the blending against in line); bench/benchmark.py --device cuda (encoder, end to
# end, training step; its markdown section goes into $OUT/benchmarks.md, a copy of docs/benchmarks.md); and
# bench/bench_wsi.py on a 4096² slide with the default model size (input 1024) and the network probe (seconds per
# mm², the stage split, windows run, seconds per window by batch size). Copy the figures into docs/benchmarks.md
# ("GPU"), naming the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
# what a slide run needs beyond the image (KINDS.md lists it: tifffile, pillow, fsspec, pyyaml... are there) and cc3d
# (the post-processing's labelling), at the versions the tests ran with here (the newest tiffslide needs Python 3.12
# and a newer tifffile than it may have). Not numba (`jit_kernels`, optional): its llvmlite wheel alone (about 40 MB)
# would not fit the 64 MiB a run carries; without it the post-processing's energy comes from scipy, the same bits
WHEELS="openslide-python==1.4.7 openslide-bin==4.0.1.2 imagecodecs==2026.3.6 tiffslide==3.0.1 zarr==3.1.6
        numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 connected-components-3d==4.1.1"

if [ "${1:-}" = "--fetch" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    rm -f .whl/*.whl   # one version of each
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .whl $WHEELS
    exit
fi

OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"; } \
    > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

step() {   # step NAME SECONDS COMMAND...: its output in $OUT/NAME.log, its exit status and last lines printed
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%H:%M:%S), at most $limit s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "rc $?" >> "$OUT/$name.log"
    tail -n 30 "$OUT/$name.log"
}

step tests 120 python3 -m pytest tests/test_inference.py -q -rs -p no:cacheprovider
cp docs/benchmarks.md docs/benchmarks.json "$OUT/"
step benchmark 200 python3 bench/benchmark.py --device cuda --sizes 512,1024 --out "$OUT/benchmarks.json" \
    --markdown "$OUT/benchmarks.md"
step wsi 200 python3 bench/bench_wsi.py --device cuda --sizes 4096 --input_sizes 1024 --network_probe \
    --out /tmp/gpu_checks_wsi
