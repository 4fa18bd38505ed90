"""Where a feature store lives: a local folder or an object-store URI (``s3://bucket/prefix``; ``gs://`` and
``az://`` go through the same code, since Lance and pyarrow.fs both speak them). This is the one seam for what
is not a Lance table: the JSON metadata files (whole-file reads and writes through pyarrow.fs), table sizes,
the writer locks, and the local folder that holds the decoded split cache.

Settings come from ``store.storage_options`` (Lance's option names: ``aws_endpoint``, ``aws_region``,
``allow_http``, ``aws_access_key_id``, ...) over the standard variables (``AWS_ENDPOINT_URL``, ``AWS_REGION`` or
``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``), resolved once
so Lance, pyarrow and boto3 all talk to the same server with the same credentials."""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
import uuid
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Iterator

import lancedb
import pyarrow.fs as pafs
from filelock import FileLock, Timeout

# Lance's caches, per connection (as Lance's own default; one shared by the process would also serve a file's
# cached footer after the file changed, which `mm store verify` must not). Its default 1 GB metadata cache keeps
# the manifest of every version it has seen, and an extraction commits a version per write_every rows whose
# manifest lists every fragment so far: the cache grew as N^2 (30 MB during a 64k-row extraction, 120 MB at
# 128k; issue 21). Readers need the latest versions' manifests and file footers, a few MB for a compacted table;
# 8 MB took 30 MB off a 128k-row extraction's peak against 32 MB, at the same wall time (bench/RESULTS.md).
METADATA_CACHE_BYTES = 8 << 20
INDEX_CACHE_BYTES = 1 << 30  # IVF-PQ partitions read by searches (Lance's default: 6 GB)


def lance_session() -> lancedb.Session:
    return lancedb.Session(index_cache_size_bytes=INDEX_CACHE_BYTES, metadata_cache_size_bytes=METADATA_CACHE_BYTES)


_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
S3_ENV = {  # Lance's S3 option name <- the standard AWS variables, the first one set wins
    "aws_endpoint": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"),
    "aws_region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
    "aws_access_key_id": ("AWS_ACCESS_KEY_ID",),
    "aws_secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
    "aws_session_token": ("AWS_SESSION_TOKEN",),
    "allow_http": ("AWS_ALLOW_HTTP",),
}
S3_ALIASES = {"endpoint": "aws_endpoint", "endpoint_url": "aws_endpoint", "aws_endpoint_url": "aws_endpoint",
              "region": "aws_region", "access_key_id": "aws_access_key_id",
              "secret_access_key": "aws_secret_access_key", "session_token": "aws_session_token",
              "aws_allow_http": "allow_http"}
ONE_WRITER_MACHINE = ("one writer machine per store: on a {scheme}:// root the writer lock is a local file "
                      "({path}), so it keeps out other processes on this machine only")


def is_damage(e: BaseException) -> bool:
    """Whether ``e`` is Lance failing to read a local data file (truncated, corrupted): not worth a retry."""
    text = str(e)
    return isinstance(e, (OSError, RuntimeError)) and text.startswith("lance error: LanceError(IO)") and \
        "LocalFileSystem" in text


class StoreError(RuntimeError):
    """The store is missing, locked, corrupt or does not match the config."""


def is_uri(root: str | Path) -> bool:
    return isinstance(root, str) and bool(_URI.match(root))


def s3_options(given: dict[str, str] | None) -> dict[str, str]:
    """Lance's S3 options from the config (aliases folded, keys lower-cased) over the AWS_* variables; an
    ``http://`` endpoint implies ``allow_http``."""
    opts = {k: os.environ[v] for k, names in S3_ENV.items() for v in reversed(names) if os.environ.get(v)}
    for k, v in (given or {}).items():
        opts[S3_ALIASES.get(k.lower(), k.lower())] = str(v)
    if opts.get("aws_endpoint", "").startswith("http://"):
        opts.setdefault("allow_http", "true")
    return opts


def s3_filesystem(options: dict[str, str]) -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem on resolved ``s3_options`` (the store's files, users' shards in a bucket)."""
    endpoint = options.get("aws_endpoint")
    return pafs.S3FileSystem(region=options.get("aws_region"), endpoint_override=endpoint,
                             scheme="http" if endpoint and endpoint.startswith("http://") else "https",
                             access_key=options.get("aws_access_key_id"),
                             secret_key=options.get("aws_secret_access_key"),
                             session_token=options.get("aws_session_token"))


def default_cache_dir(uri: str) -> Path:
    """A local folder per store URI: ``$XDG_CACHE_HOME/mmrobust`` (``~/.cache/mmrobust``), named by the URI."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmrobust"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", uri.split("://", 1)[1])[:60]
    return base / f"{slug}-{hashlib.sha256(uri.encode()).hexdigest()[:8]}"


class StoreLocation:
    """A store root: ``local`` (a Path) for a folder, else ``uri`` with ``options`` for Lance and pyarrow."""

    def __init__(self, root: str | Path, storage_options: dict[str, str] | None = None,
                 cache_dir: str | Path | None = None):
        self.is_uri = is_uri(str(root)) and not isinstance(root, Path)
        self.local = None if self.is_uri else Path(root)
        self.uri = str(root).rstrip("/") if self.is_uri else str(self.local)
        self.scheme = self.uri.split("://", 1)[0].lower() if self.is_uri else "file"
        given = dict(storage_options or {})
        self.options = s3_options(given) if self.scheme == "s3" else given
        self.cache_dir = Path(cache_dir) if cache_dir else self.local or default_cache_dir(self.uri)

    @classmethod
    def of(cls, root: "str | Path | StoreLocation", storage_options: dict[str, str] | None = None,
           cache_dir: str | Path | None = None) -> "StoreLocation":
        return root if isinstance(root, StoreLocation) else cls(root, storage_options, cache_dir)

    @classmethod
    def for_config(cls, store_cfg) -> "StoreLocation":
        """From a ``StoreConfig`` (``root``, ``storage_options``, ``cache_dir``)."""
        return cls(store_cfg.root, store_cfg.storage_options, store_cfg.cache_dir)

    @property
    def root(self) -> str | Path:
        """What ``store.root`` said: the folder as a Path, or the URI."""
        return self.local if self.local is not None else self.uri

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"StoreLocation({self.uri!r})"

    def connect(self) -> lancedb.DBConnection:
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)
            return lancedb.connect(str(self.local), session=lance_session())
        return lancedb.connect(self.uri, storage_options=self.options, session=lance_session())

    def lance_dataset(self, name: str):
        """Table ``name`` as a pylance dataset, for what lancedb does not expose (version cleanup that keeps
        tags, delta index updates). pylance is imported here: only the writers need it."""
        import lance

        return lance.dataset(f"{self.uri}/{name}.lance", storage_options=self.options or None)

    # ------------------------------------------------------------------ files (pyarrow.fs)
    @cached_property
    def _fs(self) -> tuple[pafs.FileSystem, str]:
        if self.local is not None:
            return pafs.LocalFileSystem(), str(self.local.resolve())
        if self.scheme == "s3":  # the resolved options, not from_uri's own lookup, so Lance and pyarrow agree
            return s3_filesystem(self.options), self.uri.split("://", 1)[1]
        if self.scheme == "az":  # Lance's az://container/path; pyarrow.fs names the account separately
            o = {k.lower(): v for k, v in self.options.items()}
            account = (o.get("azure_storage_account_name") or o.get("account_name")
                       or os.environ.get("AZURE_STORAGE_ACCOUNT_NAME"))
            if not account:
                raise StoreError(f"{self.uri}: set AZURE_STORAGE_ACCOUNT_NAME (or store.storage_options."
                                 "azure_storage_account_name)")
            return (pafs.AzureFileSystem(account, account_key=os.environ.get("AZURE_STORAGE_ACCOUNT_KEY")),
                    self.uri.split("://", 1)[1])
        return pafs.FileSystem.from_uri(self.uri)

    def file(self, name: str) -> "StoreFile":
        return StoreFile(self, name)

    def files(self, suffix: str) -> list[str]:
        """Names of the files directly under the root that end with ``suffix`` (sorted)."""
        fs, base = self._fs
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix))

    def size(self, name: str) -> int:
        """Bytes under ``<root>/<name>`` (a Lance table's folder)."""
        fs, base = self._fs
        infos = fs.get_file_info(pafs.FileSelector(f"{base}/{name}", recursive=True, allow_not_found=True))
        return sum(i.size or 0 for i in infos if i.type == pafs.FileType.File)

    # ------------------------------------------------------------------ writer locks
    @contextmanager
    def lock(self, name: str, timeout: float, hint: str = "wait for it to finish or raise store.lock_timeout_s"
             ) -> Iterator[None]:
        """Exclusive ``<name>.lock``: a file lock beside the tables for a folder; on s3:// an object created
        with a conditional write (If-None-Match: *), which excludes writers on every machine; on other URIs a
        local file lock in the cache folder (the ``one writer machine per store`` limit, named in the error)."""
        if self.local is not None or self.scheme != "s3":
            folder = self.local if self.local is not None else self.cache_dir
            folder.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(folder / f"{name}.lock"), timeout=timeout)
            try:
                lock.acquire()
            except Timeout:
                limit = "" if self.local is not None else "; " + ONE_WRITER_MACHINE.format(
                    scheme=self.scheme, path=lock.lock_file)
                raise StoreError(f"store {name!r} is being written by another process ({lock.lock_file}); "
                               f"{hint}{limit}") from None
            try:
                yield
            finally:
                lock.release()
            return
        with S3Lock(self, name).held(timeout, hint):
            yield


class StoreFile:
    """One small file under the root (JSON metadata), read and written whole."""

    def __init__(self, location: StoreLocation, name: str):
        self.location, self.name = location, name
        fs, base = location._fs
        self._fs, self._path = fs, f"{base}/{name}"

    @property
    def stem(self) -> str:
        return self.name.rsplit(".", 1)[0]

    def __str__(self) -> str:
        return f"{self.location.uri}/{self.name}"

    def __repr__(self) -> str:
        return f"StoreFile({str(self)!r})"

    def exists(self) -> bool:
        return self._fs.get_file_info(self._path).type == pafs.FileType.File

    def read_text(self) -> str:
        with self._fs.open_input_stream(self._path) as f:
            return f.read().decode()

    def write_text(self, text: str) -> None:
        """All or nothing: a local file is written beside and renamed over the old one; an object-store PUT
        replaces the object whole."""
        if self.location.local is None:
            with self._fs.open_output_stream(self._path) as f:
                f.write(text.encode())
            return
        tmp = f"{self._path}.tmp-{uuid.uuid4().hex[:8]}"
        with self._fs.open_output_stream(tmp) as f:
            f.write(text.encode())
        self._fs.move(tmp, self._path)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self._fs.delete_file(self._path)
        except FileNotFoundError:
            if not missing_ok:
                raise


class S3Lock:
    """``<root>/<name>.lock`` created with S3's conditional write (``If-None-Match: *``): of any number of
    writers on any machines exactly one creates it. pyarrow.fs does not expose conditional writes, so this uses
    boto3. A lock left behind by a killed process stays (S3 has no process to notice): one from this host whose
    process is gone is taken over (deleted with ``If-Match`` on its ETag, so two takers cannot both win); one
    from another host is reported with the command that removes it."""

    def __init__(self, location: StoreLocation, name: str):
        import boto3

        o = location.options
        self.client = boto3.session.Session().client("s3", endpoint_url=o.get("aws_endpoint"), region_name=o.get("aws_region"),
                                   aws_access_key_id=o.get("aws_access_key_id"),
                                   aws_secret_access_key=o.get("aws_secret_access_key"),
                                   aws_session_token=o.get("aws_session_token"))
        bucket, _, prefix = location.uri.split("://", 1)[1].partition("/")
        self.name, self.bucket, self.key = name, bucket, f"{prefix}/{name}.lock" if prefix else f"{name}.lock"
        self.url = f"s3://{bucket}/{self.key}"
        self.token = uuid.uuid4().hex

    def _holder(self) -> tuple[dict, str] | None:
        from botocore.exceptions import ClientError
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if e.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return None
            raise
        try:
            return json.loads(got["Body"].read()), got["ETag"]
        except ValueError:
            return {}, got["ETag"]

    def _delete(self, etag: str) -> None:
        from botocore.exceptions import ClientError
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=etag)
        except ClientError as e:  # replaced meanwhile: not ours (any more) to delete
            if e.response["Error"]["Code"] not in ("PreconditionFailed", "NoSuchKey", "404"):
                raise

    @staticmethod
    def _dead_here(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def acquire(self, timeout: float, hint: str) -> None:
        from botocore.exceptions import ClientError
        body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                           "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body.encode(), IfNoneMatch="*")
                return
            except ClientError as e:
                if e.response["Error"]["Code"] not in ("PreconditionFailed", "ConditionalRequestConflict"):
                    raise
            held = self._holder()
            if held is None:
                continue  # released between our write and the read: try again
            holder, etag = held
            if self._dead_here(holder):
                self._delete(etag)
                continue
            if time.monotonic() >= deadline:
                who = f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
                raise StoreError(f"store {self.name!r} is being written by another process "
                               f"({who}; lock object {self.url}); {hint}. If that process is gone, remove the lock: "
                               f"aws s3 rm {self.url}")
            time.sleep(min(0.5, max(deadline - time.monotonic(), 0.05)))

    def release(self) -> None:
        held = self._holder()
        if held is not None and held[0].get("token") == self.token:
            self._delete(held[1])

    @contextmanager
    def held(self, timeout: float, hint: str) -> Iterator[None]:
        self.acquire(timeout, hint)
        try:
            yield
        finally:
            self.release()
