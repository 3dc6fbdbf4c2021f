"""Pure decision code: SLO classification, device latency models and routing.

Nothing in this package performs I/O, reads a clock or uses global randomness: time,
randomness and a snapshot of the pools come in as arguments. That is what lets the same
code run live (``broker``/``workers``) and in a simulator on a virtual clock. Imports
flow one way: ``broker`` and ``workers`` import ``policies``, never the reverse.
"""

from policies.classify import classify
from policies.config import (
    ClassRule,
    PolicyConfig,
    PoolSpec,
    SLOClass,
    TenantSpec,
    config_from_dict,
)
from policies.profiles import PROFILES, DeviceProfile, ModelProfile
from policies.route import Decision, JobFeatures, PoolState, Snapshot, route

__all__ = [
    "PROFILES",
    "ClassRule",
    "Decision",
    "DeviceProfile",
    "JobFeatures",
    "ModelProfile",
    "PolicyConfig",
    "PoolSpec",
    "PoolState",
    "SLOClass",
    "Snapshot",
    "TenantSpec",
    "classify",
    "config_from_dict",
    "route",
]
