"""The model's routes by prefix, stored for a full Internet table.

A full table is a million prefixes with one route each, and those routes
differ only in their prefix: a few next hops, one table, one type.  So a
prefix stores only shared *shapes*, routes with their prefix blanked
(counted, and dropped with the last prefix using them): one shape, or a
tuple of them for several routes (append/prepend, other tables, metrics,
TOS).  Routes the owner asks to keep listed (and prefixes with one) keep
a list of whole routes.  Reading a prefix gives whole Route objects back.

Per prefix that leaves the key and one dict slot: about 200 bytes instead
of 360 (a Route object and a list each).  Scans test each shape once, so
their cost follows the kinds of routes, not their number.
"""

from typing import Callable, Dict, Iterator, List, Optional, Tuple

Prefix = Tuple[str, int]


def _shape_key(route) -> tuple:
    """Routes with equal keys are equal but for their prefix.  Next hops by
    identity: the decoder shares equal tuples, and a shape keeps its tuple
    alive, so the id is not reused while the key is in use."""
    return (route.table, route.type, route.tos, route.priority, id(route.nexthops), route.mtu, route.nhid,
            route.unsupported)


class RouteStore:
    """prefix -> [routes for it, in the kernel's order], dict-like.  A list
    read from it may be the stored one: change it only to store it back."""

    def __init__(self, keep_listed: Callable = lambda route: False):
        self._keep_listed = keep_listed  # routes never stored as a shape
        self._by_prefix: Dict[Prefix, object] = {}  # a shape, a tuple of shapes, or a list of Routes
        self._shapes: Dict[tuple, list] = {}  # shape key -> [shape, uses]
        self._listed = set()  # the prefixes stored as a list: scans visit them and the shapes

    # -- reading -------------------------------------------------------------
    def get(self, prefix: Prefix, default=None) -> Optional[List]:
        value = self._by_prefix.get(prefix)
        if value is None:
            return default
        return _routes(prefix, value)

    def __getitem__(self, prefix: Prefix) -> List:
        routes = self.get(prefix)
        if routes is None:
            raise KeyError(prefix)
        return routes

    def shapes(self, prefix: Prefix) -> Optional[tuple]:
        """The prefix's routes with their prefix blanked (shared objects, in
        order); None if the prefix has a route kept listed, or none."""
        value = self._by_prefix.get(prefix)
        return None if value is None or type(value) is list else _shapes_of(value)

    def __contains__(self, prefix) -> bool:
        return prefix in self._by_prefix

    def __iter__(self) -> Iterator[Prefix]:
        return iter(self._by_prefix)

    def __len__(self) -> int:
        return len(self._by_prefix)

    def __bool__(self) -> bool:
        return bool(self._by_prefix)

    def items(self):
        for prefix, value in self._by_prefix.items():
            yield prefix, _routes(prefix, value)

    def values(self):
        for _, routes in self.items():
            yield routes

    def where(self, test: Callable) -> List[Prefix]:
        """The prefixes with a route passing test(route).  A shape is tested
        once, whatever its prefix (so test must not look at the prefix), and
        the whole table is only walked if a shape passes."""
        out = [p for p in self._listed if any(test(r) for r in self._by_prefix[p])]
        passing = {id(shape) for shape, _ in self._shapes.values() if test(shape)}
        if passing:
            out += [p for p, value in self._by_prefix.items() if _uses_any(value, passing)]
        return out

    def first(self, test: Callable):
        """A route passing test(route) (a whole one, prefix filled in); None
        if none does."""
        for prefix in self._listed:
            for route in self._by_prefix[prefix]:
                if test(route):
                    return route
        passing = {id(shape) for shape, _ in self._shapes.values() if test(shape)}
        if passing:
            prefix, value = next((p, v) for p, v in self._by_prefix.items() if _uses_any(v, passing))
            return next(shape.at(*prefix) for shape in _shapes_of(value) if id(shape) in passing)
        return None

    # -- writing ---------------------------------------------------------------
    def __setitem__(self, prefix: Prefix, routes: List):
        if not routes:
            raise ValueError("an empty route list: delete the prefix")
        self._release(prefix, self._by_prefix.get(prefix))
        if any(self._keep_listed(r) for r in routes):
            self._by_prefix[prefix] = list(routes)
            self._listed.add(prefix)
        elif len(routes) == 1:
            self._by_prefix[prefix] = self._acquire(routes[0])
        else:
            self._by_prefix[prefix] = tuple(self._acquire(r) for r in routes)

    def add_new(self, prefix: Prefix, route) -> None:
        """Store the first route of a prefix not stored yet (dumps)."""
        if self._keep_listed(route):
            self._by_prefix[prefix] = [route]
            self._listed.add(prefix)
        else:
            self._by_prefix[prefix] = self._acquire(route)

    def load(self, pairs, other: Callable) -> List[Tuple[object, int]]:
        """Store the (prefix, route) pairs of a dump: here a prefix's first
        route, and routes of another key than those before (another table,
        metric or TOS: appended, as set_route would); the rest by
        other(prefix, route).  The route's own prefix is not looked at: the
        decoder shares one route object among the prefixes whose messages
        differ only in it, so a route object seen before costs one lookup.
        Returns each route stored here with the number of prefixes it was
        stored for."""
        by_prefix = self._by_prefix
        counts = {}  # id(route) -> [route, prefixes]: holds the routes, so their ids stay theirs
        uses = {}  # id(route) -> its shape's [shape, prefixes using it]; forgotten after other(),
        #            which may have dropped a shape
        for prefix, route in pairs:
            used = uses.get(id(route))
            if used is None and self._keep_listed(route):
                other(prefix, route)
                uses.clear()
                continue
            stored = by_prefix.get(prefix)
            if stored is not None and not _appends(stored, route):
                other(prefix, route)
                uses.clear()
                continue
            if used is None:
                used = uses[id(route)] = self._use(route)
            by_prefix[prefix] = used[0] if stored is None else _shapes_of(stored) + (used[0],)
            used[1] += 1
            counted = counts.get(id(route))
            if counted is None:
                counted = counts[id(route)] = [route, 0]
            counted[1] += 1
        return [(route, n) for route, n in counts.values()]

    def __delitem__(self, prefix: Prefix):
        self._release(prefix, self._by_prefix.pop(prefix))

    def _acquire(self, route):
        used = self._use(route)
        used[1] += 1
        return used[0]

    def _use(self, route) -> list:
        """[the shape for this route, prefixes using it]."""
        key = _shape_key(route)
        used = self._shapes.get(key)
        if used is None:
            used = self._shapes[key] = [route.at("", 0), 0]
        return used

    def _release(self, prefix: Prefix, value) -> None:
        if value is None:
            return
        if type(value) is list:
            self._listed.discard(prefix)
            return
        for shape in _shapes_of(value):
            key = _shape_key(shape)
            used = self._shapes[key]
            used[1] -= 1
            if not used[1]:
                del self._shapes[key]


def _routes(prefix: Prefix, value) -> List:
    """A stored value as the prefix's routes."""
    if type(value) is list:
        return value
    if type(value) is tuple:
        return [shape.at(*prefix) for shape in value]
    return [value.at(*prefix)]


def _shapes_of(value) -> tuple:
    """The shapes in a stored value that is not a list."""
    return value if type(value) is tuple else (value,)


def _appends(value, route) -> bool:
    """Whether set_route would append the route to a stored value of shapes:
    no route of the same key (the prefix aside) is there."""
    if type(value) is list:
        return False
    key = (route.table, route.tos, route.priority)
    return all((shape.table, shape.tos, shape.priority) != key for shape in _shapes_of(value))


def _uses_any(value, shape_ids) -> bool:
    if type(value) is tuple:
        return any(id(shape) in shape_ids for shape in value)
    return id(value) in shape_ids
