"""The one table of solvers: name -> sampling function, NFE formula, recommended schedule."""

import dataclasses
import inspect
from collections.abc import Callable

#----------------------------------------------------------------------------
# One entry of the registry. `nfe(num_steps, **options)` counts the network
# calls of a run without AFS; AFS always saves exactly the first call.


@dataclasses.dataclass(frozen=True)
class SolverInfo:
    name: str
    fn: Callable
    nfe: Callable[..., int]
    schedule: tuple  # recommended (schedule_type, schedule_rho)
    stochastic: Callable[..., bool]  # stochastic(**options) -> bool

    @property
    def options(self) -> dict:
        """The solver's own options and their defaults, read off its signature."""
        skip = {'net', 'x', 'sigmas', 'extra_args', 'callback', 'randn_like', 'afs'}
        params = inspect.signature(self.fn).parameters.values()
        return {p.name: p.default for p in params if p.name not in skip and p.kind == p.KEYWORD_ONLY}


SOLVERS: dict[str, SolverInfo] = {}


def register(name, *, nfe, schedule=('polynomial', 7), stochastic=False):
    """Decorator: add a sampling function to SOLVERS under `name`."""
    is_stochastic = stochastic if callable(stochastic) else (lambda **options: stochastic)

    def decorator(fn):
        SOLVERS[name] = SolverInfo(name=name, fn=fn, nfe=nfe, schedule=schedule, stochastic=is_stochastic)
        return fn
    return decorator

#----------------------------------------------------------------------------
