"""A stop that gdbext drove is recognised by what fired, never by RIP alone (issue 17)."""

from gdbext.core import runto
from gdbext.core.runto import StopFacts, classify_stop, foreign_stop_text

PLANTED = 0x3D600000


def test_planted_breakpoint_firing_at_rip_is_the_stop():
    assert classify_stop(StopFacts(PLANTED, planted_fired=(PLANTED,))) == runto.STOP_PLANTED


def test_sigint_at_a_planted_address_is_not_a_hit():
    # The stray stop a slow stub reports: SIGINT while RIP is still the breakpoint left.
    facts = StopFacts(PLANTED, signal="SIGINT")
    assert classify_stop(facts) == runto.STOP_FOREIGN
    text = foreign_stop_text(facts, "__high_start")
    assert "signal SIGINT" in text and "__high_start" in text and f"{PLANTED:#x}" in text


def test_the_waits_own_interrupt_is_a_timeout_only_if_it_stopped_the_guest():
    assert classify_stop(StopFacts(0x1000, signal="SIGINT", timer_fired=True)) \
        == runto.STOP_TIMEOUT
    # The timer fired but a breakpoint the user set is what the event names.
    facts = StopFacts(0x1000, other_fired=(3,), signal=None, timer_fired=True)
    assert classify_stop(facts) == runto.STOP_FOREIGN
    assert "breakpoint 3" in foreign_stop_text(facts, "x")
    # A planted hit wins over a timer that fired a moment too late.
    assert classify_stop(StopFacts(PLANTED, planted_fired=(PLANTED,), signal="SIGINT",
                                   timer_fired=True)) == runto.STOP_PLANTED


def test_a_planted_breakpoint_named_at_another_address_is_not_the_stop():
    facts = StopFacts(PLANTED + 1, planted_fired=(PLANTED,))
    assert classify_stop(facts) == runto.STOP_FOREIGN


def test_no_event_is_named():
    facts = StopFacts(0x2000, had_event=False)
    assert classify_stop(facts) == runto.STOP_FOREIGN
    assert "no stop event" in foreign_stop_text(facts, "y")


def test_a_fault_handler_breakpoint_firing_is_a_crash():
    handler = 0x3F05983C
    assert classify_stop(StopFacts(handler, fault_fired=(handler,))) == runto.STOP_FAULT
    # Even when the timer fired a moment too late, and a planted one is named too.
    assert classify_stop(StopFacts(handler, planted_fired=(handler,), fault_fired=(handler,),
                                   signal="SIGINT", timer_fired=True)) == runto.STOP_FAULT
    # A fault breakpoint named at another address than RIP is not the stop.
    assert classify_stop(StopFacts(handler + 4, fault_fired=(handler,))) == runto.STOP_FOREIGN
