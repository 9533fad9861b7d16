#!/usr/bin/env bash
# The homesafe demo: install two example apps, back them up, damage them, restore them,
# and prove the data came back.
#
# `make demo` runs it with the project's virtualenv on PATH (the `homesafe` command).
# Everything happens under DEMO (default: ./.demo), which is wiped first, provided it
# was made by this script. The notes server listens on a free port of 127.0.0.1 and is
# stopped on exit, whatever happens. Exit status: 0 when every check passed, else 1.
#
#   DEMO/srv/notes/       notesctl and notes_server.py (bin/), config (etc/), key
#                         (secrets/), data (data/), pid file and log (run/)
#   DEMO/srv/bookmarks/   data/ with one file per bookmark
#   DEMO/config/apps.d/   the rendered manifests   (HOMESAFE_CONFIG)
#   DEMO/home/            homesafe's state and default repository   (HOMESAFE_HOME)
#   DEMO/expected/        what the data looked like at backup time, to compare with
set -euo pipefail
# Let the ERR trap see failures inside functions as well.
set -o errtrace

EXAMPLES=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Manifests need absolute, normalised paths.
DEMO=$(python3 -c 'import os, sys; print(os.path.abspath(sys.argv[1]))' "${DEMO_DIR:-$PWD/.demo}")
ROOT=$DEMO/srv
NOTES_CONFIG_FILE=$ROOT/notes/etc/notes.toml
EXPECTED=$DEMO/expected
# Only a directory carrying this marker is ever wiped: DEMO_DIR=$HOME must not be.
MARKER=.homesafe-demo
export HOMESAFE_HOME=$DEMO/home
export HOMESAFE_CONFIG=$DEMO/config
# homesafe refuses group- or other-writable manifests when run as root.
umask 022

say() { printf '\n==> %s\n' "$*"; }
die() {
    printf 'demo FAILED: %s\n' "$*" >&2
    exit 1
}
# Show a command, run it, and name it if it fails.
run() {
    printf '$ %s\n' "$*"
    local status=0
    "$@" || status=$?
    [[ $status -eq 0 ]] || die "'$*' exited with status $status"
}
notesctl() { "$ROOT/notes/bin/notesctl" --config "$NOTES_CONFIG_FILE" "$@"; }

# Stop the notes server of an earlier or of this run, if one is installed.
stop_notes() {
    if [[ -x $ROOT/notes/bin/notesctl && -f $NOTES_CONFIG_FILE ]]; then
        notesctl stop || true
    fi
}
on_exit() {
    local status=$?
    trap - ERR
    stop_notes >/dev/null 2>&1
    if [[ $status -ne 0 ]]; then
        if [[ -e $DEMO/$MARKER ]]; then
            printf 'demo: the demo area is kept in %s for a look\n' "$DEMO" >&2
        fi
        exit 1
    fi
}
trap on_exit EXIT
trap 'printf "demo: command failed at line %s: %s\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

# Copy TEMPLATE to DESTINATION with MODE, replacing @ROOT@ and @PORT@. The root is
# escaped as TOML string content, so any directory name gives valid TOML.
render() {
    local template=$1 destination=$2 mode=$3
    python3 - "$template" "$destination" "$ROOT" "${NOTES_PORT:-}" <<'PYTHON'
import json
import re
import sys

template, destination, root, port = sys.argv[1:]
text = open(template, encoding="utf-8").read()
text = text.replace("@ROOT@", json.dumps(root)[1:-1]).replace("@PORT@", port)
leftover = re.search(r"@[A-Z_]+@", text)
if leftover:
    sys.exit(f"{template}: no value for placeholder {leftover.group()}")
with open(destination, "w", encoding="utf-8") as file:
    file.write(text)
PYTHON
    chmod "$mode" "$destination"
}

# The notes API, spoken with the standard library (curl is not everywhere). Proxies
# from the environment are bypassed: the server is on loopback.
notes_api() {
    python3 - "$NOTES_PORT" "$@" <<'PYTHON'
import json
import sys
import urllib.error
import urllib.request

port, method, path, *payload = sys.argv[1:]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
data = json.dumps({"title": payload[0], "body": payload[1]}).encode() if payload else None
request = urllib.request.Request(
    f"http://127.0.0.1:{port}{path}",
    data=data,
    method=method,
    headers={"Content-Type": "application/json"},
)
try:
    with opener.open(request, timeout=10) as response:
        answer = json.load(response)
except urllib.error.HTTPError as error:
    sys.exit(f"{method} {path} answered {error.code}: {error.read().decode(errors='replace')}")
except OSError as error:
    sys.exit(f"{method} {path}: cannot reach notes on port {port}: {error}")
# Sorted and indented, so two answers compare with diff.
print(json.dumps(answer, indent=2, sort_keys=True, ensure_ascii=False))
PYTHON
}

command -v homesafe >/dev/null ||
    die "the homesafe command is not on PATH (run 'make demo', or activate .venv first)"

say "Preparing the demo area $DEMO"
if [[ -e $DEMO ]]; then
    if [[ -e $DEMO/$MARKER ]]; then
        stop_notes
        rm -rf -- "$DEMO"
    elif [[ -n $(ls -A -- "$DEMO") ]]; then
        die "$DEMO exists and was not made by this demo; refusing to wipe it (set DEMO_DIR)"
    fi
fi
mkdir -p -- "$DEMO"
touch "$DEMO/$MARKER"
mkdir -p "$HOMESAFE_CONFIG/apps.d" "$EXPECTED/bookmarks"
chmod 0755 "$HOMESAFE_CONFIG" "$HOMESAFE_CONFIG/apps.d"

say "Installing the notes app under $ROOT/notes"
NOTES_PORT=$(python3 -c '
import socket
with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    print(probe.getsockname()[1])')
mkdir -p "$ROOT/notes/bin" "$ROOT/notes/etc" "$ROOT/notes/data" "$ROOT/notes/run"
install -m 0700 -d "$ROOT/notes/secrets"
install -m 0755 "$EXAMPLES/notes/notesctl" "$ROOT/notes/bin/notesctl"
install -m 0644 "$EXAMPLES/notes/notes_server.py" "$ROOT/notes/bin/notes_server.py"
render "$EXAMPLES/notes/config.toml.in" "$NOTES_CONFIG_FILE" 0644
(
    umask 077
    python3 -c 'import secrets; print(secrets.token_hex(32))' >"$ROOT/notes/secrets/secret.key"
)
chmod 0600 "$ROOT/notes/secrets/secret.key"
echo "notes: config $NOTES_CONFIG_FILE, port $NOTES_PORT, key $ROOT/notes/secrets/secret.key"

say "Installing the bookmarks app under $ROOT/bookmarks"
mkdir -p "$ROOT/bookmarks/data"

say "Declaring both apps to homesafe in $HOMESAFE_CONFIG/apps.d"
render "$EXAMPLES/notes/notes.toml.in" "$HOMESAFE_CONFIG/apps.d/notes.toml" 0644
render "$EXAMPLES/bookmarks/bookmarks.toml.in" "$HOMESAFE_CONFIG/apps.d/bookmarks.toml" 0644
run homesafe apps check
run homesafe apps list

say "Starting notes and filling both apps with data"
run notesctl start
notes_api POST /notes "Groceries" "eggs, flour, coffee" >/dev/null
notes_api POST /notes "Backup policy" "nightly, keep 7 daily and 4 weekly" >/dev/null
notes_api POST /notes "Héllo ünicode" "multi-line body
second line" >/dev/null
printf 'https://borgbackup.readthedocs.io/\n' >"$ROOT/bookmarks/data/borg.url"
printf 'https://restic.net/\n' >"$ROOT/bookmarks/data/restic.url"
notes_api GET /notes | tee "$EXPECTED/notes.json"
cp -p "$ROOT/bookmarks/data/"* "$EXPECTED/bookmarks/"
run notesctl check

say "Backing up"
run homesafe backup --comment "demo"
# homesafe may stop notes while it copies; it must have started it again.
run notesctl status
run homesafe archives list
ARCHIVE=$(homesafe archives list --json | python3 -c '
import json
import sys

archives = json.load(sys.stdin)["archives"]
if not archives:
    sys.exit("homesafe archives list --json lists no archive")
print(archives[-1]["name"])  # newest last')
echo "newest archive: $ARCHIVE"

say "Damaging the data"
run rm "$ROOT/notes/data/files/2.txt"
printf 'this is not an SQLite database' >"$ROOT/notes/data/notes.db"
echo "overwrote $ROOT/notes/data/notes.db with garbage"
run rm "$ROOT/bookmarks/data/restic.url"
if notesctl check; then
    die "notesctl check passed on damaged data"
fi
echo "notesctl check fails on the damaged data, as it should"

say "What a restore of $ARCHIVE would change"
run homesafe restore --dry-run "$ARCHIVE"

say "Restoring $ARCHIVE"
run homesafe restore "$ARCHIVE"

say "Checking that the data is back"
notesctl status ||
    die "notes is not running after the restore: homesafe should have started it again"
notes_api GET /notes >"$DEMO/restored-notes.json" ||
    die "notes does not answer GET /notes after the restore"
if ! diff -u "$EXPECTED/notes.json" "$DEMO/restored-notes.json"; then
    die "GET /notes after the restore differs from before the backup (diff above)"
fi
echo "GET /notes answers the $(grep -c '"id"' "$DEMO/restored-notes.json") notes of the backup"
run notesctl check
if ! diff -r "$EXPECTED/bookmarks" "$ROOT/bookmarks/data"; then
    die "the bookmarks after the restore differ from before the backup (diff above)"
fi
echo "the bookmark files are back:" "$ROOT"/bookmarks/data/*

say "A restore drill: $ARCHIVE restored into a sandbox, its health checked"
run homesafe verify "$ARCHIVE"

say "Stopping notes"
run notesctl stop
echo
echo "demo succeeded: notes and bookmarks were backed up, damaged and restored intact"
