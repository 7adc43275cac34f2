#!/usr/bin/env bash
# The GPU check, in one call on one GPU machine (an H100 / H200 lent for a few minutes):
#
#   bench/gpu_check.sh OUT [--wheels DIR] [--tests-timeout S] [--bench-timeout S] [--dry-run]
#
# 1. records the machine (nvidia-smi, Python, torch, triton, transformers) in OUT/env.txt;
# 2. installs mmfuse from this working tree into a private folder (no network: with --wheels, the
#    wheels in DIR first -- e.g. diffusers, which GPU images often lack), never touching the image's
#    torch / triton;
# 3. runs the CUDA tests, `pytest -m cuda` (log: OUT/pytest.log, OUT/pytest.xml);
# 4. runs `mmfuse bench --quick --device cuda`, appending to this tree's bench/results (the earlier
#    runs stay), and packs that folder as OUT/results.tar.gz (log: OUT/bench.log);
# 5. writes OUT/SUMMARY.md (device, versions, test counts, each benchmark module's status).
#
# The default timeouts (240 s of tests, 270 s of benchmarks) keep the whole check within 8 minutes.
# Exit status: 0 when the tests pass (and the benchmarks ran), 1 when a test failed or none ran
# (or torch sees no CUDA device), 3 when only the benchmarks failed, 2 on bad arguments. --dry-run writes OUT/plan.txt with the
# commands it would run and runs none of them (no GPU needed).
set -uo pipefail

usage() {
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
}

OUT="" WHEELS="" TESTS_TIMEOUT=240 BENCH_TIMEOUT=270 DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY=1 ;;
    --wheels) WHEELS="${2:-}"; shift ;;
    --tests-timeout) TESTS_TIMEOUT="${2:-}"; shift ;;
    --bench-timeout) BENCH_TIMEOUT="${2:-}"; shift ;;
    -*) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) if [ -n "$OUT" ]; then echo "gpu_check: one OUT folder, got $OUT and $1" >&2; exit 2; fi; OUT="$1" ;;
  esac
  shift
done
if [ -z "$OUT" ]; then
  echo "gpu_check: give the output folder: bench/gpu_check.sh OUT [--wheels DIR] [--dry-run]" >&2
  exit 2
fi
for value in "$TESTS_TIMEOUT" "$BENCH_TIMEOUT"; do
  case "$value" in ''|*[!0-9]*) echo "gpu_check: timeouts are whole seconds, got '$value'" >&2; exit 2 ;; esac
done
if [ -n "$WHEELS" ] && ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  echo "gpu_check: --wheels $WHEELS holds no .whl files" >&2
  exit 2
fi

cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
SITE="${TMPDIR:-/tmp}/mmfuse-gpu-check-site"
install_cmd="$PY -m pip install -q --no-index --no-deps --no-build-isolation --target $SITE"
tests_cmd="timeout $TESTS_TIMEOUT $PY -m pytest -m cuda -q -p no:cacheprovider --junitxml=$OUT/pytest.xml"
bench_cmd="timeout $BENCH_TIMEOUT $PY -m mmfuse bench --quick --device cuda"

if [ "$DRY" = 1 ]; then
  {
    echo "# gpu_check plan (dry run: nothing was run)"
    echo "record: nvidia-smi; $PY -c 'import torch, triton, transformers' versions > $OUT/env.txt"
    if [ -n "$WHEELS" ]; then echo "install: $install_cmd $WHEELS/*.whl"; fi
    echo "install: $install_cmd ."
    echo "tests: PYTHONPATH=$SITE $tests_cmd"
    echo "bench: PYTHONPATH=$SITE $bench_cmd"
    echo "pack: tar -czf $OUT/results.tar.gz -C bench results"
    echo "summary: $OUT/SUMMARY.md"
  } > "$OUT/plan.txt"
  cat "$OUT/plan.txt"
  exit 0
fi

export PYTHONUNBUFFERED=1
# 1. the machine
{
  date -u
  if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  else echo "nvidia-smi: not found"; fi
  $PY -c 'import sys, torch, triton, transformers
print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda)
print("triton", triton.__version__); print("transformers", transformers.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")' 2>&1
  git rev-parse --short HEAD 2>/dev/null | sed 's/^/git /'
} > "$OUT/env.txt"
cat "$OUT/env.txt"
if ! $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: torch sees no CUDA device here: the CUDA tests would all skip (see $OUT/env.txt)" >&2
  exit 1
fi

# 2. install (the image's torch / triton stay: --no-deps into a private folder)
rm -rf "$SITE"
if [ -n "$WHEELS" ]; then
  $install_cmd "$WHEELS"/*.whl > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; echo "gpu_check: installing the wheels failed" >&2; exit 1; }
fi
$install_cmd . >> "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; echo "gpu_check: installing mmfuse failed" >&2; exit 1; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

# 3. the CUDA tests
$tests_cmd 2>&1 | tee "$OUT/pytest.log"
tests_rc=${PIPESTATUS[0]}

# 4. the benchmarks
$bench_cmd 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
tar -czf "$OUT/results.tar.gz" -C bench results  # the earlier runs and this machine's, as bench/results

# 5. the summary
{
  echo "# GPU check"
  echo
  echo '```'
  cat "$OUT/env.txt"
  echo '```'
  echo
  echo "- tests (\`pytest -m cuda\`, exit $tests_rc): $(tail -n 1 "$OUT/pytest.log")"
  echo "- benchmarks (\`mmfuse bench --quick --device cuda\`, exit $bench_rc):"
  grep -E '^  [a-z_]+ +(ok|failed|skipped|error)' "$OUT/bench.log" | sed 's/^  /  - /' || true
  if [ -f "$OUT/results.tar.gz" ]; then
    echo "- results: results.tar.gz (bench/results with this machine's runs appended: one JSON per module, SUMMARY.md, plots)"
  fi
} > "$OUT/SUMMARY.md"
cat "$OUT/SUMMARY.md"

if [ "$tests_rc" != 0 ]; then exit 1; fi   # a failure, or no test collected (pytest's 5)
if [ "$bench_rc" != 0 ]; then exit 3; fi
exit 0
