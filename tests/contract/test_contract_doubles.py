"""The Backend contract (backend_contract.py) for the in-process doubles the unit tests stand on: a
double that breaks the contract would let those tests pass against behaviour no phone has."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from server.backends.base import Backend, PhoneState
from server.scheduling.pool import PoolPhone
from tests.contract.backend_contract import BackendContract
from tests.scheduling.pool_doubles import DoublePhone, make_pool
from tests.serving.inprocess_phone_double import InProcessPhoneDouble


async def _made(backend: Backend) -> Backend:
    return backend


class TestInProcessPhoneDoubleContract(BackendContract):
    """tests/serving/inprocess_phone_double.py (the serving layer's unit tests)."""

    lists_models = False  # it serves whatever model it is asked for and lists none
    closes_phones = False

    @staticmethod
    def make() -> Backend:
        return InProcessPhoneDouble(list(range(100, 400)), done_after_cancel_s=0.0)

    @pytest.fixture
    def backend(self) -> Backend:
        return self.make()

    @pytest.fixture
    def fresh_backend(self) -> Callable[[], Awaitable[Backend]]:
        return lambda: _made(self.make())


class TestDoublePhoneContract(BackendContract):
    """tests/scheduling/pool_doubles.py's phone (the pool's unit tests)."""

    model = "m"
    closes_phones = False

    @pytest.fixture
    def backend(self) -> Backend:
        return DoublePhone("p0")

    @pytest.fixture
    def fresh_backend(self) -> Callable[[], Awaitable[Backend]]:
        return lambda: _made(DoublePhone("p0"))


def test_the_pool_double_answers_everything_the_pool_asks_of_a_phone() -> None:
    """``PoolPhone`` (server/scheduling/pool.py) is what the pool reads of a phone; mypy holds Phone to
    it, this holds the double to it (tests are not type-checked), with what routing reads working."""
    asked = [name for name in vars(PoolPhone) if not name.startswith("_")]
    assert {"state", "model", "generate", "cancel", "health", "reusable", "prefill_ms_per_token"} <= set(asked)
    phone = DoublePhone("p0", holds=[[1, 2], [1, 2, 3, 4]], prefill_ms_per_token=31.0)
    assert all(hasattr(phone, name) for name in asked)
    assert phone.state is PhoneState.READY and phone.prefill_ms_per_token == 31.0
    assert [phone.reusable(p) for p in ([1, 2, 3, 4, 5], [1, 2, 9], [9], [])] == [4, 2, 0, 0]


class TestPoolOverDoublePhonesContract(BackendContract):
    """PhonePool over two DoublePhones, as the pool's unit tests build it."""

    model = "m"
    closes_phones = False

    @pytest.fixture
    def backend(self) -> Backend:
        return make_pool(2)[0]

    @pytest.fixture
    def fresh_backend(self) -> Callable[[], Awaitable[Backend]]:
        return lambda: _made(make_pool(2)[0])
