"""EPD-Solver (Zhu et al., ICCV 2025) and EPD-Plugin on iPNDM: K learned parallel directions per step.

Each step places K points between sigma_i and sigma_{i+1}, geometric at learned ratios r_j, along the state's
derivative (EPD) or along iPNDM's Adams-Bashforth extrapolation of it (the plug-in), evaluates the ODE derivative
at every point -- the K points in one batched network call -- and moves the state along a learned convex
combination of those derivatives. The coefficients live in EPDPredictor: four free tables with one row per step.
docs/epd.md describes the maps, the steps, the three NFE counts and what differs from the reference code
(BeierZhu/EPD, docs/references.md).
"""

import torch

from .common import denoise, repeat_rows, to_d
from .ipndm import AB_WEIGHTS
from .learned import LearnedPredictor, learned_sampler, register_predictor
from .registry import register

TABLES = ('r_params', 'scale_dir_params', 'scale_time_params', 'weight_params')
OFFICIAL_TABLES = dict(r_params='r_params', scale_dir_params='scale_dir_params',
                       scale_time_params='scale_time_params', weight_params='weight_s')
BASES = ('epd', 'ipndm')
DEFAULT_POINTS = 2  # the EPD code's default K
OFFICIAL_SETTINGS = ('dataset_name', 'schedule_type', 'schedule_rho', 'afs', 'guidance_type', 'guidance_rate', 'M',
                     'sampler_tea')

#----------------------------------------------------------------------------
# The predictor: raw tables [num_steps - 1, K], mapped per step to
#   r = sigmoid(u_r)                        position of point j between sigma_i and sigma_{i+1}, in log sigma
#   c = 1 + scale_dir tanh(u_c / 4)         scale of point j's derivative in the update (1 when scale_dir = 0)
#   a = 1 + scale_time tanh(u_a / 4)        scale of the noise level the net sees at point j (1 when scale_time = 0)
#   w = softmax_j(u_w)                      weights of the K points
# (the EPD code writes c as 2 sigmoid(u / 2) s + 1 - s, the same function; unlike AdaSDE's maps there is no
# 0.99 cap and the slope is tanh(u / 4)). `fcn` forces c = 1 on the last step.


@register_predictor
class EPDPredictor(LearnedPredictor):
    kind = 'epd'
    title = 'EPD'
    official_class = 'EPD_predictor'
    detach_state = False    # the student state carries its graph from step to step (BPTT), as in the EPD code
    teacher_forcing = False  # every step starts from the student's own state

    def __init__(self,
        num_steps,                  # Time points of the student schedule (num_steps - 1 steps).
        num_points  = DEFAULT_POINTS,  # Parallel points per step (K).
        base        = 'epd',        # 'epd' (EPD-Solver) or 'ipndm' (EPD-Plugin: points placed by Adams-Bashforth).
        scale_dir   = 0.01,         # Half-width of the c range; 0 disables it (c = 1).
        scale_time  = 0.0,          # Half-width of the a range; 0 disables it (a = 1).
        max_order   = 3,            # Adams-Bashforth order of the ipndm base (1 to 4); kept but unused by 'epd'.
        fcn         = False,        # Force c = 1 on the last step.
        settings    = None,         # Sampling settings it was trained for: schedule, AFS, model, guidance, ...
        seed        = None,         # Seed of the N(0, 1) initialisation of the raw tables.
    ):
        super().__init__()
        if int(num_steps) != num_steps or num_steps < 2:
            raise ValueError(f'EPD needs num_steps >= 2, got {num_steps}')
        if int(num_points) != num_points or num_points < 1:
            raise ValueError(f'EPD needs num_points >= 1, got {num_points}')
        if base not in BASES:
            raise ValueError(f'unknown EPD base {base!r}; choose from {", ".join(BASES)}')
        if int(max_order) != max_order or not 1 <= max_order <= 4:
            raise ValueError(f'EPD max_order must be 1 to 4, got {max_order}')
        if not (scale_dir >= 0 and scale_time >= 0):
            raise ValueError(f'EPD scale_dir and scale_time must be >= 0, got {scale_dir}, {scale_time}')
        self.num_steps = int(num_steps)
        self.num_points = int(num_points)
        self.base = str(base)
        self.scale_dir = float(scale_dir)
        self.scale_time = float(scale_time)
        self.max_order = int(max_order)
        self.fcn = bool(fcn)
        self.settings = dict(settings or {})
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        for name in TABLES:  # drawn in the EPD code's order: r, c, a, w
            table = torch.randn([self.num_steps - 1, self.num_points], generator=generator, dtype=torch.float32)
            setattr(self, name, torch.nn.Parameter(table))

    def hyperparams(self):
        return dict(num_steps=self.num_steps, num_points=self.num_points, base=self.base, scale_dir=self.scale_dir,
                    scale_time=self.scale_time, max_order=self.max_order, fcn=self.fcn)

    def step_params(self, i):
        """Mapped coefficients of step i, each a float64 tensor [num_points]: r, c, a, w."""
        if not 0 <= i < self.num_steps - 1:
            raise IndexError(f'step {i} out of range for an EPD predictor of {self.num_steps - 1} steps')
        row = {name: getattr(self, name)[i].double() for name in TABLES}
        ones = torch.ones_like(row['r_params'])
        r = torch.sigmoid(row['r_params'])
        c = 1 + self.scale_dir * torch.tanh(row['scale_dir_params'] / 4) if self.scale_dir > 0 else ones
        a = 1 + self.scale_time * torch.tanh(row['scale_time_params'] / 4) if self.scale_time > 0 else ones
        if self.fcn and i == self.num_steps - 2:
            c = c * 0 + 1  # inside the graph, as the EPD code's in-place fill: the table gets a zero gradient
        w = torch.softmax(row['weight_params'], dim=0)
        return dict(r=r, c=c, a=a, w=w)

    #------------------------------------------------------------------------
    # Counts per image over num_steps time points, without AFS (AFS saves one of each).

    def nfe(self, num_steps):
        """Real network evaluations: the state's derivative and K points per step."""
        return (1 + self.num_points) * (num_steps - 1)

    def parallel_nfe(self, num_steps):
        """What the EPD code reports ("parallel NFE"): 2 per step whatever K."""
        return 2 * (num_steps - 1)

    def network_rounds(self, num_steps, batched=True):
        """Sequential network calls (latency): 2 per step when the K points share one call, else 1 + K."""
        return self.parallel_nfe(num_steps) if batched else self.nfe(num_steps)

    def step(self, net, i, x, sigmas, state=None, extra_args=None, randn_like=None, afs=False):
        return predictor_step(net, self, i, x, sigmas, state, extra_args, afs=afs)

    @classmethod
    def from_official(cls, state, path):
        return from_official(state, path)

#----------------------------------------------------------------------------
# Import of the official snapshots: a pickle of {'model': EPD_predictor, 'loss_fn':
# EPD_loss}, both persistence-decorated classes with their source embedded, read as
# data by LearnedPredictor.load_official (solvers/snapshot.py maps every tensor
# storage to the CPU: the loss object holds its schedule as a cuda:0 tensor).


def from_official(state, path):
    """An EPDPredictor with the tables and settings of an official snapshot's captured `EPD_predictor`."""
    params = state['_parameters']
    settings = {key: state.get(key) for key in OFFICIAL_SETTINGS}
    if settings['schedule_rho'] is not None:
        settings['schedule_rho'] = float(settings['schedule_rho'])
    base = state.get('sampler_stu')
    max_order = state.get('max_order')
    if max_order is None and base == 'epd':
        max_order = 3  # unused by the 'epd' base
    predictor = EPDPredictor(num_steps=state['num_steps'], num_points=state['num_points'], base=base,
                             scale_dir=state['scale_dir'], scale_time=state['scale_time'], max_order=max_order,
                             fcn=state.get('fcn', False), settings=settings)
    return predictor.load_tensors({ours: params[theirs] for ours, theirs in OFFICIAL_TABLES.items()}, path)

#----------------------------------------------------------------------------
# One step i, from sigma_i to sigma_{i+1}, differentiable with respect to the predictor:
#   d_hat = (x_i - D(x_i, sigma_i)) / sigma_i              (x_i / sqrt(1 + sigma_i^2) with AFS)
#   g = d_hat ('epd'), or AB_p(d_hat; H) ('ipndm'), p = min(max_order, |H| + 1)
#   s_j = sigma_{i+1}^r_j sigma_i^(1 - r_j);  x_j = x_i + (s_j - sigma_i) g
#   d_j = (x_j - D(x_j, a_j s_j)) / s_j                     (queried at a s, divided by s)
#   x_{i+1} = x_i + (sigma_{i+1} - sigma_i) sum_j w_j c_j d_j
# H (the ipndm state) holds the detached d_hat of earlier steps, newest last, at most max_order - 1 of them; the
# update itself uses only the K fresh derivatives.


def predictor_step(net, predictor, i, x, sigmas, state=None, extra_args=None, afs=False, *, batched=True):
    """Step i of an EPD predictor of either base: returns (x_next, state). `state`: None for 'epd'; the history
    list for 'ipndm' (ignored at step 0). `batched`: the K points in one network call of K * B rows."""
    t_cur, t_next = float(sigmas[i]), float(sigmas[i + 1])
    params = predictor.step_params(i)
    d_hat = to_d(x, denoise(net, x, t_cur, extra_args, afs=afs), t_cur)
    history = [] if predictor.base == 'epd' or i == 0 or state is None else list(state)
    if predictor.base == 'ipndm':
        order = min(predictor.max_order, len(history) + 1)
        g = sum(b * d for b, d in zip(AB_WEIGHTS[order], [d_hat] + history[::-1]))
    else:
        g = d_hat

    s = (t_next ** params['r'] * t_cur ** (1 - params['r'])).to(x.dtype)  # [K]
    sigma_net = params['a'].to(x.dtype) * s
    coef = (params['w'] * params['c']).to(x.dtype)
    K, B = len(s), x.shape[0]
    points = [x + (s[j] - t_cur) * g for j in range(K)]
    if batched:
        stacked = torch.cat(points)  # row j * B + b: point j of sample b
        denoised = denoise(net, stacked, sigma_net.repeat_interleave(B), repeat_rows(extra_args, K, B))
        derivs = [to_d(x_j, D_j, s[j]) for j, (x_j, D_j) in enumerate(zip(points, denoised.split(B)))]
    else:
        derivs = [to_d(x_j, denoise(net, x_j, sigma_net[j], extra_args), s[j]) for j, x_j in enumerate(points)]
    direction = sum(coef[j] * derivs[j] for j in range(K))
    x_next = x + (t_next - t_cur) * direction

    if predictor.base == 'epd':
        return x_next, None
    keep = predictor.max_order - 1
    return x_next, ((history + [d_hat.detach()])[-keep:] if keep else [])


def epd_nfe(num_steps, predictor=None):
    """Real network evaluations per image without AFS: the predictor's count, (1 + K)(num_steps - 1), with the EPD
    code's K = 2 when there is none."""
    return predictor.nfe(num_steps) if predictor is not None else (1 + DEFAULT_POINTS) * (num_steps - 1)


sample_epd = register('epd', nfe=epd_nfe, schedule=('time_uniform', 1))(learned_sampler('epd'))

#----------------------------------------------------------------------------
