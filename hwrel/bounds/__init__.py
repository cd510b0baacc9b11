"""Certified bounds on the output error of a faulty network (see :mod:`hwrel.bounds.api`)."""
from hwrel.bounds.api import METHODS, Analyzer, BoundResult, fep, fep_table
from hwrel.bounds.faults import FaultModel

__all__ = ["METHODS", "Analyzer", "BoundResult", "FaultModel", "fep", "fep_table"]
