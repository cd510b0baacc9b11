"""Fault injection: exact, batched faulty forwards (:mod:`hwrel.inject.engine`) of fault
configurations (:mod:`hwrel.inject.faults`). Campaigns, storage and statistics build on these."""
from hwrel.inject.engine import Injector, inject
from hwrel.inject.faults import Fault, as_config

__all__ = ["Fault", "Injector", "inject", "as_config"]
