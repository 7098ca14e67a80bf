"""What a request means on phones in one-shot mode (docs/api.md, "One-shot mode").

The one-shot CLI (device-protocol.md section 2) takes a prompt and ``max_new`` only: it decodes
greedily, so temperature, top_p, top_k, seed and repetition_penalty cannot reach it. Such a request
is served (clients send sampling parameters by default: LangChain's temperature is 0.7) and says
what was ignored: :func:`check_oneshot` gives the names for the ``X-QHX-Ignored-Params`` response
header when every phone of the model runs one-shot, and refuses ``n`` > 1 with sampling there (the
choices would all be the same greedy text); the one-shot runtime, which owns the rule
(:func:`~server.backends.adb.oneshot.ignored_params`), logs a warning for every generation it ran with
parameters it ignored (which also covers fleets where only some phones run one-shot).
"""

from __future__ import annotations

from server.backends.adb.oneshot import ignored_params
from server.backends.base import Backend, GenerationParams, PhoneState
from server.errors import UnsupportedParameter

__all__ = ["IGNORED_HEADER", "check_oneshot", "ignored_header", "ignored_params", "serves_oneshot_only"]

IGNORED_HEADER = "X-QHX-Ignored-Params"

_SERVING = (PhoneState.READY, PhoneState.BUSY)


def ignored_header(ignored: list[str]) -> dict[str, str]:
    """The response header naming the ignored parameters (none when nothing is ignored)."""
    return {IGNORED_HEADER: ",".join(ignored)} if ignored else {}


def serves_oneshot_only(backend: Backend, model: str) -> bool:
    """Every phone serving ``model`` right now runs one-shot (and there is one)."""
    modes = {h.mode for h in backend.health() if h.model == model and h.state in _SERVING}
    return modes == {"oneshot"}


def check_oneshot(backend: Backend, params: GenerationParams, n: int) -> list[str]:
    """The parameters the response must say were ignored: ``[]`` unless every phone of the model runs
    one-shot. There, ``n`` > 1 with sampling is a 400 (``n`` identical greedy choices are not ``n``
    samples); with temperature 0 it is served (identical choices are what greedy asks for)."""
    if not serves_oneshot_only(backend, params.model):
        return []
    ignored = ignored_params(params)
    if n > 1 and "temperature" in ignored:
        raise UnsupportedParameter(
            f"n > 1 with sampling is not supported: the phones serving {params.model} run the one-shot CLI, "
            "which decodes greedily, so every choice would be the same text. Send n = 1, or temperature 0 "
            "for identical choices.",
            param="n",
        )
    return ignored
