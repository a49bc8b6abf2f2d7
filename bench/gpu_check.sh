#!/usr/bin/env bash
# The GPU check of issue 12 (bench/gpu_check.py) on a device machine that has no network.
#
#   bash bench/gpu_check.sh prepare          here, where PyPI is reachable: the wheels that the device's
#                                            image lacks, for its Python 3.12, into bench/out/gpu_wheels
#   bash bench/gpu_check.sh run [OPTIONS]    there: install those wheels into /tmp/site, check the imports,
#                                            run bench/gpu_check.py OPTIONS (e.g. --budget-s 300)
#
# The device image (/work/.library/device/KINDS.md) has torch, numpy, scipy, pyarrow, pandas and tqdm;
# the trainer and the collector also import duckdb, sqlalchemy and tenacity (versions: requirements-ci.txt).
# The device tool's call: command "bash bench/gpu_check.sh run", carry ["bench/out/gpu_wheels"].
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${GPU_WHEELS:-bench/out/gpu_wheels}
NEED=(duckdb SQLAlchemy tenacity)
PY=${PYTHON:-python3}

pin() { grep -i "^$1==" requirements-ci.txt | head -1; }

case "${1:-}" in
prepare)
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  for name in "${NEED[@]}"; do
    spec=$(pin "$name")
    [ -n "$spec" ] || { echo "gpu_check.sh: $name is not pinned in requirements-ci.txt" >&2; exit 2; }
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" "$spec"
  done
  git rev-parse --short HEAD > "$WHEELS/COMMIT"
  git status --porcelain --untracked-files=no | grep -q . && echo "+uncommitted changes" >> "$WHEELS/COMMIT"
  ls -l "$WHEELS"; du -sh "$WHEELS"
  ;;
run)
  shift
  if compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
  if [ -z "${BATCHSCOPE_COMMIT:-}" ] && [ -f "$WHEELS/COMMIT" ]; then
    BATCHSCOPE_COMMIT=$(tr '\n' ' ' < "$WHEELS/COMMIT"); export BATCHSCOPE_COMMIT
  fi
  "$PY" -c "import duckdb, sqlalchemy, tenacity, collector, trainer.train, bench.bench_trainer" || {
    echo "gpu_check.sh: imports fail; run 'bash bench/gpu_check.sh prepare' here and carry $WHEELS" >&2; exit 3; }
  exec "$PY" bench/gpu_check.py "$@"
  ;;
*)
  sed -n '2,11p' "$0" >&2; exit 2
  ;;
esac
