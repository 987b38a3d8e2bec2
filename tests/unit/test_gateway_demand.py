"""TrainerDemand: StreamBatches credits outstanding and the time the trainer waited."""

from services.gateway.trajectory.demand import TrainerDemand


def test_waiting_adds_up_while_any_credit_is_outstanding() -> None:
    now = [0.0]
    demand = TrainerDemand(clock=lambda: now[0])
    assert demand.waited_seconds() == 0.0 and demand.outstanding == 0
    demand.asked(1)
    now[0] = 2.0
    assert demand.waited_seconds() == 2.0  # still waiting: counts up to now
    demand.asked(1)  # a second stream (or a second credit) while the first waits
    now[0] = 3.0
    demand.answered()
    assert demand.outstanding == 1 and demand.waited_seconds() == 3.0
    now[0] = 4.0
    demand.answered()
    now[0] = 10.0  # nothing outstanding: no waiting
    assert demand.outstanding == 0 and demand.waited_seconds() == 4.0
    demand.asked(0)
    demand.answered(5)  # withdrawn with nothing outstanding: nothing changes
    assert demand.outstanding == 0 and demand.waited_seconds() == 4.0
    demand.asked(3)
    now[0] = 11.0
    demand.answered(3)  # a stream ends with its credits unanswered
    assert demand.outstanding == 0 and demand.waited_seconds() == 5.0
