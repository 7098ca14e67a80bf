"""All configuration in one pydantic-settings class (env prefix QHX_); the CLI maps onto these fields."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

DEFAULT_LAUNCH = (
    "cd {root} && LD_LIBRARY_PATH=. ./qhx_generate {manifest} libQnnHtp.so libQnnSystem.so "
    "{artifacts} {max_new} {prompt}"
)

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_HOSTNAME = re.compile(r"[A-Za-z0-9._-]+")


def parse_host_port(address: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"tcp:host:port"``, ``"[v6]:port"``, ``"port"``) -> (host, port); the one
    parser of adb server addresses (settings, ADB_SERVER_SOCKET, ANDROID_ADB_SERVER_PORT).

    Raises ``ValueError`` with a one-line message for anything else, such as a port outside 1-65535.
    """
    text = address.strip().removeprefix("tcp:")
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            host = ""
    ok_host = bool(host) and (":" in host or _HOSTNAME.fullmatch(host) is not None)
    if not ok_host or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"adb server {address!r} is not host:port with a port in 1-65535")
    return host, int(port)


def format_host_port(host: str, port: int) -> str:
    """The one spelling of an adb server (phone keys, ``bundle_for``): ``host:port``, ``[v6]:port``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def same_adb_server(a: str, b: str) -> bool:
    """Whether two addresses, in any spelling ``parse_host_port`` takes, name one adb server."""
    return format_host_port(*parse_host_port(a)) == format_host_port(*parse_host_port(b))


@dataclass(frozen=True)
class SettingsProblem:
    """One field that cannot work: ``value`` is the input as given (None: not shown); ``env`` the
    variable it came from when not the field's own ``QHX_`` one (e.g. ADB_SERVER_SOCKET)."""

    field: str
    value: object | None
    message: str
    env: str | None = None

    def describe(self, flag: str | None = None) -> str:
        """``--flag VALUE: message`` for a flag given on the command line, else ``ENV=VALUE: message``."""
        if flag is not None:
            return f"{flag}{'' if self.value is None else f' {self.value}'}: {self.message}"
        env = self.env or f"QHX_{self.field.upper()}"
        return f"{env}{'' if self.value is None else f'={self.value}'}: {self.message}"


class SettingsInvalid(ValueError):
    """Settings that cannot work (from flags, ``QHX_`` variables or code), one problem per field, each
    a short sentence: the CLI prints them on one line and exits 2, without a traceback."""

    def __init__(self, problems: list[SettingsProblem]) -> None:
        self.problems = problems
        super().__init__("; ".join(p.describe() for p in problems))


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _problems(exc: ValidationError | SettingsError) -> list[SettingsProblem]:
    if isinstance(exc, SettingsError):  # pydantic-settings could not decode an env var (lists are JSON)
        found = re.search(r'field "(\w+)"', str(exc))
        if found is None:
            return [SettingsProblem("settings", None, str(exc))]
        name = found.group(1)
        return [SettingsProblem(name, None, f"not a JSON list; write e.g. QHX_{name.upper()}='[\"a\", \"b\"]'")]
    problems = []
    for err in exc.errors(include_url=False):
        name = str(err["loc"][0]) if err["loc"] else "settings"
        bound = next(iter((err.get("ctx") or {}).items()), None)
        if err["type"] in _BOUNDS and bound is not None:
            message = f"must be {_BOUNDS[err['type']]} {bound[1]:g}"
        else:
            message = str(err["msg"]).removeprefix("Value error, ")
            message = message[:1].lower() + message[1:]
        value = err.get("input")  # a validator's message names the value itself
        shown = value if isinstance(value, (str, int, float)) and err["type"] != "value_error" else None
        problems.append(SettingsProblem(name, shown, message))
    return problems


class Settings(BaseSettings):
    # numbers are finite: an infinite or NaN timeout, poll or queue length is a typo, never a choice
    model_config = SettingsConfigDict(env_prefix="QHX_", extra="ignore", allow_inf_nan=False)

    # --- HTTP ---
    host: str = Field("127.0.0.1", min_length=1, description="Address to bind the HTTP server to.")
    port: int = Field(8000, ge=1, le=65535, description="Port to bind the HTTP server to.")
    log_level: str = Field("info", description="Log level (debug, info, warning, error).")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log line format: text, or json (one object per line: ts, level, logger, msg, "
        "request_id and the request's fields)."
    )
    api_keys: list[str] = Field(
        default_factory=list, repr=False,
        description="API keys accepted as `Authorization: Bearer <key>` (repeatable). Empty: no "
        "authentication. /health and /ready are always open; /metrics unless metrics_require_key.",
    )
    metrics_require_key: bool = Field(False, description="Require an API key on /metrics as well.")
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins browsers may call the API from (repeatable; '*' for any). Empty: no CORS headers.",
    )
    console: bool = Field(
        True, description="Serve the web console at / and /console (docs/console.md). Its data comes from "
        "the API, with the same API key."
    )
    requests_log_size: int = Field(
        500, ge=0, le=100_000, description="Requests kept in memory for GET /v1/requests and the console's "
        "requests view (0: none)."
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest request body accepted, in bytes (after gzip or deflate "
        "decoding, which is bounded by the same number); a larger one gets 413 (code request_too_large).",
    )
    body_timeout_s: float = Field(
        60.0, gt=0, description="A request body must arrive whole within this many seconds of its headers; "
        "past it: 408 (code request_timeout), connection closed (a client trickling its body, slowloris).",
    )
    write_timeout_s: float = Field(
        30.0, gt=0, description="A stream whose client has not taken any data for this long (its socket "
        "buffers full) is cancelled on its phone, logged, and its connection dropped.",
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="On SIGTERM: how long requests in flight may run on before they are cancelled "
        "on their phones (streams end with an error event). A second SIGTERM or SIGINT cancels them at once.",
    )

    # --- phones ---
    adb_servers: list[str] = Field(
        default_factory=list,
        description="adb servers as host:port (repeatable). Empty: the local one, honouring "
        "ANDROID_ADB_SERVER_PORT and ADB_SERVER_SOCKET.",
    )
    device_root: str = Field("/data/local/tmp/wq", description="Device root on the phone (bundles, runtime).")
    device_mode: Literal["auto", "session", "oneshot"] = Field(
        "auto", description="auto: try session protocol v1, fall back to one-shot per phone."
    )
    launch_command: str = Field(
        DEFAULT_LAUNCH, min_length=1,
        description="Phone shell command template; {root} {manifest} {artifacts} {max_new} {prompt} "
        "are filled in (already shell-quoted). Session mode passes '-' as {prompt}.",
    )
    bundle: str | None = Field(
        None, min_length=1, description="Artifacts root to serve when a phone holds several (e.g. qwen35-w8). "
        "Default: the fp16 bundle (qwen35) if present, else the first found."
    )
    bundle_for: list[str] = Field(
        default_factory=list,
        description="Per-phone bundle as SERIAL=BUNDLE (repeatable), overriding `bundle` for that phone "
        "(e.g. R5CX12=qwen35-w8); write ADB_SERVER/SERIAL=BUNDLE when two adb servers see one serial.",
    )
    model_name: str | None = Field(None, min_length=1, description="Override the served model name derived from the bundle.")
    max_context: int | None = Field(None, ge=1, description="Override the context length derived from the manifest.")
    session_max_new: int = Field(1024, ge=1, description="max_new passed on the session command line (upper bound).")
    ready_timeout_s: float = Field(60.0, gt=0, description="Seconds to wait for a session's `ready` event.")
    stall_timeout_s: float = Field(30.0, gt=0, description="A token gap longer than this ends the request.")
    cancel_timeout_s: float = Field(5.0, gt=0, description="Seconds to wait for `done` after sending `cancel`.")
    restart_backoff_max_s: float = Field(30.0, gt=0, description="Cap of the session restart backoff (1, 2, 4 ... s).")
    quarantine_after: int = Field(
        2, ge=1, description="Consecutive failures (failed requests, failed session starts, sessions that "
        "died) after which a phone is quarantined: out of rotation, retried after a backoff."
    )
    quarantine_s: float = Field(
        10.0, gt=0, description="Length of a first quarantine; doubled at each further failure in a row, up to "
        "quarantine_max_s. A successful request ends the series."
    )
    quarantine_max_s: float = Field(300.0, gt=0, description="Cap of the quarantine backoff.")
    tokenizer_cache: str = Field(
        "~/.cache/qhx-server/tokenizers", min_length=1, description="Host cache of phones' tokenizer.json, keyed by sha256."
    )
    adb_timeout_s: float = Field(
        10.0, gt=0, description="Socket timeout of short adb calls (device list, getprop, file pulls per read)."
    )
    device_poll_s: float = Field(1.0, gt=0, description="Seconds between device-list polls of each adb server.")
    recheck_incompatible_s: float = Field(
        30.0, ge=0, description="Seconds between discoveries of a phone that cannot serve (no bundle, wrong SoC), "
        "so that a bundle pushed meanwhile is served without a restart."
    )
    prefill_ms_per_token: float = Field(
        100.0, ge=0,
        description="Extra wait for the first token per prompt token, on top of stall_timeout_s: phones "
        "process prompts token by token (~45 ms/token at 22 tok/s), so a long prompt is not a stall.",
    )

    # --- simulated phones ---
    sim: int = Field(
        -1, ge=-1, description="Start N simulated phones on a private adb server and serve from them. "
        "-1: auto, one simulated phone only when no adb server is named (adb_servers) and none with a "
        "phone is reachable; 0: never."
    )
    sim_speed: float = Field(1.0, ge=0, description="Simulated phone speed factor (0 = as fast as possible).")
    sim_precision: Literal["fp16", "w8", "both"] = Field("fp16", description="Bundles staged on simulated phones.")

    # --- queueing ---
    max_queue: int = Field(64, ge=1, description="Per-model queue bound; beyond it requests get 429.")
    queue_timeout_s: float = Field(
        300.0, gt=0, description="Longest a request may wait in its model's queue for a phone; then 503 "
        "(code queue_timeout)."
    )
    # --- state reuse (docs/state-reuse.md) ---
    state_reuse: Literal["on", "off"] = Field(
        "on", description="Reuse what a phone still holds from earlier requests (its live state, "
        "checkpoints) instead of processing the whole prompt again. off: every request starts from an "
        "empty state (reset), for comparison and as an escape hatch."
    )
    route_wait_max_s: float = Field(
        30.0, ge=0, le=600, description="With state_reuse on: longest a request waits for a busy phone that "
        "holds its prompt (expected faster than a free phone processing the whole prompt), counted from "
        "when it first declined a free phone, before it takes a free phone instead; at most half of "
        "queue_timeout_s. 0: never wait while a phone is free."
    )
    context_overflow: Literal["error", "drop-oldest"] = Field(
        "error", description="A chat that outgrows the context: error (400, OpenAI's behaviour), or "
        "drop-oldest: drop whole oldest turns after the system message, down to half the context. "
        "Per request: the `context_overflow` extension field."
    )
    history_render: Literal["template", "as-generated"] = Field(
        "template", description="How earlier assistant turns are rendered: template (the model's own "
        "chat template), or as-generated (exactly as the phone generated them, keeping the empty think "
        "block), so that continuing a phone's live state hits on runtimes without checkpoints."
    )

    # --- the Responses API (docs/api.md, "POST /v1/responses") ---
    responses_store_max: int = Field(
        1000, ge=0, le=1_000_000, description="Stored responses kept in memory (store: true, the default) for "
        "GET /v1/responses/{id} and previous_response_id; beyond it the oldest go. 0: none are kept."
    )
    responses_store_ttl_s: float = Field(
        3600.0, gt=0, description="Seconds a stored response is kept; then its id is a 404 (as an unknown one)."
    )
    responses_store_max_bytes: int = Field(
        128 * 1024 * 1024, ge=0, description="Memory the stored responses may hold, in bytes (their JSON and "
        "the conversations they continue, as Python holds them); beyond it the oldest go. A response that "
        "holds more on its own is not kept."
    )

    # --- phone health (docs/capacity.md, "Phone health") ---
    telemetry_poll_s: float = Field(
        10.0, ge=0, description="Seconds between reads of each phone's temperature, thermal status and battery "
        "(adb shell dumpsys thermalservice, dumpsys battery), off the path of any token. 0: never read them."
    )
    thermal_routing: Literal["on", "off"] = Field(
        "on", description="Thermal-aware scheduling: idle phones that run cooler get requests first, and a "
        "phone too hot (thermal_drain_status) or low on battery while not charging (battery_floor_pct) gets "
        "no new requests until it recovers. off: phones are chosen whatever their health."
    )
    thermal_drain_status: int = Field(
        3, ge=1, le=6, description="Android thermal status (0 NONE 1 LIGHT 2 MODERATE 3 SEVERE 4 CRITICAL "
        "5 EMERGENCY 6 SHUTDOWN) from which a phone gets no new requests (requests running on it finish)."
    )
    thermal_resume_status: int = Field(
        2, ge=0, le=5, description="Thermal status at or below which a phone drained for heat gets requests "
        "again; at most thermal_drain_status - 1 (a lower drain status lowers it too)."
    )
    battery_floor_pct: float = Field(
        15.0, ge=0, le=100, description="A phone whose battery is below this percentage and not charging gets "
        "no new requests."
    )
    battery_resume_pct: float = Field(
        20.0, ge=0, le=100, description="Battery percentage from which a phone drained for its battery gets "
        "requests again (or as soon as it charges); at least battery_floor_pct (a higher floor raises it too)."
    )
    thermal_prefer_margin_c: float = Field(
        2.0, ge=0, description="Of idle phones at the same thermal status, those more than this many degrees "
        "hotter than the coolest are passed over while a cooler one is idle."
    )
    decode_rate_window_s: float = Field(
        60.0, gt=0, description="Each phone's measured decode rate (/v1/devices decode_tps, /metrics) is over "
        "the requests it finished in the last this many seconds."
    )

    sse_ping_s: float = Field(15.0, gt=0, description="Seconds between `: ping` SSE comments while a stream waits.")

    def __init__(self, **values: Any) -> None:
        """As pydantic-settings, but every bad value (flag, env var or code) is one SettingsInvalid."""
        try:
            super().__init__(**values)
        except (ValidationError, SettingsError) as e:
            raise SettingsInvalid(_problems(e)) from e

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, v: str) -> str:
        if v.strip().lower() not in LOG_LEVELS:
            raise ValueError(f"log level {v!r} is not one of {', '.join(LOG_LEVELS)}")
        return v.strip().lower()

    @field_validator("device_root")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"device root {v!r} is not an absolute path on the phone")
        return v

    @field_validator("adb_servers")
    @classmethod
    def _host_port(cls, v: list[str]) -> list[str]:
        for entry in v:
            parse_host_port(entry)
        return v

    @field_validator("api_keys")
    @classmethod
    def _no_empty_key(cls, v: list[str]) -> list[str]:
        if any(not key.strip() for key in v):
            raise ValueError("an API key is empty")
        for i, key in enumerate(v, 1):  # a key no client could send would lock everyone out (never shown)
            if not all(" " <= c <= "~" for c in key):
                raise ValueError(f"the API key #{i} has a character an HTTP client cannot send in an Authorization "
                                 "header: printable ASCII only (letters, digits, punctuation)")
            if key != key.strip():
                raise ValueError(f"the API key #{i} starts or ends with a space: clients strip it, it could never match")
        return v

    @field_validator("bundle_for")
    @classmethod
    def _serial_equals_bundle(cls, v: list[str]) -> list[str]:
        for entry in v:
            who, sep, bundle = entry.partition("=")
            if not sep or not who.strip() or not bundle.strip():
                raise ValueError(f"bundle_for entries are SERIAL=BUNDLE, got {entry!r}")
            server, slash, serial = who.rpartition("/")
            if slash:  # ADB_SERVER/SERIAL: a server that cannot be one would silently match nothing
                try:
                    parse_host_port(server)
                except ValueError as e:
                    raise ValueError(f"bundle_for entry {entry!r}: {e}") from None
                if not serial.strip():
                    raise ValueError(f"bundle_for entries are [ADB_SERVER/]SERIAL=BUNDLE, got {entry!r}")
        return v

    def bundle_of(self, adb_server: str, serial: str) -> str | None:
        """The bundle to serve on one phone: its ``bundle_for`` entry, else ``bundle`` (None: the
        default choice, see discovery)."""
        for entry in self.bundle_for:
            who, _, bundle = entry.partition("=")
            server, slash, who_serial = who.strip().rpartition("/")
            if who_serial.strip() == serial and (not slash or same_adb_server(server, adb_server)):
                return bundle.strip()
        return self.bundle
