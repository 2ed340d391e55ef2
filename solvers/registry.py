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

# Every solver option: its command-line type and what it means (--help, README). The options themselves are the
# keyword-only parameters of the registered functions (SolverInfo.options); option_table() checks that this table
# names each of them, with a type that fits its default.
OPTION_DOCS = dict(
    max_order=(int, 'Order'),
    predict_x0=(bool, 'Data prediction'),
    lower_order_final=(bool, 'Lower order at the end'),
    thresholding=(bool, 'Dynamic thresholding'),
    exact_third_order=(bool, 'Full-weight 2nd-derivative term in 3M'),
    variant=(str, 'bh1 or bh2'),
    r=(float, 'Intermediate point'),
    substeps=(int, 'Sub-steps per step'),
    S_churn=(float, 'Stochasticity strength'),
    S_min=(float, 'Stochasticity min noise level'),
    S_max=(float, 'Stochasticity max noise level'),
    S_noise=(float, 'Stochasticity noise inflation'),
    order=(int, 'Order 1-3'),
    noise_fn=(int, 'Noise-scale function 1-7'),
    num_quad=(int, 'Quadrature points of the coefficients'),
    predictor=(None, 'Trained predictor of a learned solver (an object; sample.py loads it from --predictor_path)'),
)


def register(name, *, nfe, schedule=('polynomial', 7), stochastic=False):
    """Decorator: add a sampling function to SOLVERS under `name`."""
    is_stochastic = stochastic if callable(stochastic) else (lambda **options: stochastic)

    def decorator(fn):
        SOLVERS[name] = SolverInfo(name=name, fn=fn, nfe=nfe, schedule=schedule, stochastic=is_stochastic)
        return fn
    return decorator


def option_table():
    """Every solver option in OPTION_DOCS order: name -> (its type, its help text, the solvers that have it)."""
    owners = {}
    for info in SOLVERS.values():
        for name, default in info.options.items():
            if name not in OPTION_DOCS:
                raise KeyError(f'solver {info.name!r} has an option {name!r} that OPTION_DOCS does not describe')
            kind = OPTION_DOCS[name][0]
            fits = default is None or kind is None or isinstance(default, kind) or (kind is float and
                                                                                     type(default) is int)
            if not fits:
                raise TypeError(f'option {name!r} of {info.name!r} defaults to {default!r}, not a {kind.__name__}')
            owners.setdefault(name, []).append(info.name)
    return {name: (*OPTION_DOCS[name], owners[name]) for name in OPTION_DOCS if name in owners}

#----------------------------------------------------------------------------
