"""All configuration in one pydantic-settings class (env prefix QHX_); the CLI maps onto these fields."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_LAUNCH = (
    "cd {root} && LD_LIBRARY_PATH=. ./qhx_generate {manifest} libQnnHtp.so libQnnSystem.so "
    "{artifacts} {max_new} {prompt}"
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QHX_", extra="ignore")

    # --- HTTP ---
    host: str = Field("127.0.0.1", description="Address to bind the HTTP server to.")
    port: int = Field(8000, description="Port to bind the HTTP server to.")
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
        DEFAULT_LAUNCH,
        description="Phone shell command template; {root} {manifest} {artifacts} {max_new} {prompt} "
        "are filled in (already shell-quoted). Session mode passes '-' as {prompt}.",
    )
    bundle: str | None = Field(
        None, description="Artifacts root to serve when a phone holds several (e.g. qwen35-w8). "
        "Default: the fp16 bundle (qwen35) if present, else the first found."
    )
    bundle_for: list[str] = Field(
        default_factory=list,
        description="Per-phone bundle as SERIAL=BUNDLE (repeatable), overriding `bundle` for that phone "
        "(e.g. R5CX12=qwen35-w8); write ADB_SERVER/SERIAL=BUNDLE when two adb servers see one serial.",
    )
    model_name: str | None = Field(None, description="Override the served model name derived from the bundle.")
    max_context: int | None = Field(None, description="Override the context length derived from the manifest.")
    session_max_new: int = Field(1024, description="max_new passed on the session command line (upper bound).")
    ready_timeout_s: float = Field(60.0, description="Seconds to wait for a session's `ready` event.")
    stall_timeout_s: float = Field(30.0, description="A token gap longer than this ends the request.")
    cancel_timeout_s: float = Field(5.0, description="Seconds to wait for `done` after sending `cancel`.")
    restart_backoff_max_s: float = Field(30.0, description="Cap of the session restart backoff (1, 2, 4 ... s).")
    quarantine_after: int = Field(
        2, ge=1, description="Consecutive failures (failed requests, failed session starts, sessions that "
        "died) after which a phone is quarantined: out of rotation, retried after a backoff."
    )
    quarantine_s: float = Field(
        10.0, description="Length of a first quarantine; doubled at each further failure in a row, up to "
        "quarantine_max_s. A successful request ends the series."
    )
    quarantine_max_s: float = Field(300.0, description="Cap of the quarantine backoff.")
    tokenizer_cache: str = Field(
        "~/.cache/qhx-server/tokenizers", description="Host cache of phones' tokenizer.json, keyed by sha256."
    )
    adb_timeout_s: float = Field(
        10.0, description="Socket timeout of short adb calls (device list, getprop, file pulls per read)."
    )
    device_poll_s: float = Field(1.0, description="Seconds between device-list polls of each adb server.")
    recheck_incompatible_s: float = Field(
        30.0, description="Seconds between discoveries of a phone that cannot serve (no bundle, wrong SoC), "
        "so that a bundle pushed meanwhile is served without a restart."
    )
    prefill_ms_per_token: float = Field(
        100.0,
        description="Extra wait for the first token per prompt token, on top of stall_timeout_s: phones "
        "process prompts token by token (~45 ms/token at 22 tok/s), so a long prompt is not a stall.",
    )

    # --- simulated phones ---
    sim: int = Field(
        -1, description="Start N simulated phones on a private adb server and serve from them. "
        "-1: auto, one simulated phone only when no adb server with a phone is reachable; 0: never."
    )
    sim_speed: float = Field(1.0, description="Simulated phone speed factor (0 = as fast as possible).")
    sim_precision: Literal["fp16", "w8", "both"] = Field("fp16", description="Bundles staged on simulated phones.")

    # --- queueing ---
    max_queue: int = Field(64, description="Per-model queue bound; beyond it requests get 429.")
    queue_timeout_s: float = Field(
        300.0, description="Longest a request may wait in its model's queue for a phone; then 503 "
        "(code queue_timeout)."
    )
    sse_ping_s: float = Field(15.0, description="Seconds between `: ping` SSE comments while a stream waits.")

    @field_validator("bundle_for")
    @classmethod
    def _serial_equals_bundle(cls, v: list[str]) -> list[str]:
        for entry in v:
            who, sep, bundle = entry.partition("=")
            if not sep or not who.strip() or not bundle.strip():
                raise ValueError(f"bundle_for entries are SERIAL=BUNDLE, got {entry!r}")
        return v

    def bundle_of(self, adb_server: str, serial: str) -> str | None:
        """The bundle to serve on one phone: its ``bundle_for`` entry, else ``bundle`` (None: the
        default choice, see discovery)."""
        for entry in self.bundle_for:
            who, _, bundle = entry.partition("=")
            if who.strip() in (serial, f"{adb_server}/{serial}"):
                return bundle.strip()
        return self.bundle
