"""Load-balancing strategies: each picks one instance from a non-empty list."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence

from ollama_pool._instance import Instance

STRATEGIES = ("round_robin", "random", "least_active", "power_of_two", "peak_ewma")


class Balancer:
    """Picks instances by the named strategy.

    Callers hold the pool lock, so the rotation counter needs no lock of its own.
    """

    def __init__(self, strategy: str, rng: random.Random | None = None):
        if strategy not in STRATEGIES:
            raise ValueError(
                f"unknown load-balancing strategy {strategy!r}; "
                f"choose one of {', '.join(STRATEGIES)}"
            )
        self.strategy = strategy
        self._rng = rng or random.Random()
        self._rotation = itertools.count()
        pickers: dict[str, Callable[[Sequence[Instance]], Instance]] = {
            "round_robin": self._round_robin,
            "random": self._random,
            "least_active": self._least_active,
            "power_of_two": self._power_of_two,
            "peak_ewma": self._peak_ewma,
        }
        self.pick = pickers[strategy]

    def _round_robin(self, instances: Sequence[Instance]) -> Instance:
        return instances[next(self._rotation) % len(instances)]

    def _random(self, instances: Sequence[Instance]) -> Instance:
        return self._rng.choice(instances)

    def _rotated(self, instances: Sequence[Instance]) -> list[Instance]:
        # Scanning from a rotating start makes ties go to each instance in turn,
        # where a scan from the first instance would pile every tie onto it.
        start = next(self._rotation) % len(instances)
        return [*instances[start:], *instances[:start]]

    def _least_active(self, instances: Sequence[Instance]) -> Instance:
        return min(self._rotated(instances), key=lambda instance: instance.in_flight)

    def _power_of_two(self, instances: Sequence[Instance]) -> Instance:
        if len(instances) == 1:
            return instances[0]
        first, second = self._rng.sample(list(instances), 2)
        return second if second.in_flight < first.in_flight else first

    def _peak_ewma(self, instances: Sequence[Instance]) -> Instance:
        # Cost is the expected wait: observed latency times the requests that
        # would be in flight. An instance without samples is tried first.
        def cost(instance: Instance) -> float:
            if instance.latency_ewma is None:
                return -1.0 / (instance.in_flight + 1)
            return instance.latency_ewma * (instance.in_flight + 1)

        return min(self._rotated(instances), key=cost)
