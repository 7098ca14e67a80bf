"""Starting a phone's runtime: session protocol or one-shot, and the launch command (rendered here only).

``device_mode`` picks the runtime: ``session``, ``oneshot``, or ``auto``, which tries the session and
falls back to one-shot for this phone, for good (logged once), when the runtime does not answer the
session start with ``ready``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from tokenizers import Tokenizer

from server.backends.adb.discovery import Bundle, PhoneFacts
from server.backends.adb.oneshot import OneShot
from server.backends.adb.quoting import render_launch
from server.backends.adb.retokenize import shared_tokenizer
from server.backends.adb.reuse import TokenBytes
from server.backends.adb.runtime import Runtime
from server.backends.adb.session import Session, SessionUnsupported
from server.backends.adb.transport import AdbServerClient
from server.backends.base import ModelInfo
from server.errors import BackendError, PhoneLost
from server.settings import Settings

logger = logging.getLogger(__name__)


class Launcher:
    """Starts the runtime of one phone (see the module docstring)."""

    def __init__(self, client: AdbServerClient, serial: str, settings: Settings, *, name: str) -> None:
        self.serial = serial
        self._client = client
        self._settings = settings
        self._name = name  # how logs name the phone
        self._oneshot = settings.device_mode == "oneshot"
        self._fallback_logged = False

    def command(self, bundle: Bundle, prompt: str, max_new: int) -> str:
        """The phone shell command that runs ``bundle`` (``settings.launch_command``, values quoted)."""
        return render_launch(
            self._settings.launch_command,
            root=self._settings.device_root,
            manifest=bundle.manifest_path,
            artifacts=bundle.name,
            max_new=max_new,
            prompt=prompt,
        )

    def reset(self) -> None:
        """Forget a fallback to one-shot (the phone was stopped: try the session again next time)."""
        self._oneshot = self._settings.device_mode == "oneshot"

    async def start(self, facts: PhoneFacts) -> Runtime:
        """A started runtime for the bundle of ``facts``; raises BackendError (or AdbError/OSError)."""
        bundle = facts.bundle
        assert bundle is not None
        if not self._oneshot:
            try:
                return await self._start_session(bundle, facts)
            except SessionUnsupported as e:
                self._fall_back(e)
        return await self._start_oneshot(bundle, facts)

    async def _start_session(self, bundle: Bundle, facts: PhoneFacts) -> Runtime:
        command = self.command(bundle, "-", self._settings.session_max_new)
        if self._settings.state_reuse == "on":  # the tokenizer loads while the phone loads its model
            text, session = await asyncio.gather(
                self._token_text(facts.model), Session.start(self._client, self.serial, command, self._settings)
            )
            session.use_token_text(text)
        else:
            session = await Session.start(self._client, self.serial, command, self._settings)
        self._check_ready(session.ready, facts)
        return session

    async def _start_oneshot(self, bundle: Bundle, facts: PhoneFacts) -> Runtime:
        def command(prompt: str, max_new: int) -> str:
            return self.command(bundle, prompt, max_new)

        assert facts.model is not None
        return OneShot(self._client, self.serial, self._settings, command, await self._load_tokenizer(facts.model))

    async def _load_tokenizer(self, model: ModelInfo) -> Tokenizer:
        """The bundle's tokenizer (one per process and bundle, shared by its phones), in a worker thread."""
        return (await self._load(model))[0]

    async def _token_text(self, model: ModelInfo | None) -> TokenBytes | None:
        """The bundle's token -> bytes, with which a session tells a text-identical state
        (server/backends/adb/reuse.py); None (id-prefix reuse only) when the tokenizer cannot load."""
        if model is None:
            return None
        try:
            return (await self._load(model))[1]
        except BackendError as e:
            logger.warning("%s: %s; state reuse matches token ids only", self._name, e)
            return None

    async def _load(self, model: ModelInfo) -> tuple[Tokenizer, TokenBytes | None]:
        path = model.tokenizer_path
        try:
            return await asyncio.to_thread(shared_tokenizer, path)
        except Exception as e:  # tokenizers raises a bare Exception for a missing or broken file
            raise BackendError(f"{self.serial}: cannot load the bundle's tokenizer {path}: {e}") from e

    def _fall_back(self, why: SessionUnsupported) -> None:
        if self._settings.device_mode != "auto":
            raise PhoneLost(f"{self.serial}: device_mode=session but {why}") from why
        if not self._fallback_logged:
            logger.warning("%s: no session protocol (%s); using one-shot mode for this phone", self._name, why)
            self._fallback_logged = True
        self._oneshot = True

    def _check_ready(self, ready: dict[str, Any], facts: PhoneFacts) -> None:
        model = facts.model
        if model is None:
            return
        if ready.get("max_context") not in (None, model.max_context) and self._settings.max_context is None:
            logger.warning(
                "%s: runtime says max_context %s, manifest name says %d; using %d",
                self._name,
                ready.get("max_context"),
                model.max_context,
                model.max_context,
            )
