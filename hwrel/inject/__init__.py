"""Fault injection: exact, batched faulty forwards (:mod:`hwrel.inject.engine`) of fault
configurations (:mod:`hwrel.inject.faults`). Campaigns, storage and statistics build on these."""
from hwrel.inject.engine import Injector, inject
from hwrel.inject.faults import Fault, as_config

__all__ = ["Fault", "Injector", "inject", "as_config"]


class _CallableModule(type(__import__("sys"))):
    """``hwrel.inject`` is this package and the function :func:`inject`: calling it calls the function."""

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        return inject(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
