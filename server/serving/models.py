"""The model registry: which models are served, and their host tokenizers.

Models come from the backend (``Backend.models()``: derived from the bundles on ready phones), so the
list follows the phones. A model's tokenizer is the bundle's tokenizer.json, loaded lazily on first
use (in a worker thread: ~3 s for Qwen3.5) and cached by its sha256, so phones with the same bundle
share one tokenizer and a changed bundle gets a fresh one.

Name matching: exact first; otherwise a case-insensitive match when it is unambiguous
(``Qwen3.5-0.8B`` finds ``qwen3.5-0.8b``), since model ids are lower case here while HF spells them
with capitals. Responses always carry the served (canonical) name.
"""

from __future__ import annotations

import asyncio
import logging
import time

from server.backends.base import Backend, ModelInfo
from server.errors import ModelNotFound, NoPhoneAvailable, QhxError
from server.serving.protocol import ModelCard
from server.serving.tokens import HostTokenizer

logger = logging.getLogger(__name__)


def _announce(info: ModelInfo) -> None:
    if info.simulated:
        logger.warning(
            "serving model %s from SIMULATED phones (%s): its tokens are simulated, not the model's "
            "(/v1/models says \"simulated\": true)", info.name, ", ".join(info.phones),
        )
    else:
        logger.info("serving model %s (%s, context %d) on %s", info.name, info.precision, info.max_context,
                    ", ".join(info.phones))


class ModelRegistry:
    """Served models by name, and one :class:`HostTokenizer` per distinct tokenizer.json."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._tokenizers: dict[str, asyncio.Task[HostTokenizer]] = {}  # sha256 -> loading/loaded
        self._first_seen: dict[str, int] = {}

    def models(self) -> list[ModelInfo]:
        found = self._backend.models()
        for info in found:
            if info.name not in self._first_seen:
                self._first_seen[info.name] = int(time.time())
                _announce(info)
        return found

    def resolve(self, name: str) -> ModelInfo:
        """The served model called ``name``; :class:`NoPhoneAvailable` (503) for a model served
        earlier that no phone serves now; :class:`ModelNotFound` (404) for a name never served."""
        models = self.models()
        for info in models:
            if info.name == name:
                return info
        folded = [info for info in models if info.name.casefold() == name.casefold()]
        if len(folded) == 1:
            return folded[0]
        if name.casefold() in {seen.casefold() for seen in self._first_seen}:
            # served before, no phone now (unplugged, adb server gone): temporary, its phones may come back
            raise NoPhoneAvailable(f"No phone serves `{name}` right now (unplugged or adb server gone); "
                                   "retry later.")
        served = ", ".join(sorted(info.name for info in models)) or "none (no phone is ready)"
        raise ModelNotFound(f"The model `{name}` does not exist. Served models: {served}.", param="model")

    def card(self, info: ModelInfo) -> ModelCard:
        return ModelCard(
            id=info.name,
            created=self._first_seen.get(info.name, int(time.time())),
            max_model_len=info.max_context,
            context_length=info.max_context,
            precision=info.precision,
            phones=list(info.phones),
            simulated=info.simulated,
        )

    async def tokenizer(self, info: ModelInfo) -> HostTokenizer:
        """The model's tokenizer, loaded once per sha256 (concurrent callers share the load)."""
        key = info.tokenizer_sha256 or info.tokenizer_path
        task = self._tokenizers.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(info), name=f"tokenizer-{key[:12]}")
            self._tokenizers[key] = task
        try:
            return await asyncio.shield(task)  # one caller giving up must not cancel the shared load
        except Exception:
            if self._tokenizers.get(key) is task and task.done():
                del self._tokenizers[key]  # let the next request try again
            raise

    async def _load(self, info: ModelInfo) -> HostTokenizer:
        if not info.tokenizer_path:
            raise QhxError(f"No tokenizer is known for model `{info.name}`.")
        t0 = time.monotonic()
        try:
            tok = await asyncio.to_thread(HostTokenizer.from_file, info.tokenizer_path)
        except Exception as exc:
            logger.error("model %s: cannot load tokenizer %s: %s", info.name, info.tokenizer_path, exc)
            raise QhxError(f"The tokenizer of model `{info.name}` could not be loaded.") from exc
        logger.info("model %s: tokenizer %s (sha256 %s) loaded in %.1f s", info.name, info.tokenizer_path,
                    info.tokenizer_sha256[:12], time.monotonic() - t0)
        return tok

    async def keep_warm(self, interval_s: float = 1.0) -> None:
        """Load the tokenizer of every model as soon as a phone serves it, so that no request pays
        the load (run in the background for the app's lifetime; phones come and go)."""
        failed: set[str] = set()  # tried once here; requests still retry them
        while True:
            for info in self.models():
                key = info.tokenizer_sha256 or info.tokenizer_path
                if key and key not in self._tokenizers and key not in failed:
                    try:
                        await self.tokenizer(info)
                    except QhxError:
                        failed.add(key)
            await asyncio.sleep(interval_s)

    async def aclose(self) -> None:
        for task in self._tokenizers.values():
            task.cancel()
        await asyncio.gather(*self._tokenizers.values(), return_exceptions=True)
