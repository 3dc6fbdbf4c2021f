"""Evaluation beside the live policy: the discrete-event simulator, workloads, misbelief scenarios,
baseline routers and the offline upper bound. Pure like ``policies`` (virtual clock, seeded
randomness); never a live router (the live config admits only ``policies.config.LIVE_ROUTERS``)."""
