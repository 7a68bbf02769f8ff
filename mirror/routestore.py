"""The model's routes by prefix, stored for a full Internet table.

A full table is a million prefixes with one route each, and those routes
differ only in their prefix: a few next hops, one table, one type.  So a
prefix with a single route stores only a shared *shape*, the route with its
prefix blanked (counted, and dropped with the last prefix using it).  The
rest (several routes for a prefix: append/prepend, other tables, metrics or
TOS; and those the owner asks to keep listed) keep their list.  Reading a prefix gives full Route objects back.

Per prefix that leaves the key and one dict slot: about 200 bytes instead
of 360 (a Route object and a list each).
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
        self._by_prefix: Dict[Prefix, object] = {}  # a shape (a Route), or a list of Routes
        self._shapes: Dict[tuple, list] = {}  # shape key -> [shape, prefixes using it]
        self._listed = set()  # the prefixes stored as a list: scans visit them and the shapes

    # -- reading -------------------------------------------------------------
    def get(self, prefix: Prefix, default=None) -> Optional[List]:
        value = self._by_prefix.get(prefix)
        if value is None:
            return default
        return value if type(value) is list else [value.at(*prefix)]

    def __getitem__(self, prefix: Prefix) -> List:
        routes = self.get(prefix)
        if routes is None:
            raise KeyError(prefix)
        return routes

    def shape(self, prefix: Prefix):
        """The prefix's one route with its prefix blanked, shared by every
        prefix whose only route is equal but for it; None if the prefix is
        stored as a list (several routes, or kept listed) or absent."""
        value = self._by_prefix.get(prefix)
        return None if value is None or type(value) is list else value

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
            yield prefix, value if type(value) is list else [value.at(*prefix)]

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
            out += [p for p, value in self._by_prefix.items() if id(value) in passing]
        return out

    def first(self, test: Callable):
        """A route passing test(route) (a whole one, prefix filled in); None
        if none does."""
        for prefix in self._listed:
            for route in self._by_prefix[prefix]:
                if test(route):
                    return route
        shapes = {id(shape) for shape, _ in self._shapes.values() if test(shape)}
        if shapes:
            return next(v.at(*p) for p, v in self._by_prefix.items() if id(v) in shapes)
        return None

    # -- writing ---------------------------------------------------------------
    def __setitem__(self, prefix: Prefix, routes: List):
        if not routes:
            raise ValueError("an empty route list: delete the prefix")
        self._release(prefix, self._by_prefix.get(prefix))
        if len(routes) == 1 and not self._keep_listed(routes[0]):
            self._by_prefix[prefix] = self._acquire(routes[0])
        else:
            self._by_prefix[prefix] = list(routes)
            self._listed.add(prefix)

    def add_new(self, prefix: Prefix, route) -> None:
        """Store the first route of a prefix not stored yet (dumps)."""
        if self._keep_listed(route):
            self._by_prefix[prefix] = [route]
            self._listed.add(prefix)
        else:
            self._by_prefix[prefix] = self._acquire(route)

    def load(self, pairs, other: Callable) -> List[Tuple[object, int]]:
        """Store the (prefix, route) pairs of a dump, the first route of each
        prefix here and the rest by other(prefix, route).  The route's own
        prefix is not looked at: the decoder shares one route object among
        the prefixes whose messages differ only in it, so a route object
        seen before costs one lookup.  Returns each route stored here with
        the number of prefixes it was stored for."""
        by_prefix = self._by_prefix
        counts = {}  # id(route) -> [route, prefixes]: holds the routes, so their ids stay theirs
        uses = {}  # id(route) -> its shape's [shape, prefixes using it]; forgotten after other(),
        #            which may have dropped a shape
        for prefix, route in pairs:
            used = uses.get(id(route))
            if prefix in by_prefix or (used is None and self._keep_listed(route)):
                other(prefix, route)
                uses.clear()
                continue
            if used is None:
                used = uses[id(route)] = self._use(route)
            by_prefix[prefix] = used[0]
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
        key = _shape_key(value)
        used = self._shapes[key]
        used[1] -= 1
        if not used[1]:
            del self._shapes[key]
