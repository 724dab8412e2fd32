"""HDF5 checkpoints: atomic writes, a whole-file digest checked before parsing, per-array checksums.

A checkpoint (format ``hicd-checkpoint``, version 2) is a plain HDF5 file with a
512-byte user block, which HDF5 tools skip, holding one ASCII line::

    hicd-checkpoint v2 sha256=<64 hex digits of the SHA-256 of bytes 512..end>

The file is built in memory (h5py on a ``BytesIO``), its digest written into the
user block, and the bytes written with plain file I/O to a temporary file that is
fsynced and renamed over the target (``atomic_path``). So a full disk is an
ordinary ``OSError`` (the temporary file removed, the previous checkpoint intact)
and never a failure inside the HDF5 library, and on reading the digest is checked
before the HDF5 parser sees a single byte: damaged bytes are refused, not parsed.

Inside the HDF5 image::

    /                 attrs: format, format_version, step, config (JSON),
                             model_config (JSON), rng_state (JSON), optimizer (JSON)
    /params/<name>    float arrays, one per model parameter
    /buffers/<name>   BatchNorm running statistics
    /optim/<slot>/<name>  optimizer moments (AdamW: m, v; SGD: momentum_buffer)

Every dataset is chunked with HDF5's Fletcher32 filter (0-d arrays cannot be
chunked) and carries a ``sha256`` attribute of its dtype, shape and bytes. HDF5
catches truncation, Fletcher32 catches most damage inside chunks, and the SHA-256
catches the rest (a flipped byte in a contiguous dataset reads back silently).

Every failure to read raises ``CheckpointError`` naming the file, the key and
what was expected; nothing is half-loaded. Version 1 files (no user block, written
before 2026-12) are still read, through the HDF5 parser directly, after a note that
they are of the older format.
"""

from __future__ import annotations

import contextlib
import hashlib
import io as _io
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from ._version import __version__
from .errors import CheckpointError, NonFiniteError, RunLockError

__all__ = ["save_checkpoint", "load_checkpoint", "check_state", "atomic_path", "array_digest", "run_lock", "remove_stale_temps",
           "FORMAT", "FORMAT_VERSION"]

FORMAT = "hicd-checkpoint"
FORMAT_VERSION = 2
_SUPPORTED_VERSIONS = (1, 2)
USERBLOCK = 512
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_SEAL = b"hicd-checkpoint v2 sha256="


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # not every filesystem can fsync a directory
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def remove_stale_temps(folder) -> list:
    """Remove the temporary files (``.NAME.tmp-PID``, ``atomic_path``) of writers that are no longer running.

    A writer killed mid-write (``kill -9``) cannot clean up after itself; the next
    process that opens the folder does. Files of live processes are left alone.
    Returns the paths removed.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _TEMP.match(path.name)
        if match and int(match["pid"]) != os.getpid() and not _pid_alive(int(match["pid"])):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


@contextlib.contextmanager
def run_lock(folder):
    """Hold ``folder/.lock`` (owner's pid, host and start time) while a run writes into ``folder``.

    A second process that asks for the same folder gets ``RunLockError`` naming the
    owner. A lock left by a dead process on this host is taken over, with a note on
    stderr; a lock from another host is never guessed about (remove it by hand when
    that run is gone). The lock is removed on exit, whatever happens inside.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".lock"
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                owner = {}
            pid, host = owner.get("pid"), owner.get("host")
            if isinstance(pid, int) and host == me["host"] and not _pid_alive(pid):
                print(f"hicd: {lock}: taking over the lock of process {pid}, which is no longer running",
                      file=sys.stderr)
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
                continue
            raise RunLockError(f"{folder} is in use by process {pid} on {host} (since {owner.get('started')}); "
                               f"wait for it or choose another output folder (remove {lock} if that run is gone)") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise RunLockError(f"{lock}: could not take the lock")
    try:
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def array_digest(a: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and C-order bytes."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256()
    h.update(f"{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def write_array(group, name: str, a) -> None:
    """Create a checksummed dataset (Fletcher32 when chunkable, SHA-256 always)."""
    a = np.ascontiguousarray(a)
    chunkable = a.ndim > 0 and a.size > 0
    ds = group.create_dataset(name, data=a, chunks=True if chunkable else None, fletcher32=chunkable)
    ds.attrs["sha256"] = array_digest(a)


def read_array(group, name: str, source: str, *, shape=None, dtype=None) -> np.ndarray:
    """Read and verify one dataset; raise ``CheckpointError`` naming ``source`` and the key."""
    key = f"{group.name.rstrip('/')}/{name}"
    if name not in group:
        raise CheckpointError(f"{source}: missing key {key!r}")
    ds = group[name]
    if not isinstance(ds, h5py.Dataset):
        raise CheckpointError(f"{source}: key {key!r} is not a dataset")
    try:
        a = ds[()]
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{source}: key {key!r} is corrupted (checksum or read failure: {exc})") from None
    a = np.asarray(a)
    expected = ds.attrs.get("sha256")
    if expected is None:
        raise CheckpointError(f"{source}: key {key!r} has no sha256 checksum")
    if isinstance(expected, bytes):
        expected = expected.decode()
    if array_digest(a) != expected:
        raise CheckpointError(f"{source}: key {key!r} is corrupted (SHA-256 mismatch)")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise CheckpointError(f"{source}: key {key!r} has shape {a.shape}, expected {tuple(shape)}")
    if dtype is not None and a.dtype != np.dtype(dtype):
        raise CheckpointError(f"{source}: key {key!r} has dtype {a.dtype}, expected {np.dtype(dtype)}")
    return a


def _json_attr(f, key, source):
    if key not in f.attrs:
        raise CheckpointError(f"{source}: missing attribute {key!r}")
    raw = f.attrs[key]
    try:
        return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: attribute {key!r} is not valid JSON ({exc})") from None


_META_KEYS = ("format", "format_version", "step", "config", "model_config", "rng_state", "optimizer", "extra")


def _text_attr(f, key):
    value = f.attrs.get(key)
    return value.decode() if isinstance(value, bytes) else (None if value is None else str(value))


def _meta_digest(attrs) -> str:
    """SHA-256 over the metadata attributes, so a flipped byte in them cannot pass unnoticed."""
    h = hashlib.sha256()
    # the writer's version joined the metadata in 0.2.0: covered when present, so older files still verify
    for key in _META_KEYS + (("hicd_version",) if "hicd_version" in attrs else ()):
        value = attrs.get(key)
        value = value.decode() if isinstance(value, bytes) else value
        h.update(f"{key}={value!s}\n".encode())
    return h.hexdigest()


def seal_image(image: bytes) -> bytes:
    """Write the digest line into the user block of an HDF5 image built with ``userblock_size=512``."""
    digest = hashlib.sha256(memoryview(image)[USERBLOCK:]).hexdigest().encode()
    line = _SEAL + digest + b"\n"
    return line + bytes(USERBLOCK - len(line)) + image[USERBLOCK:]


def write_bytes_atomic(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through ``atomic_path`` with plain file I/O (an ``OSError`` on a full disk)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def _verified_image(path: Path, source: str):
    """The file's bytes after the user-block digest check, or None for a version 1 file (no user block)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{source}: cannot read the file ({exc})") from None
    if data.startswith(_HDF5_SIGNATURE):
        return None  # version 1: HDF5 from byte 0
    if not data.startswith(_SEAL):
        raise CheckpointError(f"{source}: not a hicd checkpoint (no hicd header; damaged, truncated or foreign?)")
    stored = data[len(_SEAL):len(_SEAL) + 64]
    if data[len(_SEAL) + 64:len(_SEAL) + 65] != b"\n":
        raise CheckpointError(f"{source}: damaged checkpoint header")
    if len(data) < USERBLOCK + len(_HDF5_SIGNATURE) or data[USERBLOCK:USERBLOCK + 8] != _HDF5_SIGNATURE:
        raise CheckpointError(f"{source}: damaged or truncated checkpoint (no HDF5 image after the header)")
    if hashlib.sha256(memoryview(data)[USERBLOCK:]).hexdigest().encode() != stored:
        raise CheckpointError(f"{source}: damaged checkpoint (SHA-256 of the file does not match its header)")
    return data


def save_checkpoint(path, *, model, optimizer=None, step=0, rng_state=None, config=None, extra=None) -> Path:
    """Write a checkpoint atomically.

    Parameters
    ----------
    path : str or Path
    model : TinySiamCD (anything with ``state_dict()`` and ``config()``)
    optimizer : AdamW or SGD, optional
    step : int
        Training steps done.
    rng_state : dict, optional
        JSON-serialisable RNG state (e.g. ``numpy.random.Generator.bit_generator.state``).
    config : dict, optional
        The run's configuration (JSON-serialisable).
    extra : dict, optional
        Any other JSON-serialisable progress (epoch, best score, ...).
    """
    state = model.state_dict()
    opt_state = optimizer.state_dict() if optimizer is not None else None
    for group in ("params", "buffers"):
        for name, a in state[group].items():
            if not np.all(np.isfinite(a)):
                raise NonFiniteError(f"refusing to write {path}: {group}/{name} has non-finite values")
    return write_bytes_atomic(path, seal_image(_checkpoint_image(state, opt_state, step, rng_state, config,
                                                                  extra, model.config())))


def _checkpoint_image(state, opt_state, step, rng_state, config, extra, model_config) -> bytes:
    """The HDF5 image of a checkpoint, built in memory (user block left for ``seal_image``)."""
    buffer = _io.BytesIO()
    with h5py.File(buffer, "w", userblock_size=USERBLOCK) as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["hicd_version"] = __version__
        f.attrs["step"] = int(step)
        f.attrs["config"] = json.dumps(config or {})
        f.attrs["model_config"] = json.dumps(model_config)
        f.attrs["rng_state"] = json.dumps(rng_state)
        f.attrs["extra"] = json.dumps(extra or {})
        for group in ("params", "buffers"):
            g = f.create_group(group)
            for name, a in state[group].items():
                write_array(g, name, a)
        meta = None
        if opt_state is not None:
            og = f.create_group("optim")
            meta = {"kind": opt_state["kind"], "step": opt_state["step"], "slots": []}
            for slot, bufs in opt_state.items():
                if isinstance(bufs, dict):
                    meta["slots"].append(slot)
                    sg = og.create_group(slot)
                    for name, a in bufs.items():
                        write_array(sg, name, a)
        f.attrs["optimizer"] = json.dumps(meta)
        f.attrs["meta_sha256"] = _meta_digest(f.attrs)
    return buffer.getvalue()


def load_checkpoint(path) -> dict:
    """Read and verify a checkpoint into host arrays.

    Returns
    -------
    dict with keys ``params``, ``buffers`` (name -> NumPy array), ``optim`` (the
    optimizer's ``state_dict`` or None), ``step``, ``config``, ``model_config``,
    ``rng_state``, ``extra``, ``path``, ``hicd_version`` (the release that wrote it; None
    for files written before 0.2.0).

    Raises
    ------
    CheckpointError
        Missing, truncated, corrupted, foreign or wrong-schema file; the message
        names the file and the key.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise CheckpointError(f"{source}: no such checkpoint file")
    image = _verified_image(path, source)
    try:
        f = h5py.File(path if image is None else _io.BytesIO(image), "r")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{source}: not a readable HDF5 checkpoint (truncated or damaged?): {exc}") from None
    try:
        with f:
            fmt = f.attrs.get("format")
            if isinstance(fmt, bytes):
                fmt = fmt.decode()
            if fmt != FORMAT:
                raise CheckpointError(f"{source}: not a hicd checkpoint (format attribute {fmt!r}, expected {FORMAT!r})")
            version = f.attrs.get("format_version")
            version = None if version is None else int(version)
            if version not in _SUPPORTED_VERSIONS:
                raise CheckpointError(
                    f"{source}: unknown checkpoint format_version {version}; this hicd reads {list(_SUPPORTED_VERSIONS)}"
                )
            if (image is None) != (version == 1):
                raise CheckpointError(f"{source}: format_version {version} does not match the file's layout")
            digest = f.attrs.get("meta_sha256")
            digest = digest.decode() if isinstance(digest, bytes) else digest
            if digest is None and version == 1:
                raise CheckpointError(f"{source}: older checkpoint format (version 1, written before metadata "
                                      "checksums), which this hicd cannot verify; retrain, or load it with the "
                                      "hicd release that wrote it")
            if digest != _meta_digest(f.attrs):
                raise CheckpointError(f"{source}: metadata attributes are corrupted (SHA-256 mismatch)")
            out = {"path": source, "step": int(f.attrs.get("step", 0)), "hicd_version": _text_attr(f, "hicd_version")}
            for key in ("config", "model_config", "rng_state", "optimizer", "extra"):
                out[key] = _json_attr(f, key, source)
            for group in ("params", "buffers"):
                if group not in f or not isinstance(f[group], h5py.Group):
                    raise CheckpointError(f"{source}: missing key '/{group}'")
                out[group] = {name: read_array(f[group], name, source) for name in f[group]}
            meta = out.pop("optimizer")
            out["optim"] = None
            if meta is not None:
                if "optim" not in f:
                    raise CheckpointError(f"{source}: missing key '/optim'")
                opt = {"kind": meta["kind"], "step": int(meta["step"])}
                for slot in meta["slots"]:
                    if slot not in f["optim"]:
                        raise CheckpointError(f"{source}: missing key '/optim/{slot}'")
                    opt[slot] = {name: read_array(f["optim"][slot], name, source) for name in f["optim"][slot]}
                out["optim"] = opt
            return out
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{source}: damaged checkpoint ({type(exc).__name__}: {exc})") from None


def check_state(state: dict, expected: dict, dtype: str, source: str) -> None:
    """Check a state's groups, keys, shapes and dtype against a model's (``expected``: group -> name -> array).

    ``state`` is ``{"params": {...}, "buffers": {...}}`` of host arrays (a checkpoint or
    ``state_dict()``); every difference raises ``CheckpointError`` naming ``source``, the
    group, the key and what was expected.
    """
    for group, current in expected.items():
        given = state.get(group)
        if not isinstance(given, dict):
            raise CheckpointError(f"{source}: missing group {group!r}")
        missing = sorted(set(current) - set(given))
        extra = sorted(set(given) - set(current))
        if missing or extra:
            raise CheckpointError(f"{source}: {group} keys differ from the model: missing {missing}, unexpected {extra}")
        for name, arr in current.items():
            host = given[name]
            if tuple(host.shape) != tuple(arr.shape):
                raise CheckpointError(f"{source}: {group}/{name} has shape {tuple(host.shape)}, expected {tuple(arr.shape)}")
            if str(host.dtype) != dtype:
                raise CheckpointError(f"{source}: {group}/{name} has dtype {host.dtype}, expected {dtype}")
