"""/v1/models, /health, /ready, /v1/devices."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.api.live_server import LiveServer


def test_models_list_through_the_client(live: LiveServer) -> None:
    models = live.client().models.list().data
    assert [m.id for m in models] == [live.model]
    m = models[0]
    assert m.object == "model" and m.owned_by == "qhx-server" and m.created > 0
    extra = m.model_extra or {}
    assert extra["max_model_len"] == extra["context_length"] == 1024
    assert extra["precision"] == "fp16" and len(extra["phones"]) == 1
    assert extra["simulated"] is True  # SimLab phones say so (ro.qhx.simulated)


def test_model_retrieve(live: LiveServer) -> None:
    assert live.client().models.retrieve(live.model).id == live.model
    with pytest.raises(openai.NotFoundError):
        live.client().models.retrieve("nope")


def test_health_ready_devices(live: LiveServer) -> None:
    assert httpx.get(live.base_url + "/health").json() == {"status": "ok"}
    ready = httpx.get(live.base_url + "/ready")
    assert ready.status_code == 200 and ready.json()["phones_ready"] == 1
    (phone,) = live.devices()
    assert phone["state"] == "ready" and phone["model"] == live.model and phone["serial"] == live.phone.serial
