#!/usr/bin/env bash
# Run one command against a private local Ray head, then stop that head and nothing else.
#
#   deploy/local_head.sh ray job submit --working-dir . -- python recipes/sft_then_dpo.py
#
# The head gets its own temp dir (a fresh mktemp dir, outside any working dir a job packages) and
# its own free ports, so it neither joins nor disturbs another Ray on the machine. The command sees
# RAY_API_SERVER_ADDRESS (the head's dashboard, for `ray job ...`) and RAY_ADDRESS (its GCS).
# Stopping sends SIGTERM to this head's `ray start --block`, which stops the processes it started,
# then kills whatever is left of this head: its session and what runs from its temp dir. Never
# `ray stop`, which stops every Ray on the machine. The head's logs are kept (and named) only when
# something failed.
# Needs `ray` and `python3` on PATH (`make demo` puts .venv/bin first) and `setsid` (util-linux).
set -uo pipefail

if [ $# -eq 0 ]; then
    echo "usage: $0 COMMAND [ARG...]" >&2
    exit 2
fi

command -v setsid >/dev/null || { echo "local_head.sh: needs setsid (util-linux)" >&2; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/rayalign-head.XXXXXX")
head_pid=""
command_pid=""
status=1
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0

stop_head() {
    trap - EXIT INT TERM
    if [ -n "$head_pid" ] && kill -0 "$head_pid" 2>/dev/null; then
        kill -TERM "$head_pid" 2>/dev/null
        for _ in $(seq 60); do
            kill -0 "$head_pid" 2>/dev/null || break
            sleep 0.5
        done
    fi
    # What is left of this head, and only of it: its session (raylet, GCS, dashboard, workers, each
    # in a process group of its own) and what runs in or from its temp dir (a job's driver, which
    # Ray starts in a session of its own, inside the job's unpacked working dir).
    python3 - "${head_pid:--1}" "$work" <<'EOF'
import os, signal, sys
head, work = int(sys.argv[1]), sys.argv[2] + "/"
for pid in (int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()):
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd") + "/"
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read().decode(errors="replace")
        if os.getsid(pid) == head or cwd.startswith(work) or work in cmdline:
            os.kill(pid, signal.SIGKILL)
    except OSError:  # gone already, or not ours to read
        pass
EOF
    if [ "$status" -eq 0 ]; then
        rm -rf "$work"
    else
        echo "local_head.sh: the head's logs are kept in $work" >&2
    fi
}
trap stop_head EXIT
trap 'status=130; [ -n "$command_pid" ] && kill -TERM "$command_pid" 2>/dev/null; exit 130' INT
trap 'status=143; [ -n "$command_pid" ] && kill -TERM "$command_pid" 2>/dev/null; exit 143' TERM

# Free ports, outside the range Ray keeps for its workers (10002-19999).
read -r gcs dash agent agent_grpc client metrics runtime_env < <(python3 - <<'EOF'
import socket
socks = []
while len(socks) < 7:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    if 10002 <= s.getsockname()[1] <= 19999:
        s.close()
    else:
        socks.append(s)
print(*(s.getsockname()[1] for s in socks))
EOF
)

# Ray 2.60 clusters use token auth; create ~/.ray/auth_token unless one exists.
ray get-auth-token --generate >/dev/null || exit 1
# setsid: the head leads a session of its own, by which `stop_head` finds what is left of it.
setsid bash -c 'echo $$ > "$0/head.pid"; exec "$@"' "$work" \
    ray start --head --block --temp-dir="$work/ray" --port="$gcs" --dashboard-host=127.0.0.1 \
    --dashboard-port="$dash" --dashboard-agent-listen-port="$agent" --dashboard-agent-grpc-port="$agent_grpc" \
    --ray-client-server-port="$client" --metrics-export-port="$metrics" --runtime-env-agent-port="$runtime_env" \
    --disable-usage-stats >"$work/head.log" 2>&1 &
for _ in $(seq 100); do
    [ -s "$work/head.pid" ] && break
    sleep 0.1
done
head_pid=$(cat "$work/head.pid" 2>/dev/null)

export RAY_API_SERVER_ADDRESS="http://127.0.0.1:$dash" RAY_ADDRESS="127.0.0.1:$gcs"
# Ready means a job runs: until the head's job agent registers, Ray refuses submissions.
deadline=$((SECONDS + 300))
until timeout 120 ray job submit -- true >"$work/probe.log" 2>&1; do
    if ! kill -0 "$head_pid" 2>/dev/null; then
        echo "local_head.sh: the Ray head exited while starting:" >&2
        tail -n 20 "$work/head.log" >&2
        exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "local_head.sh: the Ray head accepted no job within 300 s:" >&2
        tail -n 20 "$work/probe.log" >&2
        exit 1
    fi
    sleep 2
done
echo "local_head.sh: Ray head at $RAY_API_SERVER_ADDRESS (pid $head_pid, temp dir $work/ray)"

# In the background, so that a signal to this script stops the head now, not when the command ends.
"$@" &
command_pid=$!
wait "$command_pid"
status=$?
exit "$status"
