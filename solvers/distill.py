"""The math of AdaSDE distillation: the student's and the teacher's grids, and the teacher trajectory whose states
the student is fitted to, step by step (the official AdaSDE code's loss; docs/distillation.md). The loop around it
(model loading, batches over processes, logging, resume) lives in training/training_loop.py.

Differences from the official code, on purpose (docs/deviations.md): the student grid is the exact float64 schedule
(no per-step recomputation in float32), and the teacher applies AFS nowhere and works with the discrete schedule.
"""

import torch

from . import get_schedule, get_solver, solver_info

#----------------------------------------------------------------------------
# Grids. The teacher runs on (M + 1)(N - 1) + 1 points of the same schedule;
# the student grid is every (M + 1)-th of them (true for every schedule type,
# since each is a fixed function of i / (num_points - 1)).


def student_and_teacher_sigmas(net, num_steps, M, schedule_type, schedule_rho):
    args = dict(sigma_min=net.sigma_min, sigma_max=net.sigma_max, schedule_type=schedule_type,
                schedule_rho=schedule_rho, net=net)
    student = get_schedule(num_steps, **args)
    teacher = get_schedule((M + 1) * (num_steps - 1) + 1, **args)
    return student, teacher


# The teachers of the AdaSDE, AMED and EPD recipes: a registered ODE solver on the teacher grid. `dpm` and `heun` with
# substeps=2 are the official AdaSDE and EPD teachers (two sub-steps per interval on an inner rho-7 grid, 4 calls
# per interval); AMED's code runs plain Heun, DPM-Solver-2, iPNDM or DPM-Solver++ on the teacher grid.
TEACHERS = ('dpm', 'heun', 'ipndm', 'dpmpp', 'euler')


def teacher_options(teacher, substeps=1, max_order=None, predict_x0=None, lower_order_final=None):
    """Options of the teacher solver: sub-steps for dpm/heun; order and prediction mode for the multistep ones."""
    if teacher not in TEACHERS:
        raise ValueError(f'unknown teacher {teacher!r}; choose from {", ".join(TEACHERS)}')
    if teacher in ('dpm', 'heun'):
        return dict(substeps=substeps)
    given = dict(max_order=max_order, predict_x0=predict_x0, lower_order_final=lower_order_final)
    known = solver_info(teacher).options
    return {k: v for k, v in given.items() if v is not None and k in known}


@torch.no_grad()
def teacher_targets(net, x, teacher_sigmas, M, extra_args=None, substeps=2, teacher='dpm', options=None):
    """States of the teacher (no AFS) at the student's sigmas[1:], i.e. at teacher points (M + 1) k, k >= 1.
    Default: DPM-Solver-2, r = 1/2, `substeps` per interval (the AdaSDE teacher)."""
    states = []

    def keep(info):
        if (info['i'] + 1) % (M + 1) == 0:
            states.append(info['x'])
    options = dict(substeps=substeps) if options is None else options
    get_solver(teacher)(net, x, teacher_sigmas, extra_args, callback=keep, **options)
    return states

#----------------------------------------------------------------------------
