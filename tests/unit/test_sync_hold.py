"""Reconciler: the netfilter change hold (one config write on the first hint,
released by the reconcile after the re-read). Pure: fake maps, no BPF."""

import threading
from collections import namedtuple

from mirror.reasons import BY_NAME
from mirror.sync import Reconciler
from mirror.translate import Desired, NfConfig

# struct lm_config: the punt reason, hz, then the netfilter fields, fib_flags.
Leaf = namedtuple("Leaf", ["punt_forward_reason", "hz", *NfConfig.__dataclass_fields__, "fib_flags"],
                  defaults=[0] * (len(NfConfig.__dataclass_fields__) + 2))


class FakeConfig:
    Leaf = Leaf

    def __init__(self):
        self.writes = []

    def __setitem__(self, key, leaf):
        self.writes.append(leaf.punt_forward_reason)

    def __getitem__(self, key):
        return Leaf(self.writes[-1] if self.writes else 0, 250)


class FakeTable(dict):
    pass


def reconciler():
    cfg = FakeConfig()
    tables = {"routes": FakeTable(), "neighbors": FakeTable(), "links": FakeTable(), "ports": FakeTable(),
              "fdb": FakeTable(), "config": cfg}
    return Reconciler(tables, beat=lambda ttl: None, hz=250), cfg


CHANGING = BY_NAME["NETFILTER_CHANGING"]


def test_hint_writes_once_and_release_restores():
    r, cfg = reconciler()
    r.apply(Desired())
    n = len(cfg.writes)
    r.hold_forward(1)
    assert cfg.writes[n:] == [CHANGING]
    r.hold_forward(2)                       # already held: no second write
    assert cfg.writes[n:] == [CHANGING]
    r.apply(Desired())                      # a reconcile before the re-read keeps holding
    assert cfg.writes[-1] == CHANGING and r.holding
    r.release_hold(1)                       # answers only hint 1 of 2
    assert cfg.writes[-1] == CHANGING
    r.release_hold(2)
    assert cfg.writes[-1] == 0 and not r.holding


def test_translator_reason_wins_over_the_hold():
    r, cfg = reconciler()
    r.apply(Desired(punt_forward_reason=BY_NAME["NETFILTER"]))
    r.hold_forward(1)
    assert cfg.writes[-1] == BY_NAME["NETFILTER"]       # already punting: nothing to write
    r.apply(Desired())                                   # the rules went away, but not re-read yet
    assert cfg.writes[-1] == CHANGING
    r.release_hold(1)
    assert cfg.writes[-1] == 0


def test_hint_does_not_wait_for_a_running_apply():
    r, cfg = reconciler()
    with r.lock:                                          # as during a long apply()
        t = threading.Thread(target=r.hold_forward, args=(1,))
        t.start()
        t.join(2)
        assert not t.is_alive()
        assert cfg.writes[-1] == CHANGING


def test_a_pending_change_is_not_cleared_by_a_config_write():
    # The kernel switch set NETFILTER_CHANGING for a change the hint thread has not
    # handled yet: a release must not write 0 over it.
    r, cfg = reconciler()
    r.apply(Desired())
    r.hold_forward(1)
    pending = [True]
    r.hint_pending = lambda: pending[0]
    r.release_hold(1)
    assert cfg.writes[-1] == CHANGING
    pending[0] = False
    r.release_hold(1)
    assert cfg.writes[-1] == 0


def test_a_change_landing_during_the_write_is_held_again():
    r, cfg = reconciler()
    r.apply(Desired())
    r.hold_forward(1)
    answers = iter([False, True])           # not pending before the write, pending after it
    r.hint_pending = lambda: next(answers, True)
    r.release_hold(1)
    assert cfg.writes[-2:] == [0, CHANGING]


def test_a_late_switch_write_is_repaired():
    r, cfg = reconciler()
    r.apply(Desired())
    cfg.writes.append(CHANGING)             # a switch acted after the change was read and released
    assert r.repair_config() and cfg.writes[-1] == 0
    assert not r.repair_config()
    r.hold_forward(1)                       # held: the switch's value is ours
    assert not r.repair_config() and cfg.writes[-1] == CHANGING


def test_a_re_hold_for_a_false_alarm_is_lifted():
    r, cfg = reconciler()
    r.apply(Desired())
    r.hint_pending = lambda: True
    r.apply(Desired())                       # e.g. another namespace's iptables-legacy has the lock
    assert cfg.writes[-1] == CHANGING
    r.hint_pending = lambda: False           # closed again, nothing changed here
    assert r.repair_config() and cfg.writes[-1] == 0
