"""SLO classification: an explicit hint wins, else the first matching rule, else the default."""

from __future__ import annotations

from typing import TYPE_CHECKING

from policies.config import ClassRule, PolicyConfig

if TYPE_CHECKING:
    from policies.route import JobFeatures


def _matches(rule: ClassRule, job: JobFeatures) -> bool:
    if rule.tenants and job.tenant not in rule.tenants:
        return False
    if rule.models and job.model not in rule.models:
        return False
    if rule.kinds and job.kind not in rule.kinds:
        return False
    if rule.max_prompt_tokens is not None and job.prompt_tokens > rule.max_prompt_tokens:
        return False
    if rule.min_prompt_tokens is not None and job.prompt_tokens < rule.min_prompt_tokens:
        return False
    if rule.max_output_tokens is not None and job.max_tokens > rule.max_output_tokens:
        return False
    if rule.min_output_tokens is not None and job.max_tokens < rule.min_output_tokens:
        return False
    return True


def classify(job: JobFeatures, config: PolicyConfig) -> tuple[str, str]:
    """Return ``(slo_class, reason)`` for a job.

    An unknown hint is not an error: the job is classified by the rules and the reason
    says the hint was ignored, so a typo never loses a job.
    """
    prefix = ""
    if job.slo_hint is not None:
        if job.slo_hint in config.classes:
            return job.slo_hint, "hint"
        prefix = f"unknown hint {job.slo_hint!r} ignored; "
    for i, rule in enumerate(config.rules):
        if _matches(rule, job):
            return rule.slo, f"{prefix}rule {i}"
    return config.default_class, f"{prefix}default"
