#!/usr/bin/env bash
# api-fuzz: Schemathesis against a real `nova serve`, driven by the
# checked-in crates/nova-server/openapi.json.
#
# Starts `nova serve --listen 127.0.0.1:PORT` on a temporary NOVA_HOME
# (templates linked from the installed ones) with a cheap policy (two
# sandboxes at most, no network, the minimal template only, short
# lifetimes), runs `schemathesis run` over TCP with the bearer token and the
# checks `not_a_server_error` and `response_schema_conformance`, bounded in
# examples and time, then deletes every sandbox, stops the daemon and kills
# whatever VMM of that NOVA_HOME is left. The WebSocket routes are excluded.
#
# Schemathesis lives in a venv (Debian 12 has PEP 668: no pip into the
# system Python), cached at $NOVA_FUZZ_VENV across runs.
#
#   NOVA=target/debug/nova  NOVA_FUZZ_VENV=/tmp/nova-api-fuzz-venv
#   NOVA_FUZZ_TEMPLATES=/var/lib/nova/templates
#   NOVA_FUZZ_MAX_EXAMPLES=8  NOVA_FUZZ_MAX_TIME=100 (seconds)
#   NOVA_FUZZ_REPORT_DIR=/tmp/nova-api-fuzz-report (a HAR of every request)

set -euo pipefail

SCHEMATHESIS_VERSION=4.32.5
NOVA=${NOVA:-target/debug/nova}
VENV=${NOVA_FUZZ_VENV:-/tmp/nova-api-fuzz-venv}
TEMPLATES=${NOVA_FUZZ_TEMPLATES:-/var/lib/nova/templates}
MAX_EXAMPLES=${NOVA_FUZZ_MAX_EXAMPLES:-8}
MAX_TIME=${NOVA_FUZZ_MAX_TIME:-100}
SPEC="$PWD/crates/nova-server/openapi.json"
# Every request and answer of the last run (HAR), for reproducing a failure.
REPORT_DIR=${NOVA_FUZZ_REPORT_DIR:-/tmp/nova-api-fuzz-report}
PYTHON=/usr/bin/python3

[ -x "$NOVA" ] || { echo "api-fuzz: $NOVA is not built (make nova)" >&2; exit 1; }
[ -f "$TEMPLATES/minimal/minimal.json" ] || {
	echo "api-fuzz: no minimal template in $TEMPLATES (make images)" >&2; exit 1; }

if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q "version $SCHEMATHESIS_VERSION\$"; then
	echo "api-fuzz: installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
	rm -rf "$VENV"
	"$PYTHON" -m venv "$VENV"
	"$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

HOME_DIR=$(mktemp -d /tmp/nova-fuzz-XXXXXX)
SOCK="$HOME_DIR/nova.sock"
PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
ln -s "$TEMPLATES" "$HOME_DIR/templates"
cat >"$HOME_DIR/policy.toml" <<'EOF'
[limits]
max_sandboxes = 2
max_memory_mb = 512
max_vcpus = 2
default_timeout_secs = 30
max_timeout_secs = 60
max_upload_bytes = 1048576

[templates]
allowed = ["minimal"]
default = "minimal"

[network]
default = false
allowed = false
EOF

DAEMON=
cleanup() {
	local rc=$?
	if [ -S "$SOCK" ]; then
		# Delete every sandbox the run left.
		curl -s --max-time 10 --unix-socket "$SOCK" http://localhost/v1/sandboxes |
			"$PYTHON" -c 'import json, sys; [print(s["id"]) for s in json.load(sys.stdin)]' 2>/dev/null |
			while read -r id; do
				curl -s --max-time 30 -o /dev/null --unix-socket "$SOCK" \
					-X DELETE "http://localhost/v1/sandboxes/$id?force=true" || true
			done
	fi
	if [ -n "$DAEMON" ]; then
		kill -TERM "$DAEMON" 2>/dev/null || true
		for _ in $(seq 100); do kill -0 "$DAEMON" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$DAEMON" 2>/dev/null || true
	fi
	# Any VMM of this NOVA_HOME still running (a sandbox the deletes missed).
	for pid in $(pgrep -f -- "$HOME_DIR/" || true); do
		kill -KILL "$pid" 2>/dev/null || true
	done
	if [ $rc -ne 0 ] && [ -f "$HOME_DIR/serve.log" ]; then
		echo "--- api-fuzz: the daemon's log (last 40 lines)" >&2
		tail -n 40 "$HOME_DIR/serve.log" >&2
	fi
	rm -rf "$HOME_DIR"
	exit $rc
}
trap cleanup EXIT INT TERM

NOVA_HOME="$HOME_DIR" setsid "$NOVA" serve --listen "127.0.0.1:$PORT" >"$HOME_DIR/serve.log" 2>&1 &
DAEMON=$!
for _ in $(seq 600); do
	curl -s -o /dev/null --max-time 1 --unix-socket "$SOCK" http://localhost/v1/health && break
	kill -0 "$DAEMON" 2>/dev/null || { echo "api-fuzz: nova serve exited" >&2; exit 1; }
	sleep 0.1
done
TOKEN=$(cat "$HOME_DIR/token")

echo "api-fuzz: schemathesis $SCHEMATHESIS_VERSION against http://127.0.0.1:$PORT" \
	"(max $MAX_EXAMPLES examples per operation, ${MAX_TIME}s)"
# From inside the temporary NOVA_HOME: Schemathesis keeps a cache (.schemathesis/)
# in its working directory, which must not land in the work tree.
cd "$HOME_DIR"
"$VENV/bin/schemathesis" --no-color run "$SPEC" \
	--url "http://127.0.0.1:$PORT" \
	--header "Authorization: Bearer $TOKEN" \
	--checks not_a_server_error,response_schema_conformance \
	--exclude-operation-id exec_stream \
	--exclude-operation-id attach_exec \
	--max-examples "$MAX_EXAMPLES" \
	--max-time "$MAX_TIME" \
	--request-timeout 60 \
	--workers 1 \
	--seed "${NOVA_FUZZ_SEED:-20240601}" \
	--suppress-health-check all \
	--generation-database none \
	--report har --report-dir "$REPORT_DIR" \
	--warnings off
