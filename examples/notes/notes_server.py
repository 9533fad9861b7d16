#!/usr/bin/env python3
"""A small notes HTTP service: the example app that homesafe backs up and restores.

Standard library only (``http.server``, ``sqlite3``, ``tomllib``); Python 3.11 or later.

Contract:

* Everything it touches comes from one TOML file (``--config PATH`` or
  ``$NOTES_CONFIG``); relative paths in it are relative to that file::

      [server]
      host = "127.0.0.1"   # a loopback address: the service has no authentication
      port = 8765

      [storage]
      data_directory = "/srv/notes/data"                 # notes.db and files/
      secret_key_file = "/srv/notes/secrets/secret.key"

      [runtime]
      run_directory = "/srv/notes/run"                   # pid file and log

* Notes live in ``<data>/notes.db`` (SQLite in WAL mode: id, title, creation time and
  an HMAC of the body keyed with the secret key) and each body in
  ``<data>/files/<id>.txt``. The HMAC lets :func:`check_data_directory` prove that the
  database, the files and the key belong together.
* It refuses to start when the secret key file is missing or empty.
* HTTP API: ``GET /health`` (200 when the database opens and the files directory is
  readable, else 503), ``GET /notes`` (JSON list, oldest first), ``POST /notes`` (JSON
  ``{"title": ..., "body": ...}``, answers 201 with the new note), ``POST /flush``
  (checkpoints the WAL into notes.db, so a copy of the files alone is complete).
* Once it serves, it writes its pid to ``<run>/notes.pid``; on SIGTERM or SIGINT it
  finishes the current request, closes the database cleanly, removes the pid file and
  exits 0.

``notesctl`` (next to this file) starts it as a daemon and drives it.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import signal
import sqlite3
import sys
import tomllib
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

logger = logging.getLogger("notes")

CONFIG_ENVIRONMENT_VARIABLE = "NOTES_CONFIG"
DATABASE_NAME = "notes.db"
FILES_DIRECTORY_NAME = "files"
PID_FILE_NAME = "notes.pid"
LOG_FILE_NAME = "notes.log"
# The on-disk format version, kept in PRAGMA user_version. The homesafe manifest's
# `version` must change whenever this does, so restores can tell formats apart.
SCHEMA_VERSION = 1
MAXIMUM_REQUEST_BYTES = 1024 * 1024
MAXIMUM_TITLE_LENGTH = 200
# How long the serving loop waits for a connection before it looks at the stop flag.
STOP_POLL_SECONDS = 0.5


class NotesError(Exception):
    """A problem an operator can act on; its message says what and where."""


@dataclass(frozen=True)
class NotesConfig:
    """The settings read from one configuration file."""

    path: Path
    host: str
    port: int
    data_directory: Path
    secret_key_file: Path
    run_directory: Path

    @property
    def database_path(self) -> Path:
        return self.data_directory / DATABASE_NAME

    @property
    def files_directory(self) -> Path:
        return self.data_directory / FILES_DIRECTORY_NAME

    @property
    def pid_file(self) -> Path:
        return self.run_directory / PID_FILE_NAME

    @property
    def log_file(self) -> Path:
        return self.run_directory / LOG_FILE_NAME

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def config_path_from(argument: str | None) -> Path:
    """The configuration file named by ``--config``, else by ``$NOTES_CONFIG``."""
    value = argument or os.environ.get(CONFIG_ENVIRONMENT_VARIABLE)
    if not value:
        raise NotesError(
            f"no configuration file: pass --config PATH or set ${CONFIG_ENVIRONMENT_VARIABLE}"
        )
    # Absolute, because the daemon changes its working directory to /.
    return Path(value).absolute()


def load_config(path: Path) -> NotesConfig:
    """Read and validate the configuration file; raise NotesError naming the problem."""
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except OSError as error:
        raise NotesError(f"cannot read configuration {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise NotesError(f"configuration {path} is not valid TOML: {error}") from None

    def setting(section: str, key: str, expected_type: type) -> Any:
        value = document.get(section, {}).get(key)
        if not isinstance(value, expected_type) or isinstance(value, bool):
            raise NotesError(f"{path}: [{section}] {key} must be set to a {expected_type.__name__}")
        return value

    def path_setting(section: str, key: str) -> Path:
        value = Path(setting(section, key, str))
        return value if value.is_absolute() else path.parent / value

    host = setting("server", "host", str)
    try:
        is_loopback = ipaddress.IPv4Address(host).is_loopback
    except ValueError:
        is_loopback = False
    if not is_loopback:
        raise NotesError(
            f"{path}: [server] host must be an IPv4 loopback address such as 127.0.0.1 "
            f"(the notes service has no authentication), not {host!r}"
        )
    port = setting("server", "port", int)
    if not 1 <= port <= 65535:
        raise NotesError(f"{path}: [server] port must be between 1 and 65535, not {port}")
    return NotesConfig(
        path=path,
        host=host,
        port=port,
        data_directory=path_setting("storage", "data_directory"),
        secret_key_file=path_setting("storage", "secret_key_file"),
        run_directory=path_setting("runtime", "run_directory"),
    )


def read_secret_key(path: Path) -> bytes:
    """The secret key stored in ``path``; NotesError if it is missing or empty."""
    try:
        key = path.read_bytes().strip()
    except FileNotFoundError:
        raise NotesError(f"secret key file {path} is missing") from None
    except OSError as error:
        raise NotesError(f"cannot read secret key file {path}: {error.strerror}") from None
    if not key:
        raise NotesError(f"secret key file {path} is empty")
    if path.stat().st_mode & 0o077:
        # Not fatal: a restore that loosened permissions should still bring notes back.
        logger.warning("secret key file %s is readable by group or others", path)
    return key


def body_digest(secret_key: bytes, body: bytes) -> str:
    """The HMAC-SHA256 of a note body, as stored next to the note in notes.db."""
    return hmac.new(secret_key, body, hashlib.sha256).hexdigest()


def open_database(path: Path) -> sqlite3.Connection:
    """Open notes.db for writing, creating the schema on first use."""
    connection = sqlite3.connect(path)
    # WAL lets readers (health probes, `notesctl check`) work while the server writes;
    # the price is a -wal file that `POST /flush` folds back in before a backup.
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = FULL")
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if version == 0:
        with connection:
            connection.execute(
                "CREATE TABLE IF NOT EXISTS notes ("
                " id INTEGER PRIMARY KEY,"
                " title TEXT NOT NULL,"
                " created TEXT NOT NULL,"
                " body_digest TEXT NOT NULL)"
            )
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    elif version != SCHEMA_VERSION:
        connection.close()
        raise NotesError(
            f"{path} has schema version {version}; this server reads version {SCHEMA_VERSION}"
        )
    return connection


def open_database_read_only(path: Path) -> sqlite3.Connection:
    """Open an existing notes.db without any chance of changing it."""
    if not path.is_file():
        raise NotesError(f"{path} is missing")
    return sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)


def write_file_atomically(path: Path, content: bytes) -> None:
    """Replace ``path`` with ``content`` so readers see the old or the new file, whole."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("wb") as file:
        file.write(content)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def check_data_directory(data_directory: Path, secret_key: bytes) -> tuple[int, list[str]]:
    """Check a data directory the way a restore drill needs: (note count, problems).

    The database is opened read-only and must pass SQLite's quick check and have the
    expected schema version; every note must have its file, with the body the database
    recorded (same HMAC under ``secret_key``). No problems means the data is usable.
    """
    database_path = data_directory / DATABASE_NAME
    files_directory = data_directory / FILES_DIRECTORY_NAME
    try:
        with closing(open_database_read_only(database_path)) as connection:
            integrity = connection.execute("PRAGMA quick_check").fetchone()[0]
            if integrity != "ok":
                return 0, [f"{database_path} is damaged: {integrity}"]
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                return 0, [f"{database_path} has schema version {version}, not {SCHEMA_VERSION}"]
            rows = connection.execute("SELECT id, body_digest FROM notes ORDER BY id").fetchall()
    except NotesError as error:
        return 0, [str(error)]
    except sqlite3.Error as error:
        return 0, [f"{database_path} cannot be read: {error}"]

    problems = []
    for note_id, recorded_digest in rows:
        note_file = files_directory / f"{note_id}.txt"
        try:
            body = note_file.read_bytes()
        except FileNotFoundError:
            problems.append(f"note {note_id}: {note_file} is missing")
            continue
        except OSError as error:
            problems.append(f"note {note_id}: cannot read {note_file}: {error.strerror}")
            continue
        if not hmac.compare_digest(body_digest(secret_key, body), recorded_digest):
            problems.append(
                f"note {note_id}: {note_file} does not match the database "
                "(altered file, or a secret key from another installation)"
            )
    return len(rows), problems


class NotesStore:
    """The notes of one data directory: rows in notes.db, bodies in files/<id>.txt."""

    def __init__(self, data_directory: Path, secret_key: bytes) -> None:
        self.database_path = data_directory / DATABASE_NAME
        self.files_directory = data_directory / FILES_DIRECTORY_NAME
        self.secret_key = secret_key
        self.files_directory.mkdir(parents=True, exist_ok=True)
        self.connection = open_database(self.database_path)

    def note_file(self, note_id: int) -> Path:
        return self.files_directory / f"{note_id}.txt"

    def add(self, title: str, body: str) -> dict[str, Any]:
        """Store a new note and return it as ``GET /notes`` would."""
        created = datetime.now(UTC).isoformat(timespec="seconds")
        content = body.encode()
        # One transaction: the row commits only once its file is safely on disk, so a
        # crash can leave a stray file but never a note without one.
        with self.connection:
            cursor = self.connection.execute(
                "INSERT INTO notes (title, created, body_digest) VALUES (?, ?, ?)",
                (title, created, body_digest(self.secret_key, content)),
            )
            note_id = cursor.lastrowid
            assert note_id is not None
            write_file_atomically(self.note_file(note_id), content)
        return {"id": note_id, "title": title, "created": created, "body": body}

    def notes(self) -> list[dict[str, Any]]:
        """Every note, oldest first; a note whose file is missing has a null body."""
        rows = self.connection.execute(
            "SELECT id, title, created FROM notes ORDER BY id"
        ).fetchall()
        notes = []
        for note_id, title, created in rows:
            try:
                body: str | None = self.note_file(note_id).read_text()
            except FileNotFoundError:
                body = None
            notes.append({"id": note_id, "title": title, "created": created, "body": body})
        return notes

    def flush(self) -> dict[str, str]:
        """Fold the WAL into notes.db and empty it; NotesError if a reader blocked that."""
        busy = self.connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        if busy:
            raise NotesError("the WAL checkpoint was blocked by a reader; try again")
        return {"status": "checkpointed"}

    def health_problem(self) -> str | None:
        """None when healthy, else what is wrong.

        A fresh read-only connection, not the server's own, so that a notes.db replaced
        or damaged on disk shows up even though the open connection might still work.
        """
        try:
            with closing(open_database_read_only(self.database_path)) as connection:
                connection.execute("SELECT count(*) FROM notes").fetchone()
        except NotesError as error:
            return str(error)
        except sqlite3.Error as error:
            return f"{self.database_path} cannot be read: {error}"
        try:
            with os.scandir(self.files_directory) as entries:
                next(entries, None)
        except OSError as error:
            return f"{self.files_directory} is not readable: {error.strerror}"
        return None

    def close(self) -> None:
        """Checkpoint and close; a damaged database is logged, not raised, on the way out."""
        try:
            self.connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as error:
            logger.error("could not checkpoint %s while stopping: %s", self.database_path, error)
        finally:
            self.connection.close()


class NotesHTTPServer(HTTPServer):
    """An HTTP server that hands its requests the notes store.

    Single-threaded on purpose: one connection to SQLite, no locking, and a stop signal
    is seen between two requests, never in the middle of a write.
    """

    def __init__(self, address: tuple[str, int], store: NotesStore) -> None:
        super().__init__(address, NotesRequestHandler)
        self.store = store
        self.timeout = STOP_POLL_SECONDS


class NotesRequestHandler(BaseHTTPRequestHandler):
    """The HTTP API described in the module docstring."""

    server: NotesHTTPServer
    server_version = "notes/1"
    # A client that stops sending must not block the single-threaded server for long.
    timeout = 10

    def do_GET(self) -> None:
        if self.path == "/health":
            problem = self.server.store.health_problem()
            if problem is None:
                self.send_json(HTTPStatus.OK, {"status": "ok"})
            else:
                self.send_json(
                    HTTPStatus.SERVICE_UNAVAILABLE, {"status": "unhealthy", "problem": problem}
                )
        elif self.path == "/notes":
            self.answer(lambda: (HTTPStatus.OK, self.server.store.notes()))
        else:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no such resource: {self.path}"})

    def do_POST(self) -> None:
        if self.path == "/notes":
            self.answer(self.create_note)
        elif self.path == "/flush":
            self.answer(lambda: (HTTPStatus.OK, self.server.store.flush()))
        else:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no such resource: {self.path}"})

    def create_note(self) -> tuple[HTTPStatus, Any]:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return HTTPStatus.LENGTH_REQUIRED, {"error": "a Content-Length header is required"}
        if not 0 <= length <= MAXIMUM_REQUEST_BYTES:
            return HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {
                "error": f"a note is at most {MAXIMUM_REQUEST_BYTES} bytes"
            }
        try:
            request = json.loads(self.rfile.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return HTTPStatus.BAD_REQUEST, {"error": "the request body is not JSON"}
        if not isinstance(request, dict):
            return HTTPStatus.BAD_REQUEST, {"error": 'expected {"title": ..., "body": ...}'}
        title, body = request.get("title"), request.get("body")
        if not isinstance(title, str) or not 0 < len(title) <= MAXIMUM_TITLE_LENGTH:
            return HTTPStatus.BAD_REQUEST, {
                "error": f"title must be a string of 1 to {MAXIMUM_TITLE_LENGTH} characters"
            }
        if not isinstance(body, str):
            return HTTPStatus.BAD_REQUEST, {"error": "body must be a string"}
        return HTTPStatus.CREATED, self.server.store.add(title, body)

    def answer(self, produce: Any) -> None:
        """Send what ``produce()`` returns; store failures become a JSON 500 or 503."""
        try:
            status, payload = produce()
        except NotesError as error:
            status, payload = HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(error)}
        except (sqlite3.Error, OSError) as error:
            logger.exception("%s %s failed", self.command, self.path)
            status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(error)}
        self.send_json(status, payload)

    def send_json(self, status: HTTPStatus, payload: Any) -> None:
        content = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def log_message(self, format: str, *args: Any) -> None:
        # The default writes to stderr without a level; go through logging instead.
        logger.info("%s %s", self.address_string(), format % args)


def write_pid_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(f"{os.getpid()}\n")
    os.replace(temporary, path)


def remove_pid_file(path: Path) -> None:
    """Remove the pid file if it still names this process (never another server's)."""
    try:
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except FileNotFoundError:
        pass


def serve(config: NotesConfig) -> None:
    """Serve until SIGTERM or SIGINT; NotesError if the server cannot start."""
    secret_key = read_secret_key(config.secret_key_file)
    store = NotesStore(config.data_directory, secret_key)
    try:
        server = NotesHTTPServer((config.host, config.port), store)
    except OSError as error:
        store.close()
        raise NotesError(
            f"cannot listen on {config.host}:{config.port}: {error.strerror}"
        ) from None

    stop_requested = False

    def request_stop(signal_number: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    write_pid_file(config.pid_file)
    logger.info("serving %s on %s", config.data_directory, config.base_url)
    try:
        while not stop_requested:
            server.handle_request()
    finally:
        server.server_close()
        store.close()
        remove_pid_file(config.pid_file)
        logger.info("stopped")


def main(arguments: list[str] | None = None) -> int:
    """Run the server in the foreground; exit 1 with a message if it cannot start."""
    parser = argparse.ArgumentParser(description="Serve notes over HTTP on 127.0.0.1.")
    parser.add_argument(
        "--config", help=f"configuration file (default: ${CONFIG_ENVIRONMENT_VARIABLE})"
    )
    options = parser.parse_args(arguments)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s notes[%(process)d] %(levelname)s %(message)s"
    )
    try:
        serve(load_config(config_path_from(options.config)))
    except NotesError as error:
        logger.error("cannot start: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
