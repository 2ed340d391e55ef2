"""AdaSDE (Wang et al., NeurIPS 2025): a single-step SDE solver with learned per-step coefficients.

Each step is EDM-style noise inflation by a learned churn gamma, followed by a DPM-Solver-2-like step through
learned intermediate point(s), as the official AdaSDE code (Westlake-AGI-Lab/AdaSDE, docs/references.md) does. The
coefficients live in AdaSDEPredictor: free tables with one row per step, distilled from a DPM-Solver-2 teacher
(training/).
"""

import math

import torch

from .common import denoise
from .learned import LearnedPredictor, learned_sampler, register_predictor
from .registry import register

TABLES = ('r_params', 'scale_dir_params', 'scale_time_params', 'weight_params', 'gamma_params')
BASES = ('dpm', 'ipndm', 'deis')

#----------------------------------------------------------------------------
# The predictor: raw tables [num_steps - 1, num_points], mapped to the solver
# coefficients exactly as the official AdaSDE code does:
#   r = sigmoid(u)                                 position of the intermediate point, in log-sigma
#   c = 1 + min(scale_dir, 0.99) tanh(u / 2)       scale of the final direction ("c_n")
#   a = 1 + min(scale_time, 0.99) tanh(u / 2)      scale of the noise level fed to the net ("a_n")
#   gamma = g_min + (g_max - g_min) sigmoid((u + b) / 2), b = 2 logit(0.6)   learned churn
#   w = softmax_j(u)                               weights of the parallel points


@register_predictor
class AdaSDEPredictor(LearnedPredictor):
    kind = 'adasde'
    title = 'AdaSDE'
    official_class = 'adasde_predictor'

    def __init__(self,
        num_steps,                  # Time points of the student schedule (num_steps - 1 steps).
        num_points  = 1,            # Parallel intermediate points per step (K).
        scale_dir   = 0.05,         # Half-width of the c_n range; 0 disables it (c = 1).
        scale_time  = 0.2,          # Half-width of the a_n range; 0 disables it (a = 1).
        gamma       = 0.02,         # Upper end of the churn range; 0 disables the noise (an ODE solver).
        gamma_min   = 2e-4,         # Lower end of the churn range (the official code's constant).
        fcn         = False,        # Force c = 1 on the last step.
        base        = 'dpm',        # Step structure: 'dpm' (the paper's), or a multistep base 'ipndm' / 'deis'.
        max_order   = 4,            # Derivatives kept by a multistep base.
        settings    = None,         # Sampling settings it was trained for: schedule, AFS, model, guidance, ...
        seed        = None,         # Seed of the N(0, 1) initialisation of the raw tables.
    ):
        super().__init__()
        if num_steps < 2 or num_points < 1:
            raise ValueError(f'need num_steps >= 2 and num_points >= 1, got {num_steps}, {num_points}')
        if base not in BASES:
            raise ValueError(f'unknown AdaSDE base {base!r}; choose from {", ".join(BASES)}')
        if base != 'dpm' and num_points != 1:
            raise ValueError(f'the {base} base takes no intermediate points (num_points=1), got {num_points}')
        if not 1 <= int(max_order) <= 4:
            raise ValueError(f'max_order must be 1 to 4, got {max_order}')
        if scale_dir < 0 or scale_time < 0 or gamma < 0:
            raise ValueError('scale_dir, scale_time and gamma must be >= 0')
        self.num_steps = int(num_steps)
        self.num_points = int(num_points)
        self.scale_dir = float(scale_dir)
        self.scale_time = float(scale_time)
        self.gamma = float(gamma)
        self.gamma_min = float(gamma_min)
        self.fcn = bool(fcn)
        self.base = str(base)
        self.max_order = int(max_order)
        self.settings = dict(settings or {})
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        for name in TABLES:
            table = torch.randn([self.num_steps - 1, self.num_points], generator=generator)
            if self.base != 'dpm':  # plug-in form: start at the base solver (c = a = 1) with gamma near gamma_min
                table = torch.full_like(table, -10.0 if name == 'gamma_params' else 0.0)
            setattr(self, name, torch.nn.Parameter(table))

    def hyperparams(self):
        return dict(num_steps=self.num_steps, num_points=self.num_points, scale_dir=self.scale_dir,
                    scale_time=self.scale_time, gamma=self.gamma, gamma_min=self.gamma_min, fcn=self.fcn,
                    base=self.base, max_order=self.max_order)

    def step_params(self, i):
        """Mapped coefficients of step i, each a float64 tensor [num_points]: r, c, a, gamma, w."""
        row = {name: getattr(self, name)[i].double() for name in TABLES}
        ones = torch.ones_like(row['r_params'])
        r = torch.sigmoid(row['r_params'])
        c = 1 + min(self.scale_dir, 0.99) * torch.tanh(row['scale_dir_params'] / 2) if self.scale_dir > 0 else ones
        a = 1 + min(self.scale_time, 0.99) * torch.tanh(row['scale_time_params'] / 2) if self.scale_time > 0 else ones
        if self.gamma > 0:
            b = 2 * math.log(0.6 / 0.4)
            gamma = self.gamma_min + (self.gamma - self.gamma_min) * torch.sigmoid((row['gamma_params'] + b) / 2)
            if i == 0:  # No churn on the first step, zeroed inside the graph as the official code does, so that
                gamma = gamma * 0  # the table still gets a (zero) gradient there and Adam steps it like the others.
        else:
            gamma = torch.zeros_like(ones)
        if self.fcn and i == self.num_steps - 2:
            c = c * 0 + 1  # likewise in the graph
        w = torch.softmax(row['weight_params'], dim=0)
        return dict(r=r, c=c, a=a, gamma=gamma, w=w)

    def nfe(self, num_steps):
        return predictor_nfe(num_steps, self)

    def step(self, net, i, x, sigmas, state=None, extra_args=None, randn_like=None, afs=False):
        """Step i of either form; `state` carries the base's coefficients on this grid and the derivative history."""
        state = state or dict(coeffs=base_coefficients(self, sigmas), history=[])
        x, history = predictor_step(net, self, i, x, sigmas, state['coeffs'], state['history'], extra_args,
                                    randn_like or torch.randn_like, afs=afs)
        return x, dict(state, history=history)

    @classmethod
    def from_official(cls, state, path):
        return from_official(state)

#----------------------------------------------------------------------------
# Import of the official snapshots (`network-snapshot-*.pkl`, read as data by
# LearnedPredictor.load_official): the captured adasde_predictor's attributes and tables.


def from_official(state):
    """An AdaSDEPredictor with the tables and settings of an official snapshot's captured `adasde_predictor`."""
    params = state['_parameters']
    settings = {key: state.get(key) for key in ('dataset_name', 'schedule_type', 'schedule_rho', 'afs',
                                                'guidance_type', 'guidance_rate', 'M', 'sampler_tea')}
    settings['schedule_rho'] = None if settings['schedule_rho'] is None else float(settings['schedule_rho'])
    predictor = AdaSDEPredictor(num_steps=state['num_steps'], num_points=state['num_points'],
                                scale_dir=state['scale_dir'], scale_time=state['scale_time'], gamma=state['gamma'],
                                gamma_min=state.get('gamma_min', 2e-4), fcn=state.get('fcn', False),
                                settings=settings)
    renamed = dict(r_params='r_params', scale_dir_params='scale_dir_params', scale_time_params='scale_time_params',
                   weight_params='weight_s', gamma_params='gamma_params')
    with torch.no_grad():
        for ours, theirs in renamed.items():
            getattr(predictor, ours).copy_(params[theirs].detach().float())
    return predictor.requires_grad_(False).eval()

#----------------------------------------------------------------------------
# One AdaSDE step (the official adasde_sampler), differentiable with respect to the predictor:
#   gamma_bar = sum_j w_j gamma_j;  t_hat = (1 + gamma_bar) t_cur;  x_hat = x + sqrt(t_hat^2 - t_cur^2) eps
#   d_hat = d(x_hat, t_hat)                                     (analytical with AFS on the first step)
#   s_j = t_next^r_j t_hat^(1 - r_j);  x_j = x_hat + (s_j - t_hat) d_hat;  d_j = (x_j - D(x_j, a_j s_j)) / s_j
#   x_next = x_hat + (t_next - t_hat) sum_j w_j c_j d_j


def churn(x, t_cur, params, randn_like):
    """The learned noise inflation of a step: (x_hat, t_hat) with t_hat = (1 + gamma_bar) t_cur."""
    gamma_bar = (params['w'] * params['gamma']).sum()
    t_hat = (1 + gamma_bar) * t_cur
    if not bool(gamma_bar != 0):  # sqrt'(0) is infinite: skip the branch instead of zeroing NaN gradients later
        return x, t_hat
    return x + torch.sqrt(t_hat ** 2 - t_cur ** 2).to(x.dtype) * randn_like(x), t_hat


def adasde_step(net, x, t_cur, t_next, params, extra_args=None, randn_like=torch.randn_like, afs=False):
    """Apply one AdaSDE step from t_cur to t_next with the mapped coefficients `params` (see step_params)."""
    x_hat, t_hat = churn(x, t_cur, params, randn_like)
    t_hat_x = t_hat.to(x.dtype)
    d_hat = (x_hat - denoise(net, x_hat, t_hat_x, extra_args, afs=afs)) / t_hat_x
    direction = 0
    for r, c, a, w in zip(params['r'], params['c'], params['a'], params['w']):
        s = (t_next ** r * t_hat ** (1 - r)).to(x.dtype)
        x_mid = x_hat + (s - t_hat_x) * d_hat
        d_mid = (x_mid - denoise(net, x_mid, a.to(x.dtype) * s, extra_args)) / s
        direction = direction + (w * c).to(x.dtype) * d_mid
    return x_hat + (t_next - t_hat_x) * direction


#----------------------------------------------------------------------------
# The plug-in form on a multistep base (designed here; docs/adasde-multistep.md):
# the same learned churn and scalings around one network call per step, whose
# derivative joins the base's linear combination of the past derivatives:
#   t_hat = (1 + gamma_bar) t_i;  x_hat = x_i + sqrt(t_hat^2 - t_i^2) eps;  d_i = (x_hat - D(x_hat, a t_hat)) / t_hat
#   x_{i+1} = x_hat + c (t_{i+1} - t_hat) / (t_{i+1} - t_i) sum_k b_{i,k} d_{i-k}
# with b the base's coefficients on the grid (iPNDM's Adams-Bashforth weights times the step, or DEIS-tAB's).
# With c = a = 1 and gamma = 0 it is the base solver itself.


def base_coefficients(predictor, sigmas):
    """Per-step coefficient lists of a multistep base on the grid `sigmas` (floats); None for 'dpm'."""
    if predictor.base == 'dpm':
        return None
    if predictor.base == 'deis':
        from .deis import deis_coefficients
        return deis_coefficients(sigmas, predictor.max_order)
    from .ipndm import AB_WEIGHTS
    return [[(sigmas[i + 1] - sigmas[i]) * b for b in AB_WEIGHTS[min(i + 1, predictor.max_order)]]
            for i in range(len(sigmas) - 1)]


def multistep_step(net, x, t_cur, t_next, params, coeffs, history, extra_args=None, randn_like=torch.randn_like,
                   afs=False):
    """One AdaSDE step on a multistep base; returns (x_next, history with this step's derivative first)."""
    x_hat, t_hat = churn(x, t_cur, params, randn_like)
    t_hat_x = t_hat.to(x.dtype)
    d = (x_hat - denoise(net, x_hat, t_hat_x if afs else params['a'][0].to(x.dtype) * t_hat_x, extra_args,
                         afs=afs)) / t_hat_x
    history = [d] + history[:len(coeffs) - 1]
    scale = (params['c'][0] * (t_next - t_hat) / (t_next - float(t_cur))).to(x.dtype)
    return x_hat + scale * sum(b * d_k for b, d_k in zip(coeffs, history)), history


def predictor_step(net, predictor, i, x, sigmas, coeffs, history, extra_args=None, randn_like=torch.randn_like,
                   afs=False):
    """Step i (from sigmas[i] to sigmas[i + 1]) of an AdaSDE predictor of any base: returns (x_next, history)."""
    t_cur = torch.as_tensor(sigmas[i], dtype=torch.float64)
    params = predictor.step_params(i)
    if coeffs is None:
        return adasde_step(net, x, t_cur, float(sigmas[i + 1]), params, extra_args, randn_like, afs=afs), history
    return multistep_step(net, x, t_cur, float(sigmas[i + 1]), params, coeffs[i], history, extra_args, randn_like,
                          afs=afs)


def predictor_nfe(num_steps, predictor=None):
    """Network calls of a run without AFS: (1 + K) per step for the 'dpm' base, one for a multistep base."""
    per_step = 1 + getattr(predictor, 'num_points', 1) if getattr(predictor, 'base', 'dpm') == 'dpm' else 1
    return per_step * (num_steps - 1)


sample_adasde = register('adasde', nfe=predictor_nfe, schedule=('time_uniform', 1),
                         stochastic=lambda predictor=None, **o: getattr(predictor, 'gamma', 0) > 0)(
    learned_sampler('adasde'))

#----------------------------------------------------------------------------
