#!/usr/bin/env bash
# make compose-e2e: the ten-bank network in real Docker containers, end to end, here.
#
# No image registry is reachable from this machine, so this script: installs Debian's
# docker.io, docker-compose and debootstrap if missing; starts its own dockerd (own
# socket, data root in the cache, stopped at the end); builds a Debian bookworm base
# image with debootstrap and downloads the Python wheels on the host into a wheelhouse
# (both cached, so a second run is fast); builds the image offline from them; runs
# `docker-compose up`; waits for the one-shot `submit` service; checks metrics.json and
# the report on the host; prints wall time, image size and peak memory; `down -v`.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}  # `make test` made it; it has PyYAML
CACHE=${FEDFRAUD_E2E_CACHE:-/var/cache/fedfraud-e2e}
DEADLINE_S=${FEDFRAUD_E2E_DEADLINE_S:-2400}
ROUNDS=10
BANKS=10
WORK=$(mktemp -d /tmp/fedfraud-e2e.XXXXXX)
export DOCKER_HOST="unix://$WORK/docker.sock"
export COMPOSE_PROJECT_NAME=fedfraud-e2e
export BASE_IMAGE=fedfraud-base:bookworm
STARTED=$(date +%s)
PROJECT="$WORK/project"
compose() { docker-compose --ansi never "$@"; }
say() { printf 'compose-e2e: %s\n' "$*"; }

cleanup() {
    local code=$?
    if [ -d "$PROJECT" ] && docker info >/dev/null 2>&1; then
        (cd "$PROJECT" && compose --profile scoring down -v --remove-orphans \
            >/dev/null 2>&1) || true
    fi
    if [ -f "$WORK/docker.pid" ]; then
        local pid
        pid=$(cat "$WORK/docker.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do [ -e "/proc/$pid" ] || break; sleep 0.2; done
    fi
    rm -rf "$WORK"
    exit "$code"
}
trap cleanup EXIT
trap "exit 143" TERM INT

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

mkdir -p "$CACHE"
say "starting dockerd (data root $CACHE/docker-root)"
setsid dockerd --host "$DOCKER_HOST" --data-root "$CACHE/docker-root" \
    --exec-root "$WORK/exec" --pidfile "$WORK/docker.pid" >"$WORK/dockerd.log" 2>&1 &
for _ in $(seq 1 150); do docker info >/dev/null 2>&1 && break; sleep 0.2; done
docker info >/dev/null || { cat "$WORK/dockerd.log"; exit 1; }

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    if [ ! -d "$CACHE/rootfs" ]; then
        mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
                 | grep -oE '^(URIs:|deb) *https?://[^ ]+/debian' | head -1 \
                 | grep -oE 'https?://.*' || true)
        [ -n "$mirror" ] || { say "no Debian mirror in the apt sources"; exit 1; }
        say "debootstrap bookworm from the machine's Debian mirror"
        rm -rf "$CACHE/rootfs.tmp"
        debootstrap --variant=minbase --include=python3,python3-venv,passwd,ca-certificates bookworm \
            "$CACHE/rootfs.tmp" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
            || { tail -20 "$WORK/debootstrap.log"; exit 1; }
        rm -rf "$CACHE/rootfs.tmp/var/cache/apt/archives"/*.deb
        mv "$CACHE/rootfs.tmp" "$CACHE/rootfs"
    fi
    say "importing the base image"
    tar -C "$CACHE/rootfs" -c . | docker import - "$BASE_IMAGE" >/dev/null
fi

deps=$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)  # the wheels follow its pins
if [ "$(cat "$CACHE/wheelhouse/.complete" 2>/dev/null)" != "$deps" ]; then
    say "downloading wheels into the wheelhouse"
    rm -rf "$CACHE/wheelhouse" && mkdir -p "$CACHE/wheelhouse"
    python3 -m pip download -q -d "$CACHE/wheelhouse" torch==2.13.0 "setuptools>=68" wheel \
        "$REPO" 2>&1 | grep -v '^WARNING: Location' || true
    ls "$CACHE/wheelhouse"/torch-2.13.0+cpu-*.whl >/dev/null  # never a CUDA torch
    rm -f "$CACHE/wheelhouse"/fedfraud-*
    echo "$deps" >"$CACHE/wheelhouse/.complete"
fi

mkdir -p "$PROJECT"
git -C "$REPO" ls-files -z | tar -C "$REPO" --null -T - -c | tar -C "$PROJECT" -x
cp "$CACHE/wheelhouse"/*.whl "$PROJECT/wheelhouse/"
cd "$PROJECT"

build_started=$(date +%s)
say "building the image (offline, from the wheelhouse)"
compose build >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
say "built in $(( $(date +%s) - build_started )) s; image $(docker image inspect \
    --format '{{.Size}}' fedfraud:latest | awk '{printf "%.0f MB", $1 / 1e6}')"

compose config >"$WORK/compose-config.yml"
"$PYTHON" "$REPO/tests/test_compose.py" "$WORK/compose-config.yml"

up_started=$(date +%s)
compose up -d --no-build >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log"; compose logs; exit 1; }
say "network up; waiting for the run (deadline ${DEADLINE_S} s)"
peak_mb=0
state=""
while :; do
    id=$(compose ps -q submit 2>/dev/null || true)
    if [ -n "$id" ]; then
        state=$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$id")
        [ "${state%% *}" = exited ] && break
    fi
    mem=$(docker stats --no-stream --format '{{.MemUsage}}' 2>/dev/null \
          | awk '{v=$1; u=v; gsub(/[0-9.]/,"",u); gsub(/[A-Za-z]/,"",v);
                  m = (u=="GiB") ? v*1024 : (u=="MiB") ? v : (u=="KiB") ? v/1024 : v/1048576;
                  s += m} END {printf "%d", s}')
    [ "${mem:-0}" -gt "$peak_mb" ] && peak_mb=$mem
    if [ $(( $(date +%s) - STARTED )) -gt "$DEADLINE_S" ]; then
        say "FAILED: no result within ${DEADLINE_S} s"; compose logs --tail 80; exit 1
    fi
    sleep 2
done
if [ "${state#* }" != 0 ]; then
    say "FAILED: submit exited with ${state#* }"; compose logs --tail 120; exit 1
fi

run_dir=runs/latest
python3 - "$run_dir" "$ROUNDS" "$BANKS" <<'EOF' || { compose logs --tail 120; exit 1; }
import json, sys
from pathlib import Path
run, rounds, banks = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
metrics = json.loads((run / "metrics.json").read_text())
assert metrics["mode"] == "deployment", metrics["mode"]
assert [b["id"] for b in metrics["banks"]] == list(range(banks)), metrics["banks"]
assert [r["round"] for r in metrics["history"]] == list(range(1, rounds + 1))
assert all(r["banks_trained"] == list(range(banks)) for r in metrics["history"])
report = (run / "report.md").read_text()
assert "Executive summary" in report, report[:300]
for name in ("model.ts", "model_card.json", "report_request.json"):
    assert (run / name).exists(), name
f = metrics["final"]
print(f"compose-e2e: run ok: {banks} banks, {rounds} rounds, AUC {f['auc']:.3f}, "
      f"AP {f['ap']:.3f}, recall@1%FPR {f['recall_at_1pct_fpr']:.3f}; "
      f"rounds {' '.join(f'{s:.1f}' for s in metrics['timing']['round_s'])} s")
EOF
say "a bank container attacks the operator's side"
compose exec -T bank-0 python - <<'EOF' || { say "FAILED: a bank reached the control API"; exit 1; }
import socket
for port in (9093, 9094, 8000):  # the control API and Flower's other default ports
    try:
        socket.create_connection(("superlink", port), 3).close()
    except OSError:
        continue
    raise SystemExit(f"superlink:{port} answers a bank")
print("compose-e2e: the SuperLink's control API is out of a bank's reach")
EOF
probe='mkdir -p /tmp/probe/server && cp /ca.crt /tmp/probe/server/ca.crt &&
    cp /outbox/bank.key.pub /tmp/probe/fake.pub && timeout 120 fedfraud --flwr-home /tmp/probe'
if compose exec -T bank-0 sh -c "$probe --set num-banks=1 register-banks --certs /tmp/probe \
        --control superlink:9093 --keys /tmp/probe" >"$WORK/probe.log" 2>&1; then
    say "FAILED: a bank registered a key"; cat "$WORK/probe.log"; exit 1
fi
if compose exec -T bank-0 sh -c "$probe submit --certs /tmp/probe --control superlink:9093" \
        >>"$WORK/probe.log" 2>&1; then
    say "FAILED: a bank submitted a run"; cat "$WORK/probe.log"; exit 1
fi
say "registering a key and submitting a run from a bank both fail"

say "bank 0's scoring service (profile scoring) serves the model bank 0 kept"
compose --profile scoring up -d --no-build scoring-0 >"$WORK/scoring.log" 2>&1 \
    || { cat "$WORK/scoring.log"; exit 1; }
python3 - "$run_dir" <<'EOF' || { compose --profile scoring logs --tail 60 scoring-0; exit 1; }
import csv, json, sys, time, urllib.request
from pathlib import Path
url = "http://127.0.0.1:8080"  # published on the host's loopback only
deadline = time.time() + 120
while True:
    try:
        urllib.request.urlopen(f"{url}/health", timeout=2).read()
        break
    except OSError:
        if time.time() > deadline:
            raise SystemExit("compose-e2e: FAILED: no /health from the scoring service")
        time.sleep(1)
with open("data/synthetic/bank_00/transactions.csv") as file:
    rows = [row for _, row in zip(range(5), csv.DictReader(file))]
batch = {"transactions": [{**{k: float(v) for k, v in row.items() if k != "Class"},
                           "id": str(i)} for i, row in enumerate(rows)]}
request = urllib.request.Request(f"{url}/score", json.dumps(batch).encode(),
                                 {"Content-Type": "application/json"})
answer = json.loads(urllib.request.urlopen(request, timeout=10).read())
run_id = json.loads((Path(sys.argv[1]) / "metrics.json").read_text())["run_id"]
assert len(answer["results"]) == 5, answer
assert answer["model_version"] in (run_id, f"{run_id}-bank0"), (answer, run_id)
assert all(0 <= r["fraud_probability"] <= 1 for r in answer["results"]), answer
print(f"compose-e2e: bank 0 scored 5 transactions with model {answer['model_version']}")
EOF

say "passed: run $(( $(date +%s) - up_started )) s after up, total $(( $(date +%s) - STARTED )) s, peak memory of the network ${peak_mb} MB"
