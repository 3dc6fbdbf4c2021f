"""Pure decision code: SLO classification, device latency models, routing and tenants' admission.

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
from policies.tenants import Admission, TenantLedger

__all__ = [
    "PROFILES",
    "Admission",
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
    "TenantLedger",
    "TenantSpec",
    "classify",
    "config_from_dict",
    "route",
]
