#!/bin/sh
# The image's HEALTHCHECK (and the Kubernetes agent's exec probe): exit 0 healthy, 1 not.
#   controller  the panel answers GET /api/session (public, no token needed) with 200
#   agent       its harness process is alive (an agent that lost its controller keeps reconnecting by
#               design: that is not a reason to restart it; the controller's panel shows its health)
#   start       its harness process is alive
#   other       nothing to check (a one-off command such as `runs`)
# It reads what docker/entrypoint.sh recorded in $HARNESS_STATE_DIR/role: role, pid, port, host.
set -eu

state="${HARNESS_STATE_DIR:-/tmp/harness-container}/role"
if [ ! -r "$state" ]; then
    exit 0
fi
{
    read -r role || true
    read -r pid || true
    read -r port || true
    read -r host || true
} <"$state"

alive() {
    [ -n "${pid:-}" ] && [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "harness"
}

if ! alive; then
    echo "harness-healthcheck: the ${role:-harness} process ${pid:-?} is not running" >&2
    exit 1
fi
case "${role:-}" in
    controller)
        case "${host:-}" in
            "" | 0.0.0.0) host=127.0.0.1 ;;
            :: | "[::]") host="[::1]" ;;
            *:*) host="[$host]" ;;
        esac
        exec python - "http://$host:${port:-8089}/api/session" <<'PY'
import sys
import urllib.request

opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an HTTP proxy
try:
    with opener.open(sys.argv[1], timeout=4) as response:
        ok = response.status == 200
except OSError as exc:
    print(f"harness-healthcheck: {sys.argv[1]}: {exc}", file=sys.stderr)
    ok = False
sys.exit(0 if ok else 1)
PY
        ;;
esac
exit 0
