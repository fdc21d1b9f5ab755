"""What a setting's value may be: each kind parses raw input (a YAML value, or text from the environment
or the command line) into a typed value, or says what is valid.

Parsing is strict on purpose: a YAML `2.7`, `true` or `0x10` is never turned into a thread count, a URL
must be one a server can listen on or be reached at, and every number has a range.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

Value = str | int | bool | tuple[str, ...]

MAX_TEXT = 4096  # no setting needs more; a longer value is a mistake (or an attack) either way


def _text(raw: object, what: str = "text") -> str:
    if not isinstance(raw, str):
        raise ValueError(f"must be {what}, not {_kind_of(raw)}")
    value = raw.strip()
    if len(value) > MAX_TEXT:
        raise ValueError(f"is too long ({len(value)} characters; at most {MAX_TEXT})")
    if any(ord(c) < 32 for c in value):
        raise ValueError("must not contain control characters")
    return value


def _kind_of(raw: object) -> str:
    if isinstance(raw, bool):
        return "a true/false value"
    if isinstance(raw, int):
        return "a number"
    if isinstance(raw, float):
        return "a decimal number"
    if isinstance(raw, list | tuple):
        return "a list"
    if isinstance(raw, dict):
        return "a mapping"
    return type(raw).__name__


@dataclass(frozen=True)
class Text:
    valid: str = "any text"

    def parse(self, raw: object) -> Value:
        return _text(raw)


@dataclass(frozen=True)
class Choice:
    values: tuple[str, ...]

    @property
    def valid(self) -> str:
        return "one of: " + ", ".join(self.values)

    def parse(self, raw: object) -> Value:
        value = _text(raw, "one of " + ", ".join(self.values)).lower()
        if value not in self.values:
            raise ValueError(f"must be {self.valid}")
        return value


@dataclass(frozen=True)
class Integer:
    low: int
    high: int
    auto: bool = False  # 0 is allowed too: "choose for this machine", or what `zero` says
    zero: str = "automatic"  # what 0 means, as the messages say it

    @property
    def valid(self) -> str:
        span = f"{self.low}-{self.high}"
        return f"0 ({self.zero}) or {span}" if self.auto else span

    def parse(self, raw: object) -> Value:
        # Only a plain whole number: YAML's 0x10, 0o17, 010, 1_000, 2.7 and true are all refused.
        n: int
        if isinstance(raw, int) and (type(raw) is int or _plain_scalar_int(raw)):
            n = int(raw)  # ruamel's ScalarInt for a plain `0` included
        elif isinstance(raw, str) and re.fullmatch(r"\s*[0-9]{1,12}\s*", raw):
            n = int(raw)
        else:
            raise ValueError(f"must be a whole number ({self.valid})")
        if (self.auto and n == 0) or self.low <= n <= self.high:
            return n
        raise ValueError(f"is out of range: must be {self.valid}")


def _plain_scalar_int(raw: object) -> bool:
    """ruamel reads some plain decimals (`0`) as ScalarInt: accept those, not hex, octal or `1_000`."""
    if type(raw).__name__ != "ScalarInt" or not isinstance(raw, int):
        return False
    return getattr(raw, "_underscore", None) is None and getattr(raw, "_width", None) in (None, len(str(raw)))


@dataclass(frozen=True)
class Boolean:
    valid: str = "true or false"

    def parse(self, raw: object) -> Value:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str):
            low = raw.strip().lower()
            if low in ("true", "yes", "on", "1"):
                return True
            if low in ("false", "no", "off", "0"):
                return False
        raise ValueError("must be true or false")


@dataclass(frozen=True)
class Url:
    """An http(s) URL with a host and a valid port; a path only where a client takes one (`/v1`)."""

    path: bool = False
    empty: bool = False  # "" means "the provider's default"

    @property
    def valid(self) -> str:
        shape = "http(s)://HOST[:PORT]" + ("[/PATH]" if self.path else "")
        return f"empty (the default) or {shape}" if self.empty else shape

    def parse(self, raw: object) -> Value:
        value = _text(raw, "a URL")
        if not value and self.empty:
            return ""
        parts = split_url(value)
        if parts.path.strip("/") and not self.path:
            raise ValueError(f"must not have a path ({parts.path}): use {self.valid}")
        return value.rstrip("/")


def split_url(value: str) -> SplitResult:
    """urlsplit, with every way an address can be unusable turned into a ValueError that says why."""
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError for a port out of 0-65535 or not a number
    except ValueError as e:
        raise ValueError(f"is not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("must start with http:// or https://")
    if not parts.hostname:
        raise ValueError("must name a host, as in http://127.0.0.1:11434")
    if port == 0:
        raise ValueError("has port 0, which no server listens on: use 1-65535")
    if parts.username or parts.password:
        raise ValueError("must not carry a user name or password (use the api_key setting)")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query (?...) or fragment (#...)")
    return parts


@dataclass(frozen=True)
class Address:
    """host:port, as gRPC clients take it (Temporal)."""

    valid: str = "HOST:PORT, e.g. 127.0.0.1:7233"

    def parse(self, raw: object) -> Value:
        value = _text(raw, "an address")
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"must be {self.valid} (port 1-65535)")
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:.]+\]", host):
            raise ValueError(f"has an invalid host {host!r}")
        return value


@dataclass(frozen=True)
class Version:
    valid: str = "latest, or a release version like 0.33.0"

    def parse(self, raw: object) -> Value:
        value = _text(raw, "a version").removeprefix("v")
        if value == "latest" or re.fullmatch(r"[0-9]{1,4}\.[0-9]{1,4}\.[0-9]{1,4}", value):
            return value
        raise ValueError(f"must be {self.valid}")


@dataclass(frozen=True)
class Model:
    valid: str = "a model name like qwen2.5-coder:7b, or empty for the provider's default"

    def parse(self, raw: object) -> Value:
        from stigmer.errors import StigmerError
        from stigmer.llm.names import parse_model_name  # light; imported here to keep kinds import-free

        value = _text(raw, "a model name")
        if not value:
            return ""
        try:
            parse_model_name(value)
        except StigmerError as e:
            raise ValueError(e.message.removesuffix(".")) from None
        return value


@dataclass(frozen=True)
class Patterns:
    """A comma-separated list (or YAML list) of origins such as https://app.example.com or http://*.lan."""

    valid: str = "comma-separated origins, e.g. https://app.example.com,http://localhost:*"

    def parse(self, raw: object) -> Value:
        items = raw if isinstance(raw, list) else _text(raw, "a list of origins").split(",")
        out = []
        for item in items:
            value = _text(item, "an origin")
            if not value:
                continue
            if value != "*" and not re.fullmatch(r"[a-z][a-z0-9+.\-]*://[^\s/]+", value.lower()):
                raise ValueError(f"has {value!r}, which is not an origin (scheme://host[:port])")
            out.append(value)
        return tuple(out)


@dataclass(frozen=True)
class AutoBoolean:
    """true, false, or auto (decided from other settings, as temporal.tls is by the TLS files)."""

    valid: str = "auto, true or false"

    def parse(self, raw: object) -> Value:
        if isinstance(raw, str) and raw.strip().lower() == "auto":
            return "auto"
        try:
            return Boolean().parse(raw)
        except ValueError:
            raise ValueError(f"must be {self.valid}") from None


@dataclass(frozen=True)
class FilePath:
    """A file's path, absolute or under ~ (services do not run in the folder the user typed it in);
    empty means none. Whether the file is there and readable is checked when it is used."""

    valid: str = "empty, or an absolute path to a file (~/... works)"

    def parse(self, raw: object) -> Value:
        value = _text(raw, "a file path")
        if not value:
            return ""
        if not (value.startswith("~") or os.path.isabs(value)):
            raise ValueError(
                "must be an absolute path (or start with ~/): a relative one would depend on the "
                "folder the server was started from"
            )
        return value


@dataclass(frozen=True)
class HostName:
    """A DNS name or IP address alone (no scheme, no port), or empty."""

    valid: str = "empty, or a host name like temporal.example.com"

    def parse(self, raw: object) -> Value:
        value = _text(raw, "a host name")
        if value and not (len(value) <= 253 and re.fullmatch(r"[A-Za-z0-9_.\-]+|[0-9A-Fa-f:.]+", value)):
            raise ValueError(f"must be {self.valid} (no scheme or port)")
        return value


Kind = (
    Text
    | Choice
    | Integer
    | Boolean
    | Url
    | Address
    | Version
    | Model
    | Patterns
    | AutoBoolean
    | FilePath
    | HostName
)
