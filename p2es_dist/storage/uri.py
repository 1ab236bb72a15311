"""Storage URIs: a local path, `file://...` or `s3://bucket/prefix`, over fsspec/s3fs and pyarrow.fs.

The S3 endpoint comes from an explicit `endpoint_url` (the CLI's `--s3-endpoint`), else `AWS_ENDPOINT_URL_S3` /
`AWS_ENDPOINT_URL`, else AWS itself; credentials come from the standard AWS chain (env vars, ~/.aws), never from
arguments, so no config, pickle or message here ever holds a secret.

Failures become one-line `UserError`s naming the URI and the endpoint: an unreachable endpoint raises
`UnreachableError` with a hint at `p2es objectstore start`; a missing object raises `MissingObjectError`, which
is also a `FileNotFoundError`. Writes are atomic: a reader sees the old object or the whole new one, never a part.
Every S3 client here retries transient failures (`S3_RETRY_ATTEMPTS` attempts, standard backoff);
`is_transient` tells a caller whether an error is worth retrying later.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
import urllib.parse
from collections.abc import Iterator
from typing import IO

import fsspec
import pyarrow.fs as pafs

from p2es_dist.errors import UserError

TMP_SUFFIX = ".p2es-tmp"  # local atomic writes stage here; ls() hides such leftovers of a crash
UNREACHABLE_HINTS = ("Could not connect", "Connection refused", "curlCode: 7", "Cannot connect to host")
DENIED_HINTS = ("AccessDenied", "ACCESS_DENIED", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden")
NO_BUCKET_HINTS = ("NoSuchBucket", "specified bucket does not exist", "NO_SUCH_BUCKET")
# Texts of failures that may pass by themselves (a store restarting, throttling, a dropped connection), as
# botocore and pyarrow's AWS SDK word them.
TRANSIENT_HINTS = (*UNREACHABLE_HINTS, "NETWORK_CONNECTION", "SLOW_DOWN", "SlowDown", "ServiceUnavailable",
                   "Service Unavailable", "HTTP status 503", "INTERNAL_FAILURE", "InternalError", "Connection reset",
                   "timed out", "Read timeout")
# Total attempts per S3 request (the first included) for botocore (s3fs) and pyarrow alike. Standard mode
# backs off with jitter (5 attempts wait about 7 s in botocore, 10 s in pyarrow's AWS SDK): enough for a local
# store restart or a throttling burst, short enough that a store that is really down is reported soon.
S3_RETRY_ATTEMPTS = 5
S3_RETRIES = {"total_max_attempts": S3_RETRY_ATTEMPTS, "mode": "standard"}


class MissingObjectError(UserError, FileNotFoundError):
    """The URI names nothing; callers that expect absence can `except FileNotFoundError`."""


class UnreachableError(UserError):
    """The storage endpoint did not answer (refused, no route, timed out): possibly only for a while."""


# --- parsing -------------------------------------------------------------------------------------------------


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def _local_path(uri: str) -> str:
    if uri.startswith("file://"):
        parsed = urllib.parse.urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise UserError(f"{uri}: file:// URIs name a local path (file:///abs/path), not host {parsed.netloc!r}")
        uri = urllib.parse.unquote(parsed.path)
    elif "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise UserError(f"{uri}: unsupported URI scheme {scheme!r}; use a local path, file://... or s3://bucket/prefix")
    return os.path.abspath(os.path.expanduser(uri))


def _s3_path(uri: str) -> str:
    path = uri[len("s3://"):].rstrip("/")
    if not path.split("/", 1)[0]:
        raise UserError(f"{uri}: an S3 URI needs a bucket: s3://bucket/prefix")
    return path


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Appends path parts with '/' for URIs with a scheme and os.path.join for local paths."""
    uri = str(uri)
    if "://" not in uri:
        return os.path.join(uri, *parts)
    scheme, rest = uri.split("://", 1)
    pieces = [rest.rstrip("/")] + [p.strip("/") for p in parts if p.strip("/")]
    return f"{scheme}://" + "/".join(pieces)


def endpoint(endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint in effect; None means AWS's own."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


# --- filesystems ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _s3fs(endpoint_url: str | None, _identity: str, _pid: int) -> fsspec.AbstractFileSystem:
    # One instance per endpoint, credential set and process: s3fs resolves credentials once per instance,
    # so a change of AWS_* variables (tests do that) must give a fresh one. Listings are not cached because
    # other processes (Ray workers) write the same prefixes.
    import s3fs

    return s3fs.S3FileSystem(
        endpoint_url=endpoint_url, use_listings_cache=False, skip_instance_cache=True,
        config_kwargs={"connect_timeout": 10, "retries": dict(S3_RETRIES)},
    )


def _credential_identity() -> str:
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    return hashlib.sha256("\0".join(os.environ.get(n, "") for n in names).encode()).hexdigest()


def filesystem(uri: str | os.PathLike, *, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path within it): s3fs for s3:// (path `bucket/key`), the local filesystem otherwise."""
    uri = str(uri)
    if is_s3(uri):
        return _s3fs(endpoint(endpoint_url), _credential_identity(), os.getpid()), _s3_path(uri)
    return fsspec.filesystem("file"), _local_path(uri)


def pyarrow_filesystem(uri: str | os.PathLike, *, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path within it), e.g. for Ray Data's `filesystem=` argument.

    Credentials are left to the AWS chain of whichever process uses it, so pickling it to Ray workers
    carries the endpoint only. So does the retry strategy: pyarrow drops it when pickling, and a worker's
    copy retries with pyarrow's default (3 attempts, the same standard strategy).
    """
    uri = str(uri)
    if not is_s3(uri):
        return pafs.LocalFileSystem(), _local_path(uri)
    options: dict[str, str] = {}
    if region := _region():
        options["region"] = region
    if url := endpoint(endpoint_url):
        parsed = urllib.parse.urlparse(url)
        options.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
    retry = pafs.AwsStandardS3RetryStrategy(max_attempts=S3_RETRY_ATTEMPTS)
    return pafs.S3FileSystem(retry_strategy=retry, **options), _s3_path(uri)


# --- errors --------------------------------------------------------------------------------------------------


def _redact(text: str) -> str:
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if secret := os.environ.get(name):
            text = text.replace(secret, "***")
    return " ".join(text.split())  # one line


def _translate(exc: BaseException, uri: str, endpoint_url: str | None) -> UserError | None:
    """A one-line UserError for a storage failure, or None to let an unrelated error propagate."""
    import botocore.exceptions as bexc

    where = f"S3 endpoint {endpoint(endpoint_url) or '(AWS default)'}" if is_s3(uri) else "local storage"
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, bexc.NoCredentialsError | bexc.PartialCredentialsError):
        return UserError(
            f"{uri}: no S3 credentials for {where}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            '(for the local store: eval "$(p2es objectstore start)")'
        )
    if is_s3(uri) and (
        isinstance(exc, bexc.EndpointConnectionError | ConnectionError) or any(h in text for h in UNREACHABLE_HINTS)
    ):
        return UnreachableError(
            f"{uri}: cannot reach {where} (connection refused or no route); "
            "for the local store run `p2es objectstore start` and export what it prints"
        )
    if is_s3(uri) and any(h in text for h in NO_BUCKET_HINTS):
        bucket = _s3_path(uri).split("/", 1)[0]
        return MissingObjectError(f"{uri}: bucket {bucket!r} does not exist at {where}")
    if isinstance(exc, PermissionError) or any(h in text for h in DENIED_HINTS):
        hint = "; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" if is_s3(uri) else ""
        return UserError(f"{uri}: permission denied by {where}{hint}")
    if isinstance(exc, FileNotFoundError):
        return MissingObjectError(f"{uri}: no such file or object")
    if isinstance(exc, OSError | bexc.BotoCoreError | bexc.ClientError):
        return UserError(f"{uri}: storage error at {where}: {_redact(text)}")
    return None


def storage_error(exc: BaseException, uri: str | os.PathLike, *, endpoint_url: str | None = None) -> UserError | None:
    """The one-line UserError `storage_errors` would raise for `exc` at `uri`; None for a non-storage error."""
    if isinstance(exc, UserError):
        return exc
    return _translate(exc, str(uri), endpoint_url)


def is_transient(exc: BaseException) -> bool:
    """Whether a storage failure may pass if retried later (unreachable, throttled, dropped), as opposed to a
    missing object, a denied request or a bug."""
    import botocore.exceptions as bexc

    if isinstance(exc, UnreachableError):
        return True
    if isinstance(exc, MissingObjectError | FileNotFoundError | PermissionError):
        return False
    if isinstance(exc, bexc.ConnectionError | bexc.HTTPClientError | ConnectionError | TimeoutError):
        return True
    text = f"{type(exc).__name__}: {exc}"
    if any(hint in text for hint in DENIED_HINTS + NO_BUCKET_HINTS):
        return False
    # A UserError of `storage_errors` keeps the original text; its cause is lost when it crosses a Ray process.
    storage_types = OSError | bexc.BotoCoreError | bexc.ClientError | UserError
    return isinstance(exc, storage_types) and any(hint in text for hint in TRANSIENT_HINTS)


@contextlib.contextmanager
def storage_errors(uri: str | os.PathLike, *, endpoint_url: str | None = None) -> Iterator[None]:
    """Turns storage failures inside the block (s3fs, pyarrow.fs, boto) into one-line UserErrors."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        error = _translate(exc, str(uri), endpoint_url)
        if error is None:
            raise
        raise error from exc


# --- operations ----------------------------------------------------------------------------------------------


def exists(uri: str | os.PathLike, *, endpoint_url: str | None = None) -> bool:
    fs, path = filesystem(uri, endpoint_url=endpoint_url)
    with storage_errors(uri, endpoint_url=endpoint_url):
        return fs.exists(path)


def read_bytes(uri: str | os.PathLike, *, endpoint_url: str | None = None) -> bytes:
    fs, path = filesystem(uri, endpoint_url=endpoint_url)
    with storage_errors(uri, endpoint_url=endpoint_url):
        return fs.cat_file(path)


def read_text(uri: str | os.PathLike, *, endpoint_url: str | None = None) -> str:
    return read_bytes(uri, endpoint_url=endpoint_url).decode("utf-8")


@contextlib.contextmanager
def atomic_output(uri: str | os.PathLike, *, endpoint_url: str | None = None) -> Iterator[IO[bytes]]:
    """A binary file to write `uri` through; it appears whole when the block ends, or not at all on error.

    Local: a temp file beside the target, fsynced and os.replace()d. S3: one PUT or a multipart upload,
    both invisible until completed; an error aborts the upload.
    """
    fs, path = filesystem(uri, endpoint_url=endpoint_url)
    with storage_errors(uri, endpoint_url=endpoint_url):
        if is_s3(uri):
            f = fs.open(path, "wb")
            try:
                yield f
            except BaseException:
                f.discard()
                f.closed = True  # close() after discard() would still upload an empty object
                raise
            f.close()
            return
        directory, name = os.path.split(path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=TMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the result is an ordinary data file
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def write_bytes_atomic(uri: str | os.PathLike, data: bytes, *, endpoint_url: str | None = None) -> None:
    if is_s3(uri):
        fs, path = filesystem(uri, endpoint_url=endpoint_url)
        with storage_errors(uri, endpoint_url=endpoint_url):
            fs.pipe_file(path, data)  # a single PUT (or multipart upload) is atomic on S3
        return
    with atomic_output(uri, endpoint_url=endpoint_url) as f:
        f.write(data)


def write_text_atomic(uri: str | os.PathLike, text: str, *, endpoint_url: str | None = None) -> None:
    write_bytes_atomic(uri, text.encode("utf-8"), endpoint_url=endpoint_url)


@contextlib.contextmanager
def open_input(uri: str | os.PathLike, *, endpoint_url: str | None = None) -> Iterator[IO[bytes]]:
    """A seekable binary file for reading (pyarrow.parquet reads from it directly)."""
    fs, path = filesystem(uri, endpoint_url=endpoint_url)
    with storage_errors(uri, endpoint_url=endpoint_url), fs.open(path, "rb") as f:
        yield f


def ls(
    uri: str | os.PathLike, suffix: str | None = None, *, missing_ok: bool = False, endpoint_url: str | None = None
) -> list[str]:
    """The entries directly under `uri` as URIs in the caller's spelling, sorted; optionally by name suffix.

    An S3 prefix with no objects does not exist, so `missing_ok=True` makes that (and a missing local
    directory) an empty list instead of a MissingObjectError.
    """
    fs, path = filesystem(uri, endpoint_url=endpoint_url)
    try:
        with storage_errors(uri, endpoint_url=endpoint_url):
            entries = fs.ls(path, detail=False)
    except MissingObjectError:
        if missing_ok:
            return []
        raise
    # SeaweedFS lists an emptied "directory" as a `prefix/` marker key for a while: not an entry of itself.
    entries = [str(e).rstrip("/") for e in entries if str(e).rstrip("/") != path.rstrip("/")]
    names = {entry.rsplit("/", 1)[-1] for entry in entries}
    names = {n for n in names if not n.endswith(TMP_SUFFIX) and (suffix is None or n.endswith(suffix))}
    return [join(uri, name) for name in sorted(names)]


def rm(uri: str | os.PathLike, *, recursive: bool = False, endpoint_url: str | None = None) -> None:
    """Removes a file, or a whole tree with `recursive=True`; removing what is not there is not an error."""
    fs, path = filesystem(uri, endpoint_url=endpoint_url)
    with storage_errors(uri, endpoint_url=endpoint_url):
        if not fs.exists(path):
            return
        fs.rm(path, recursive=recursive)
        if is_s3(uri) and recursive and "/" in path:
            # SeaweedFS keeps an emptied directory as a `prefix/` marker for a while; it is gone now.
            bucket, key = path.split("/", 1)
            fs.call_s3("delete_object", Bucket=bucket, Key=key.rstrip("/") + "/")


def ensure_bucket(uri: str | os.PathLike, *, endpoint_url: str | None = None) -> None:
    """Creates the bucket of an s3:// URI if missing (the local store starts empty); locally, the directory."""
    fs, path = filesystem(uri, endpoint_url=endpoint_url)
    with storage_errors(uri, endpoint_url=endpoint_url):
        if not is_s3(uri):
            os.makedirs(path, exist_ok=True)
            return
        bucket = path.split("/", 1)[0]
        if not fs.exists(bucket):
            with contextlib.suppress(FileExistsError):  # created meanwhile by a concurrent writer
                fs.mkdir(bucket)
