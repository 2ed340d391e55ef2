"""The math of AdaSDE distillation: the student's and the teacher's grids, and the teacher trajectory whose states
the student is fitted to, step by step (the official AdaSDE code's loss; docs/distillation.md). The loop around it
(model loading, batches over processes, logging, resume) lives in training/training_loop.py.

Differences from the official code, on purpose (docs/deviations.md): the student grid is the exact float64 schedule
(no per-step recomputation in float32), and the teacher applies AFS nowhere and works with the discrete schedule.
"""

import torch

from . import get_schedule, get_solver

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


@torch.no_grad()
def teacher_targets(net, x, teacher_sigmas, M, extra_args=None, substeps=2):
    """States of the teacher (DPM-Solver-2, r = 1/2, `substeps` per interval, no AFS) at the student's sigmas[1:]."""
    states = []

    def keep(info):
        if (info['i'] + 1) % (M + 1) == 0:
            states.append(info['x'])
    get_solver('dpm')(net, x, teacher_sigmas, extra_args, callback=keep, substeps=substeps)
    return states

#----------------------------------------------------------------------------
