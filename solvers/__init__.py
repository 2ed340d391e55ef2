"""Diffusion ODE/SDE solvers in the EDM sigma-parameterisation, behind one registry.

Every solver has the signature
    sample(net, x, sigmas, extra_args=None, callback=None, randn_like=None, afs=False, **options) -> x
where x is the state at sigmas[0] and net(x, sigma, **extra_args) is the denoiser D(x; sigma).
"""

from . import adasde, amed, deis, dpm, dpmpp, edm, epd, er_sde, euler, heun, ipndm, unipc  # noqa: F401  (each module registers its solvers on import)
from .registry import OPTION_DOCS, SOLVERS, SolverInfo, option_table
from .schedules import SCHEDULES, check_schedule, get_schedule

#----------------------------------------------------------------------------


def get_solver(name):
    """The sampling function registered under `name`."""
    return solver_info(name).fn


def solver_info(name) -> SolverInfo:
    if name not in SOLVERS:
        raise ValueError(f'unknown solver {name!r}; choose from {", ".join(sorted(SOLVERS))}')
    return SOLVERS[name]


def check_options(name, options):
    """Fill in a solver's defaults and refuse options it does not have."""
    known = solver_info(name).options
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f'solver {name!r} has no option {", ".join(unknown)}; its options: '
                         f'{", ".join(known) or "none"}')
    return {**known, **options}


def nfe(name, num_steps, afs=False, **options):
    """Number of network evaluations (real calls, per image) of one run of `name` over `num_steps` time points."""
    options = check_options(name, options)
    return solver_info(name).nfe(num_steps, **options) - int(bool(afs))


__all__ = ['SOLVERS', 'SCHEDULES', 'OPTION_DOCS', 'option_table', 'check_schedule', 'get_schedule', 'get_solver',
           'solver_info', 'check_options', 'nfe']

#----------------------------------------------------------------------------
