"""History: every operation (backup, restore, prune, check, verify) as a job row.

A job records when it started and finished, its repository and archive, its status,
each app's status, strategy, downtime, size and errors, and the whole result as JSON.
:func:`record_operation` is called by the operations themselves at their end; a
scheduled run opens its job first with :func:`job`, so that an attempt that dies half
way is still seen (its row stays ``running`` with the pid of a process that is gone,
or that was started after the row by a pid reused since, which listings show as
``interrupted``), and the operation's result then fills that row.

Recording never fails an operation: a state database that cannot be written is logged.
Passphrases never reach this table (results carry none; errors are masked upstream).
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from homesafe import processes, state

if TYPE_CHECKING:
    from homesafe.api import OperationResult

__all__ = [
    "AppRecord",
    "Job",
    "JobHandle",
    "job",
    "jobs",
    "last_app_attempts",
    "last_good_backups",
    "record_failure",
    "record_job",
    "record_operation",
    "repositories",
    "scheduled_jobs",
]

logger = logging.getLogger(__name__)

UTC = datetime.UTC
GOOD = ("ok", "partial")  # a backup that left an archive


@dataclass
class AppRecord:
    """How one app fared in one job."""

    app: str
    status: str
    strategy: str
    downtime: float
    size: int
    errors: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "status": self.status,
            "strategy": self.strategy,
            "downtime_seconds": self.downtime,
            "size": self.size,
            "errors": self.errors,
        }


@dataclass
class Job:
    """One operation as history keeps it. Times are aware (UTC)."""

    id: int
    operation: str
    trigger: str
    status: str
    repository: str
    archive: str
    started: datetime.datetime
    finished: datetime.datetime | None
    scheduled_at: datetime.datetime | None
    periods: list[str]
    error: str
    apps: list[AppRecord]
    detail: dict[str, Any]

    @property
    def duration(self) -> float | None:
        if self.finished is None:
            return None
        return (self.finished - self.started).total_seconds()

    def app(self, app_id: str) -> AppRecord | None:
        return next((record for record in self.apps if record.app == app_id), None)

    def to_dict(self, *, detail: bool = True) -> dict[str, Any]:
        value: dict[str, Any] = {
            "id": self.id,
            "operation": self.operation,
            "trigger": self.trigger,
            "status": self.status,
            "repository": self.repository,
            "archive": self.archive,
            "started": self.started.isoformat(),
            "finished": self.finished.isoformat() if self.finished else None,
            "duration_seconds": None if self.duration is None else round(self.duration, 3),
            "scheduled_at": self.scheduled_at.isoformat() if self.scheduled_at else None,
            "periods": self.periods,
            "error": self.error,
            "apps": [record.to_dict() for record in self.apps],
        }
        if detail:
            value["detail"] = self.detail
        return value


@dataclass
class JobHandle:
    """An open job: the row :func:`record_operation` fills for this operation."""

    id: int
    operation: str
    recorded: bool = False


_open_job: contextvars.ContextVar[JobHandle | None] = contextvars.ContextVar(
    "homesafe_open_job", default=None
)


def _now() -> datetime.datetime:
    return datetime.datetime.now(UTC)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


# -- writing ---------------------------------------------------------------------------


@contextmanager
def job(
    operation: str,
    repository: str,
    *,
    trigger: str = "scheduled",
    periods: Sequence[str] = (),
    scheduled_at: datetime.datetime | None = None,
) -> Iterator[JobHandle]:
    """Open a ``running`` job row for the ``with`` block.

    Inside it, :func:`record_operation` for the same operation fills this row. If the
    block raises before that, the row is closed as failed with the error's message (and
    the error goes on). Unlike :func:`record_operation`, opening the row may raise: a
    scheduled run must not start when it cannot be recorded.
    """
    with state.connect() as connection:
        cursor = connection.execute(
            "INSERT INTO jobs (operation, trigger, status, repository, archive, started, "
            "scheduled_at, periods, process, error, detail) "
            "VALUES (?, ?, 'running', ?, '', ?, ?, ?, ?, '', '{}')",
            (
                operation,
                trigger,
                repository,
                _now().isoformat(),
                scheduled_at.astimezone(UTC).isoformat() if scheduled_at else None,
                json.dumps(list(periods)),
                os.getpid(),
            ),
        )
        assert cursor.lastrowid is not None
        handle = JobHandle(cursor.lastrowid, operation)
    token = _open_job.set(handle)
    try:
        yield handle
    except BaseException as error:
        if not handle.recorded:
            message = getattr(error, "message", None) or str(error) or type(error).__name__
            _close_failed(handle, message)
        raise
    finally:
        _open_job.reset(token)
    if not handle.recorded:
        _close_failed(handle, f"the {operation} ended without a result")


def _close_failed(handle: JobHandle, message: str) -> None:
    handle.recorded = True
    try:
        with state.connect() as connection:
            connection.execute(
                "UPDATE jobs SET status = 'failed', finished = ?, error = ?, detail = ? "
                "WHERE id = ?",
                (
                    _now().isoformat(),
                    _first_line(message),
                    json.dumps({"errors": [{"type": "error", "message": message}]}),
                    handle.id,
                ),
            )
    except (sqlite3.Error, OSError) as error:
        logger.warning("could not record job %s in the history: %s", handle.id, error)


def record_operation(result: OperationResult) -> int | None:
    """Record a finished backup or restore (an :class:`~homesafe.api.OperationResult`).

    Returns the job id, or None when the state database could not be written (that is
    logged, never raised: the operation itself is done). A backup to several
    repositories is one job per repository (each repository's history and last good
    backup are its own); the last one's id is returned.
    """
    try:
        document = result.to_dict()
        job_id = None
        for each in _per_destination(document):
            job_id = _record_result(each)
        return job_id
    except Exception as error:  # the operation is done: its history must not undo that
        logger.warning("could not record the %s in the history: %s", result.operation, error)
        return None


def _per_destination(document: dict[str, Any]) -> list[dict[str, Any]]:
    """``document`` as the job of each repository it was written to: that repository's
    engine figures, and failed (with its error) where the archive was not written."""
    destinations = document.get("destinations") or []
    if not destinations:
        return [document]
    documents = []
    for destination in destinations:
        each = {**document, "repository": destination["repository"]}
        each["engine"] = destination.get("engine")
        if destination["status"] == "failed":
            each["status"] = "failed"
            message = f"not written to {destination['repository']}: {destination['error']}"
            each["errors"] = [
                *document.get("errors", []),
                {"type": "engine", "app": "*", "hook": None, "message": message},
            ]
        elif document.get("status") == "partial" and not any(
            app.get("status") == "failed" for app in document.get("apps", [])
        ):
            each["status"] = "ok"  # partial only because another repository failed
        documents.append(each)
    return documents


def _record_result(document: dict[str, Any]) -> int:
    operation = str(document["operation"])
    started = _parse_time(document.get("started")) or _now()
    finished = started + datetime.timedelta(seconds=float(document.get("duration_seconds", 0)))
    errors = [
        str(error.get("message", ""))
        for error in [
            *document.get("errors", []),
            *(error for app in document.get("apps", []) for error in app.get("errors", [])),
        ]
    ]
    apps = [
        AppRecord(
            app=str(app["app"]),
            status=str(app.get("status", "")),
            strategy=str(app.get("strategy", "")),
            downtime=float(app.get("downtime_seconds") or 0.0),
            size=int(app.get("size") or 0),
            errors=list(app.get("errors", [])),
        )
        for app in document.get("apps", [])
    ]
    return record_job(
        operation,
        str(document.get("repository", "")),
        status=str(document.get("status", "failed")),
        archive=str(document.get("archive", "")),
        started=started,
        finished=finished,
        error=next((_first_line(message) for message in errors if message.strip()), ""),
        apps=apps,
        detail=document,
    )


def record_job(
    operation: str,
    repository: str,
    *,
    status: str,
    archive: str = "",
    started: datetime.datetime | None = None,
    finished: datetime.datetime | None = None,
    error: str = "",
    apps: Sequence[AppRecord] = (),
    detail: dict[str, Any] | None = None,
    trigger: str = "manual",
    periods: Sequence[str] = (),
    scheduled_at: datetime.datetime | None = None,
) -> int:
    """Record a finished job; the open job of the same operation (see :func:`job`)
    is filled instead of a new row being added. Returns the job id."""
    handle = _open_job.get()
    finished = finished or _now()
    started = started or finished
    detail_text = json.dumps(detail or {})
    with state.connect() as connection:
        if handle is not None and not handle.recorded and handle.operation == operation:
            handle.recorded = True
            job_id = handle.id
            connection.execute(
                "UPDATE jobs SET status = ?, repository = ?, archive = ?, started = ?, "
                "finished = ?, error = ?, detail = ? WHERE id = ?",
                (
                    status,
                    repository,
                    archive,
                    started.isoformat(),
                    finished.isoformat(),
                    error,
                    detail_text,
                    job_id,
                ),
            )
        else:
            cursor = connection.execute(
                "INSERT INTO jobs (operation, trigger, status, repository, archive, started, "
                "finished, scheduled_at, periods, process, error, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?)",
                (
                    operation,
                    trigger,
                    status,
                    repository,
                    archive,
                    started.isoformat(),
                    finished.isoformat(),
                    scheduled_at.astimezone(UTC).isoformat() if scheduled_at else None,
                    json.dumps(list(periods)),
                    error,
                    detail_text,
                ),
            )
            assert cursor.lastrowid is not None
            job_id = cursor.lastrowid
        connection.executemany(
            "INSERT OR REPLACE INTO job_apps (job, app, status, strategy, downtime, size, "
            "errors) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    job_id,
                    record.app,
                    record.status,
                    record.strategy,
                    record.downtime,
                    record.size,
                    json.dumps(record.errors),
                )
                for record in apps
            ],
        )
    return job_id


def record_failure(
    operation: str,
    repository: str,
    message: str,
    *,
    trigger: str = "manual",
    periods: Sequence[str] = (),
    scheduled_at: datetime.datetime | None = None,
) -> int | None:
    """Record an operation that failed before it had a result (bad configuration, say)."""
    try:
        return record_job(
            operation,
            repository,
            status="failed",
            error=_first_line(message),
            detail={"errors": [{"type": "error", "message": message}]},
            trigger=trigger,
            periods=periods,
            scheduled_at=scheduled_at,
        )
    except (sqlite3.Error, OSError) as error:
        logger.warning("could not record the failed %s in the history: %s", operation, error)
        return None


# -- reading ---------------------------------------------------------------------------

_COLUMNS = (
    "id, operation, trigger, status, repository, archive, started, finished, "
    "scheduled_at, periods, process, error, detail"
)


def _parse_time(value: Any) -> datetime.datetime | None:
    if not value:
        return None
    moment = datetime.datetime.fromisoformat(str(value))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _jobs_from_rows(connection: sqlite3.Connection, rows: list[Any]) -> list[Job]:
    if not rows:
        return []
    ids = [row[0] for row in rows]
    placeholders = ",".join("?" * len(ids))
    query = "SELECT job, app, status, strategy, downtime, size, errors FROM job_apps "
    query += f"WHERE job IN ({placeholders}) ORDER BY rowid"  # only ? placeholders
    app_rows = connection.execute(query, ids).fetchall()
    apps: dict[int, list[AppRecord]] = {}
    for job_id, app, status, strategy, downtime, size, errors in app_rows:
        apps.setdefault(job_id, []).append(
            AppRecord(app, status, strategy, float(downtime), int(size), json.loads(errors))
        )
    found = []
    for (
        job_id,
        operation,
        trigger,
        status,
        repository,
        archive,
        started,
        finished,
        scheduled_at,
        periods,
        process,
        error,
        detail,
    ) in rows:
        opened = _parse_time(started)
        if status == "running" and not processes.alive(
            process, recorded_at=opened.timestamp() if opened else None
        ):
            status = "interrupted"
        found.append(
            Job(
                id=job_id,
                operation=operation,
                trigger=trigger,
                status=status,
                repository=repository,
                archive=archive,
                started=opened or _now(),
                finished=_parse_time(finished),
                scheduled_at=_parse_time(scheduled_at),
                periods=list(json.loads(periods)),
                error=error,
                apps=apps.get(job_id, []),
                detail=json.loads(detail),
            )
        )
    return found


def jobs(
    *,
    app: str | None = None,
    repository: str | None = None,
    operation: str | None = None,
    archive: str | None = None,
    limit: int | None = 50,
) -> list[Job]:
    """Jobs, newest first; with ``app``, only the jobs that included that app; with
    ``archive``, only those of that archive."""
    conditions, parameters = [], []
    if archive is not None:
        conditions.append("archive = ?")
        parameters.append(archive)
    if app is not None:
        conditions.append("id IN (SELECT job FROM job_apps WHERE app = ?)")
        parameters.append(app)
    if repository is not None:
        conditions.append("repository = ?")
        parameters.append(repository)
    if operation is not None:
        conditions.append("operation = ?")
        parameters.append(operation)
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    bounded = "LIMIT ?" if limit is not None else ""
    if limit is not None:
        parameters.append(str(limit))
    with state.connect() as connection:
        rows = connection.execute(
            f"SELECT {_COLUMNS} FROM jobs {where} ORDER BY id DESC {bounded}",  # noqa: S608
            parameters,
        ).fetchall()
        return _jobs_from_rows(connection, rows)


def repositories() -> list[str]:
    """Every repository the history mentions."""
    with state.connect() as connection:
        rows = connection.execute("SELECT DISTINCT repository FROM jobs ORDER BY 1").fetchall()
    return [row[0] for row in rows if row[0]]


def scheduled_jobs(repository: str) -> list[Job]:
    """Every scheduled backup of ``repository``, newest first (the scheduler's memory)."""
    with state.connect() as connection:
        rows = connection.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE repository = ? AND operation = 'backup' "  # noqa: S608
            "AND trigger = 'scheduled' ORDER BY id DESC",
            (repository,),
        ).fetchall()
        return _jobs_from_rows(connection, rows)


def last_good_backups() -> dict[tuple[str, str], tuple[Job, AppRecord]]:
    """For each (repository, app): the newest backup in which that app succeeded."""
    with state.connect() as connection:
        rows = connection.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE id IN ("  # noqa: S608
            "SELECT MAX(jobs.id) FROM jobs JOIN job_apps ON job_apps.job = jobs.id "
            "WHERE jobs.operation = 'backup' AND jobs.status IN ('ok', 'partial') "
            "AND job_apps.status = 'ok' GROUP BY jobs.repository, job_apps.app)"
        ).fetchall()
        found = _jobs_from_rows(connection, rows)
    best: dict[tuple[str, str], tuple[Job, AppRecord]] = {}
    for item in found:
        for record in item.apps:
            key = (item.repository, record.app)
            if record.status == "ok" and (key not in best or best[key][0].id < item.id):
                best[key] = (item, record)
    return best


def last_app_attempts() -> dict[tuple[str, str], tuple[Job, AppRecord]]:
    """For each (repository, app): the newest backup that included the app at all."""
    with state.connect() as connection:
        rows = connection.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE id IN ("  # noqa: S608
            "SELECT MAX(jobs.id) FROM jobs JOIN job_apps ON job_apps.job = jobs.id "
            "WHERE jobs.operation = 'backup' GROUP BY jobs.repository, job_apps.app)"
        ).fetchall()
        found = _jobs_from_rows(connection, rows)
    latest: dict[tuple[str, str], tuple[Job, AppRecord]] = {}
    for item in found:
        for record in item.apps:
            key = (item.repository, record.app)
            if key not in latest or latest[key][0].id < item.id:
                latest[key] = (item, record)
    return latest
