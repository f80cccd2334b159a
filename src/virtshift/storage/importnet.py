"""The importer child's network sources: HTTP(S) downloads and OCI/docker registry v2 pulls (see
:mod:`virtshift.storage.importer` for the behaviour). Imported only for those sources, so that a
clone or a blank disk does not pay for loading the HTTP and TLS modules."""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import socket
import ssl
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

from virtshift.storage.importer import (
    ImportArgs,
    ImportFailed,
    RegistryRef,
    parse_registry_url,
    redact,
)
from virtshift.storage.importworker import CHUNK, NET_TIMEOUT, Meter

_MANIFEST_TYPES = ", ".join((
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
))


def _ssl_context(args: ImportArgs) -> ssl.SSLContext:
    if args.insecure:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    try:
        return ssl.create_default_context(cafile=args.ca_file or None)
    except (OSError, ssl.SSLError) as e:
        raise ImportFailed(f"cannot load the CA bundle: {e}", reason="InvalidSource") from e


def _basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def _connection_failure(url: str, e: BaseException) -> ImportFailed:
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(reason, ssl.SSLCertVerificationError):
        return ImportFailed(f"{redact(url)}: TLS verification failed: {reason.verify_message}",
                            reason="TLSError", retryable=False)
    if isinstance(reason, ssl.SSLError):
        return ImportFailed(f"{redact(url)}: TLS error: {reason}", reason="TLSError",
                            retryable=False)
    if isinstance(reason, ConnectionRefusedError):
        text = "connection refused"
    elif isinstance(reason, socket.gaierror):
        text = f"cannot resolve the host ({reason.strerror})"
    elif isinstance(reason, (TimeoutError, socket.timeout)):
        text = "timed out"
    else:
        text = str(reason) or type(reason).__name__
    return ImportFailed(f"cannot reach {redact(url)}: {text}", reason="ConnectionFailed",
                        retryable=True)


def _status_failure(url: str, code: int, phrase: str) -> ImportFailed:
    text = f"{redact(url)}: the server answered {code} {phrase}".rstrip() + " (expected 200)"
    if code in (401, 403):
        return ImportFailed(text, reason="Unauthorized", retryable=False)
    if code in (404, 410):
        return ImportFailed(text, reason="NotFound", retryable=False)
    if code >= 500 or code in (408, 429):
        return ImportFailed(text, reason="ServerError", retryable=True)
    return ImportFailed(text, reason="HTTPError", retryable=False)


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects, keeping credentials only on the same host (as curl does): a registry's
    blob redirect to object storage must not carry the registry's token."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != \
                urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


class _Opener:
    """GET requests with the import's TLS settings; redirects are followed."""

    def __init__(self, args: ImportArgs) -> None:
        handlers: list[Any] = [urllib.request.ProxyHandler({}), _Redirects()]
        # loading the system's CAs takes ~50 ms: only when TLS is configured or certain
        if args.ca_file or args.insecure or not args.url.startswith("http:"):
            handlers.append(urllib.request.HTTPSHandler(context=_ssl_context(args)))
        self.opener = urllib.request.build_opener(*handlers)

    def get(self, url: str, headers: dict[str, str]) -> Any:
        req = urllib.request.Request(url, headers=headers, method="GET")
        try:
            return self.opener.open(req, timeout=NET_TIMEOUT)
        except urllib.error.HTTPError as e:
            e.close()
            raise
        except (urllib.error.URLError, OSError) as e:
            raise _connection_failure(url, e) from e


def _extra_headers(args: ImportArgs) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in args.headers:
        name, _, value = h.partition(":")
        out[name.strip()] = value.strip()
    return out


def _read_body(resp: Any, url: str, meter: Meter, length: int) -> Iterator[bytes]:
    """The response body in chunks, counted by ``meter``; a body shorter than ``length`` (its
    Content-Length, if any) fails TransferInterrupted."""
    got = 0
    try:
        while True:
            try:
                data = resp.read(CHUNK)
            except (OSError, ValueError, http.client.HTTPException) as e:
                raise ImportFailed(f"{redact(url)}: the transfer broke off after {got} bytes"
                                   f"{f' of {length}' if length else ''}: {e}",
                                   reason="TransferInterrupted", retryable=True) from e
            if not data:
                break
            got += len(data)
            meter.add(data)
            yield data
    finally:
        resp.close()
    if length and got < length:
        raise ImportFailed(f"{redact(url)}: the transfer broke off after {got} of {length} "
                           "bytes", reason="TransferInterrupted", retryable=True)


def http_source(args: ImportArgs, meter: Meter) -> Iterator[bytes]:
    headers = _extra_headers(args)
    if args.username or args.password:
        headers["Authorization"] = _basic(args.username, args.password)
    headers.setdefault("Accept-Encoding", "identity")
    opener = _Opener(args)
    try:
        resp = opener.get(args.url, headers)
    except urllib.error.HTTPError as e:
        raise _status_failure(args.url, e.code, str(e.reason)) from e
    length = int(resp.headers.get("Content-Length") or 0)
    meter.total = length
    return _read_body(resp, args.url, meter, length)


class _Registry:
    """A registry v2 client: anonymous, basic, or a bearer token from the challenge."""

    def __init__(self, args: ImportArgs, ref: RegistryRef) -> None:
        self.args, self.ref = args, ref
        self.opener = _Opener(args)
        self.scheme = "https"
        self.auth = _basic(args.username, args.password) if args.username else ""

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.ref.host}/v2/{self.ref.repository}/{path}"

    def get(self, path: str, accept: str = "") -> Any:
        headers = {"Accept": accept} if accept else {}
        tried_token = False
        while True:
            if self.auth:
                headers["Authorization"] = self.auth
            url = self.url(path)
            try:
                return self.opener.get(url, headers)
            except urllib.error.HTTPError as e:
                challenge = e.headers.get("WWW-Authenticate", "") if e.headers else ""
                if e.code == 401 and not tried_token and challenge:
                    tried_token = True
                    self.auth = self._answer(challenge)
                    continue
                if e.code == 404:
                    raise ImportFailed(f"{redact(self.args.url)}: {url} answered 404 Not Found",
                                       reason="NotFound", retryable=False) from e
                raise _status_failure(url, e.code, str(e.reason)) from e
            except ImportFailed as e:
                # docker's insecure-registries rule: HTTPS first, plain HTTP if allowed
                if self.args.insecure and self.scheme == "https" and e.reason in (
                        "TLSError", "ConnectionFailed"):
                    self.scheme = "http"
                    continue
                raise

    def _answer(self, challenge: str) -> str:
        kind, _, params = challenge.partition(" ")
        if kind.lower() == "basic":
            if not self.args.username:
                raise ImportFailed(f"{redact(self.args.url)}: the registry wants credentials",
                                   reason="Unauthorized", retryable=False)
            return _basic(self.args.username, self.args.password)
        if kind.lower() != "bearer":
            raise ImportFailed(f"{redact(self.args.url)}: unsupported registry authentication "
                               f"{kind!r}", reason="Unauthorized", retryable=False)
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        realm = fields.pop("realm", "")
        if not realm:
            raise ImportFailed(f"{redact(self.args.url)}: bearer challenge without a realm",
                               reason="Unauthorized", retryable=False)
        query = urllib.parse.urlencode({k: v for k, v in fields.items()
                                        if k in ("service", "scope")})
        token_url = realm + ("&" if "?" in realm else "?") + query if query else realm
        headers = {}
        if self.args.username:
            headers["Authorization"] = _basic(self.args.username, self.args.password)
        try:
            with self.opener.get(token_url, headers) as resp:
                body = json.loads(resp.read(1 << 20))
        except urllib.error.HTTPError as e:
            raise _status_failure(token_url, e.code, str(e.reason)) from e
        except ValueError as e:
            raise ImportFailed(f"{token_url}: the token answer is not JSON",
                               reason="Unauthorized", retryable=False) from e
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else ""
        if not token:
            raise ImportFailed(f"{token_url}: no token in the answer", reason="Unauthorized",
                               retryable=False)
        return f"Bearer {token}"

    def manifest(self) -> dict[str, Any]:
        reference = self.ref.reference
        for _ in range(2):
            with self.get(f"manifests/{reference}", _MANIFEST_TYPES) as resp:
                try:
                    doc = json.loads(resp.read(4 << 20))
                except ValueError as e:
                    raise ImportFailed(f"{redact(self.args.url)}: the manifest is not JSON",
                                       reason="ImagePullFailed") from e
            if not isinstance(doc, dict):
                break
            if "manifests" in doc:  # an index: take linux/amd64, else the first
                entries = [m for m in doc["manifests"] if isinstance(m, dict)]
                chosen = next((m for m in entries
                               if m.get("platform", {}).get("architecture") == "amd64"
                               and m.get("platform", {}).get("os") == "linux"),
                              entries[0] if entries else None)
                if chosen is None:
                    break
                reference = str(chosen.get("digest"))
                continue
            if isinstance(doc.get("layers"), list):
                return doc
            break
        raise ImportFailed(f"{redact(self.args.url)}: not an image manifest",
                           reason="ImagePullFailed", retryable=False)


class _ChunkReader(io.RawIOBase):
    """A file-like view of chunks (for tarfile's stream mode)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if not self._buf:
            self._buf = next(self._chunks, b"")
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _disk_member(name: str) -> bool:
    clean = name.lstrip("./")
    return clean.startswith("disk/") and len(clean) > len("disk/")


def registry_source(args: ImportArgs, meter: Meter) -> Iterator[bytes]:
    ref = parse_registry_url(args.url)
    reg = _Registry(args, ref)
    manifest = reg.manifest()
    layers = [la for la in manifest["layers"] if isinstance(la, dict) and la.get("digest")]
    for layer in reversed(layers):
        digest = str(layer["digest"])
        resp = reg.get(f"blobs/{digest}")
        length = int(resp.headers.get("Content-Length") or layer.get("size") or 0)
        meter.total = length
        raw = io.BufferedReader(_ChunkReader(_read_body(resp, reg.url(f"blobs/{digest}"),
                                                           meter, length)), CHUNK)
        try:
            tar = tarfile.open(fileobj=raw, mode="r|*")  # noqa: SIM115 (closed with raw)
            for member in tar:
                if member.isreg() and _disk_member(member.name):
                    f = tar.extractfile(member)
                    assert f is not None
                    while data := f.read(CHUNK):
                        yield data
                    # drain the layer so that its bytes are counted (and the body checked)
                    while raw.read(CHUNK):
                        pass
                    return
        except tarfile.TarError as e:
            raise ImportFailed(f"{redact(args.url)}: layer {digest} is not a tar archive: {e}",
                               reason="ImagePullFailed", retryable=False) from e
        finally:
            raw.close()
    raise ImportFailed(f"{redact(args.url)}: the image has no disk/ file in its layers",
                       reason="ImagePullFailed", retryable=False)
