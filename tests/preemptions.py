"""Watch a running engine's scheduler for preemptions (tests of small KV pools)."""
from __future__ import annotations


def record_preemptions(coordinator) -> list[str]:
    """The ids of the sequences ``coordinator``'s scheduler preempts from now on, in order (the
    list fills as steps run)."""
    schedule, preempted = coordinator.scheduler.schedule, []

    def recording_schedule():
        out = schedule()
        preempted.extend(r.request_id for r in out.preempted)
        return out

    coordinator.scheduler.schedule = recording_schedule
    return preempted
