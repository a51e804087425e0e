"""Local services started and stopped by pid: PostgreSQL, Redis and plain processes (Celery
workers, the Dagster webserver and daemon), each bound to 127.0.0.1 on a free port.

Dagster-free: `gtex_assets.cli.cluster` composes these into `gtex-assets cluster up|down`, and
the live-service tests use them directly. PostgreSQL refuses to run as root; as root the
server runs as an unprivileged OS user (``postgres`` from Debian's package, else one created
with ``useradd``).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

PG_USER = "gtex"  # the database role (not the OS user)
PG_DB = "dagster"
SERVICE_OS_USER = "postgres"


class ServiceError(RuntimeError):
    pass


@dataclass
class Service:
    """One started process: what it is, its pid, how to reach it, where it logs."""

    name: str
    pid: int
    cmd: list[str]
    log: str
    port: int | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, pid: int | None = None, log: str | None = None) -> None:
    """Until 127.0.0.1:port accepts connections; fails early if ``pid`` exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pid is not None and not pid_alive(pid):
            raise ServiceError(f"process {pid} exited before listening on {port}{_tail(log)}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise ServiceError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s{_tail(log)}")


def _tail(log: str | None, n: int = 15) -> str:
    if not log or not Path(log).is_file():
        return ""
    lines = Path(log).read_text(errors="replace").splitlines()[-n:]
    return f"; last lines of {log}:\n" + "\n".join(lines)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not alive.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    out = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            out += [int(c) for c in Path(path).read_text().split()]
        except OSError:
            continue
    return out


def parent_pid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def start_process(
    name: str,
    cmd: Sequence[str],
    *,
    log: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    user: str | None = None,
    port: int | None = None,
) -> Service:
    """Start ``cmd`` in its own session (so stopping it never signals the caller), output to
    ``log``; ``user`` runs it as that OS user (needs root)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    preexec = None
    if user is not None and os.geteuid() == 0:
        pw = pwd.getpwnam(user)

        def preexec() -> None:
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)

    with open(log, "ab") as out:
        proc = subprocess.Popen(
            list(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=preexec,
        )
    return Service(name=name, pid=proc.pid, cmd=list(cmd), log=str(log), port=port)


def stop_pid(pid: int, *, sig: int = signal.SIGTERM, timeout: float = 20.0) -> bool:
    """Signal ``pid``; SIGKILL its process group (the session we started it in) after
    ``timeout``. Returns whether it was running."""
    if not pid_alive(pid):
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:  # reap it if it is our child
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)  # started with start_new_session: pgid == pid
    except (ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
    return True


# -- PostgreSQL ------------------------------------------------------------------------------


def postgres_bin(name: str) -> Path:
    """A PostgreSQL server binary (Debian keeps them under /usr/lib/postgresql/<ver>/bin)."""
    found = shutil.which(name)
    if found:
        return Path(found)
    cands = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if not cands:
        raise ServiceError(
            f"PostgreSQL's {name} not found (on PATH or /usr/lib/postgresql/*/bin): "
            "install it, e.g. apt-get install postgresql"
        )
    return Path(cands[-1])


def service_user() -> str | None:
    """The OS user PostgreSQL runs as: None when not root, else an unprivileged user."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVICE_OS_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             SERVICE_OS_USER],
            check=True, capture_output=True,
        )  # fmt: skip
    return SERVICE_OS_USER


def _give_to(user: str | None, path: Path) -> None:
    """Let ``user`` own ``path`` and reach it (every ancestor searchable)."""
    if user is None:
        return
    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    for parent in path.resolve().parents:
        st = parent.stat()
        if st.st_uid != pw.pw_uid and not st.st_mode & 0o001:
            raise ServiceError(
                f"{parent} is not searchable by other users, so the PostgreSQL server (OS user "
                f"{user!r}) cannot reach {path}: chmod o+x {parent} or choose another data root"
            )


def init_postgres(pgdata: Path, password: str) -> None:
    """initdb ``pgdata`` (once) with a password-protected role; idempotent."""
    if (pgdata / "PG_VERSION").is_file():
        return
    user = service_user()
    pgdata.mkdir(parents=True, exist_ok=True)
    os.chmod(pgdata, 0o700)
    _give_to(user, pgdata)
    pwfile = pgdata.parent / ".initdb-pwfile"
    pwfile.write_text(password + "\n")
    _give_to(user, pwfile)
    log = pgdata.parent / "initdb.log"
    svc = start_process(
        "initdb",
        [str(postgres_bin("initdb")), "-D", str(pgdata), "-U", PG_USER, f"--pwfile={pwfile}",
         "--auth=scram-sha-256", "-E", "UTF8", "--no-instructions"],
        log=log, user=user,
    )  # fmt: skip
    rc = _wait_exit(svc.pid, 120)
    pwfile.unlink(missing_ok=True)
    if rc != 0:
        raise ServiceError(f"initdb {pgdata} failed (exit {rc}){_tail(str(log))}")


def _wait_exit(pid: int, timeout: float) -> int | None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.1)
    return None


def start_postgres(pgdata: Path, port: int, password: str) -> Service:
    """Run the server on 127.0.0.1:port (no Unix socket outside ``pgdata``); create the
    Dagster database. Connect with :func:`postgres_url`."""
    svc = start_process(
        "postgres",
        [str(postgres_bin("postgres")), "-D", str(pgdata), "-p", str(port),
         "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={pgdata}",
         "-c", "max_connections=200", "-c", "fsync=on"],
        log=pgdata.parent / "postgres.log", user=service_user(), port=port,
    )  # fmt: skip
    wait_port(port, 60, pid=svc.pid, log=svc.log)
    import psycopg2

    deadline = time.time() + 30
    while True:  # the port opens a moment before the server accepts logins
        try:
            con = psycopg2.connect(
                host="127.0.0.1", port=port, user=PG_USER, password=password, dbname="postgres"
            )
            break
        except psycopg2.OperationalError:
            if time.time() > deadline:
                raise
            time.sleep(0.3)
    con.autocommit = True
    with con.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DB,))
        if cur.fetchone() is None:
            cur.execute(f'CREATE DATABASE "{PG_DB}"')
    con.close()
    svc.extra = {"user": PG_USER, "db": PG_DB}
    return svc


def postgres_url(port: int, password: str) -> str:
    return f"postgresql://{PG_USER}:{password}@127.0.0.1:{port}/{PG_DB}"


# -- Redis -----------------------------------------------------------------------------------


def start_redis(workdir: Path, port: int, password: str) -> Service:
    exe = shutil.which("redis-server")
    if exe is None:
        raise ServiceError(
            "redis-server not found on PATH: install it, e.g. apt-get install redis-server"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "redis.conf"
    # A config file keeps the password off the command line (ps shows argv to every user).
    conf.write_text(
        f"bind 127.0.0.1\nport {port}\nrequirepass {password}\ndir {workdir}\n"
        'save ""\nappendonly no\nprotected-mode yes\n'
    )
    os.chmod(conf, 0o600)
    svc = start_process("redis", [exe, str(conf)], log=workdir / "redis.log", port=port)
    wait_port(port, 30, pid=svc.pid, log=svc.log)
    return svc


def redis_url(port: int, password: str, db: int = 0) -> str:
    return f"redis://:{password}@127.0.0.1:{port}/{db}"


def new_password() -> str:
    return secrets.token_urlsafe(18)
