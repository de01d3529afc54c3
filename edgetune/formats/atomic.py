"""Atomic file writes: a killed process leaves the previous good file behind."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file, fsync and rename."""
    write_with(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as pretty JSON with sorted keys, atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_with(path: str | os.PathLike, writer: Callable[[Any], Any]) -> None:
    """Call ``writer(file)`` on a temp file beside ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory that replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def read_json(path: str | os.PathLike, what: str = "file", fix: str = "restore it or create it again",
              error: type[Exception] | None = None) -> dict[str, Any]:
    """A JSON object from ``path``; a missing, unreadable, non-UTF-8, malformed or non-object file
    is one error naming the file, what it is and what to do."""
    from edgetune.formats.errors import BundleError

    err = error or BundleError
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise err(f"{path}: {what} is missing; {fix}") from None
    except OSError as e:
        raise err(f"{path}: cannot read {what} ({e.strerror}); {fix}") from None
    if not raw.strip():
        raise err(f"{path}: {what} is empty; {fix}") from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise err(f"{path}: {what} is not UTF-8 text (byte {e.start}; {guess_encoding(raw)}); {fix}") from None
    except json.JSONDecodeError as e:
        raise err(f"{path}: {what} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); {fix}") from None
    if not isinstance(obj, dict):
        raise err(f"{path}: {what} must hold a JSON object, not a {type(obj).__name__}; {fix}")
    return obj


def guess_encoding(raw: bytes) -> str:
    """A short guess at what a non-UTF-8 byte string is, for an error message."""
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "it looks like UTF-16 (byte-order mark); save it as UTF-8"
    if raw[:4] in (b"PK\x03\x04",) or raw[:2] == b"\x1f\x8b":
        return "it looks like a zip or gzip archive; extract it first"
    if b"\x00" in raw[:4096]:
        return "it looks like binary data"
    try:
        raw.decode("cp1252")
        return "it looks like Windows-1252/Latin-1 text; save it as UTF-8"
    except UnicodeDecodeError:
        return "its encoding is unknown; save it as UTF-8"


def _verified_cache() -> Path:
    from edgetune.formats.atomic import home

    return home() / "verified.json"


def check_files(root: Path, files: dict[str, str], sizes: dict[str, int] | None, hashed: tuple[str, ...] | None,
                fix: str) -> list[str]:
    """Problems with ``files`` ({name: sha256}) under ``root``: a missing file, a size other than
    the manifest's, or (for names in ``hashed``; all if None) a sha256 other than the manifest's.
    A verified hash is remembered per file version (path, size, mtime), so a large file is hashed
    once, not on every command."""
    problems = []
    cache_path = _verified_cache()
    try:
        cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache = {}  # a damaged cache only costs a re-hash
    dirty = False
    for name, digest in files.items():
        f = root / name
        try:
            st = f.stat()
        except FileNotFoundError:
            problems.append(f"{name} is missing; {fix}")
            continue
        if sizes and name in sizes and st.st_size != sizes[name]:
            problems.append(f"{name} has {st.st_size} bytes, the manifest says {sizes[name]} (damaged or "
                            f"cut short); {fix}")
            continue
        if hashed is not None and name not in hashed:
            continue
        key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if cache.get(key) == digest:
            continue
        if sha256_file(f) != digest:
            problems.append(f"{name} does not match its sha256 in the manifest (damaged or changed); {fix}")
            continue
        cache[key] = digest
        dirty = True
    if dirty:
        with contextlib.suppress(OSError):
            if len(cache) > 2000:  # keep the newest entries only
                cache = dict(list(cache.items())[-1000:])
            write_json(cache_path, cache)
    return problems


def relative(path: str | os.PathLike, start: str | os.PathLike) -> str:
    """``path`` relative to the directory ``start`` (a manifest in ``start`` holds no absolute path)."""
    return os.path.relpath(Path(path).resolve(), Path(start).resolve())


SEAL = "manifest_sha256"


def seal(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with the sha256 of its own canonical JSON (without this key) inside, so any change
    to a manifest's content, not only to the files it lists, is detected when it is read."""
    body = {k: v for k, v in obj.items() if k != SEAL}
    return {**body, SEAL: _canonical_sha(body)}


def check_seal(obj: dict[str, Any], path: Path, fix: str, error: type[Exception] | None = None) -> None:
    from edgetune.formats.errors import BundleError

    if SEAL in obj and obj[SEAL] != _canonical_sha({k: v for k, v in obj.items() if k != SEAL}):
        raise (error or BundleError)(f"{path} was changed or damaged after it was written (its content does not "
                                     f"match its own checksum); {fix}")


def _canonical_sha(obj: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def source_name(source: Any) -> Any:
    """A model's registry name as is; a local path by its last component only (manifests that
    ship with a model hold no path of the machine that made them)."""
    s = str(source) if source is not None else None
    return Path(s).name if s and ("/" in s or "\\" in s) else source


def home() -> Path:
    """The cache root: ``$EDGETUNE_HOME``, else ``$XDG_CACHE_HOME/edgetune``, else ``~/.cache/edgetune``."""
    env = os.environ.get("EDGETUNE_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgetune"
