"""The one-time log line per unsupported object (mirror/punt_log.py) and the
words for a ROUTE_UNSUPPORTED route (translate.route_punt_why). Pure."""

import logging

from mirror import model as m
from mirror.punt_log import PuntLog
from mirror.translate import route_punt_why


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def punt_log():
    logger = logging.getLogger("test_punt_log")
    handler = Lines()
    logger.handlers = [handler]
    return PuntLog(logger), handler.lines


def test_each_object_is_logged_once_until_its_reason_changes_or_it_comes_back():
    pl, lines = punt_log()
    for _ in range(3):  # every reconcile reports the same
        pl.update("interface", {"tun0": "not an Ethernet interface"})
    assert lines == ["unsupported interface tun0: not an Ethernet interface"]
    pl.update("interface", {"tun0": "something else"})
    pl.update("interface", {})
    pl.update("interface", {"tun0": "something else"})
    assert len(lines) == 3


def test_changes_only_touch_the_objects_they_name():
    pl, lines = punt_log()
    pl.update("route", {"10.7.0.0/16": "blackhole route"})
    pl.change("route", {"10.8.0.0/16": "2 next hops (multipath)"})
    pl.change("route", {"10.8.0.0/16": "2 next hops (multipath)", "10.9.0.0/16": None})
    assert lines == ["unsupported route 10.7.0.0/16: blackhole route",
                     "unsupported route 10.8.0.0/16: 2 next hops (multipath)"]
    pl.change("route", {"10.7.0.0/16": None})
    pl.change("route", {"10.7.0.0/16": "blackhole route"})
    assert len(lines) == 3


def route(dst, **kw):
    return m.Route(table=m.TABLE_MAIN, dst=dst, dst_len=16, **kw)


def test_route_punt_why_names_the_cause():
    state = m.KernelState()
    state.set_route(route("10.7.0.0", type=6))
    assert route_punt_why(state, ("10.7.0.0", 16)) == "blackhole route"
    assert route_punt_why(state, ("10.99.0.0", 16)) is None
