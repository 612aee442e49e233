#!/usr/bin/env bash
# The unmodified `e2b` Python SDK (PyPI) and JS SDK (npm), both pinned below, against a
# `nova serve --e2b-listen` on loopback with a private NOVA_HOME (templates
# symlinked from $NOVA_TEMPLATES, default $NOVA_HOME/templates; network
# off). Prints each step's time; exits non-zero on the first failure.
#
#   tests/e2b/run.sh            (make e2b-test builds nova first)
#
# Env: NOVA (the nova binary), E2B_VENV (venv cache, default target/e2b-venv),
# E2B_NODE_DIR (npm cache, default target/e2b-node), E2B_TEST_TEMPLATE (default minimal).
set -euo pipefail

E2B_VERSION=2.63.0
E2B_JS_VERSION=2.51.0
root=$(cd "$(dirname "$0")/../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
nova=${NOVA:-$target/debug/nova}
venv=${E2B_VENV:-$target/e2b-venv}
node_dir=${E2B_NODE_DIR:-$target/e2b-node}
if [ "$(id -u)" = 0 ]; then default_home=/var/lib/nova; else default_home=$HOME/.local/share/nova; fi
templates=${NOVA_TEMPLATES:-${NOVA_HOME:-$default_home}/templates}

[ -x "$nova" ] || { echo "e2b-test: no nova binary at $nova (cargo build -p nova-cli)"; exit 1; }
if [ ! -f "$templates/minimal/minimal.json" ]; then
    echo "SKIP e2b-test: no templates in $templates (make images)"
    exit 0
fi

if ! "$venv/bin/python" -c "import e2b, importlib.metadata as m; assert m.version('e2b') == '$E2B_VERSION'" 2>/dev/null; then
    echo "e2b-test: installing e2b==$E2B_VERSION into $venv"
    if ! { python3 -m venv "$venv" && "$venv/bin/pip" install --quiet "e2b==$E2B_VERSION"; }; then
        rm -rf "$venv"
        echo "SKIP e2b-test: cannot install e2b==$E2B_VERSION from PyPI (offline?)"
        exit 0
    fi
fi

home=$(mktemp -d /tmp/nova-e2b-test.XXXXXX)
daemon_pid=
cleanup() {
    if [ -n "$daemon_pid" ] && [ -n "${api_port:-}" ] && [ -s "$home/token" ]; then
        # Sandboxes outlive `nova serve` (a next daemon re-attaches them):
        # delete every one this run made, even after a failure.
        NOVA_API="http://127.0.0.1:$api_port" NOVA_TOKEN=$(cat "$home/token") python3 - <<'PY' || true
import json, os, urllib.request
api, auth = os.environ["NOVA_API"], {"Authorization": "Bearer " + os.environ["NOVA_TOKEN"]}
for sb in json.load(urllib.request.urlopen(urllib.request.Request(api + "/v1/sandboxes", headers=auth), timeout=10)):
    req = urllib.request.Request(f"{api}/v1/sandboxes/{sb['id']}?force=true", headers=auth, method="DELETE")
    try:
        urllib.request.urlopen(req, timeout=30)
    except Exception as e:
        print("e2b-test cleanup:", sb["id"], e)
PY
    fi
    if [ -n "$daemon_pid" ]; then
        # The daemon we started, and its process group (setsid below).
        kill -TERM -- "-$daemon_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$daemon_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL -- "-$daemon_pid" 2>/dev/null || true
    fi
    rm -rf "$home"
}
trap cleanup EXIT

ln -s "$templates" "$home/templates"
cat > "$home/policy.toml" <<TOML
[templates]
default = "minimal"

[network]
default = false
TOML
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
api_port=$(free_port)
NOVA_HOME=$home setsid "$nova" serve --e2b-listen "127.0.0.1:$port" --listen "127.0.0.1:$api_port" > "$home/daemon.log" 2>&1 &
daemon_pid=$!

for _ in $(seq 300); do
    [ -s "$home/token" ] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    kill -0 "$daemon_pid" 2>/dev/null || { cat "$home/daemon.log"; echo "e2b-test: the daemon exited"; exit 1; }
    sleep 0.1
done

export E2B_API_URL="http://127.0.0.1:$port"
export E2B_SANDBOX_URL="http://127.0.0.1:$port"
export E2B_API_KEY=$(cat "$home/token")
export E2B_TEST_TEMPLATE=${E2B_TEST_TEMPLATE:-minimal}
export NOVA_API_URL="http://127.0.0.1:$api_port"   # the daemon's own API, for the benchmark
if ! "$venv/bin/python" "$root/tests/e2b/test_sdk.py"; then
    echo "--- daemon log (tail):"
    tail -n 40 "$home/daemon.log"
    exit 1
fi

# The npm package: create, run, files (Node 18+ needed).
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "SKIP e2b-test (JS): no node/npm on this host"
    exit 0
fi
if [ "$(node -p "try { require('$node_dir/node_modules/e2b/package.json').version } catch { '' }")" != "$E2B_JS_VERSION" ]; then
    echo "e2b-test: installing npm e2b@$E2B_JS_VERSION into $node_dir"
    mkdir -p "$node_dir"
    [ -f "$node_dir/package.json" ] || echo '{"name":"nova-e2b-test","private":true}' > "$node_dir/package.json"
    if ! (cd "$node_dir" && npm install --silent --no-audit --no-fund "e2b@$E2B_JS_VERSION"); then
        echo "SKIP e2b-test (JS): cannot install e2b@$E2B_JS_VERSION from npm (offline?)"
        exit 0
    fi
fi
if ! E2B_NODE_MODULES="$node_dir/node_modules" node "$root/tests/e2b/test_sdk.mjs"; then
    echo "--- daemon log (tail):"
    tail -n 40 "$home/daemon.log"
    exit 1
fi
