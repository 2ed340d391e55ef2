"""Quality vs NFE on the embedded digits model, judged three ways: every learned solver against every baseline.

Judges (all on seeds that training never draws: training latents come from generator seeds >= 2^31):
  FID   digits detector features against src/digits/fid-ref.npz (all 1797 images);
  KID   the same features against those of the 1797 images (unbiased, so it can dip below 0);
  RMSE  no network at all: per-seed RMSE (pixels in [0, 1]) to the image that the converged sampler (Heun, 100
        NFE) makes from the same latent, averaged over the seeds.
No shipped predictor trains against the digits detector (their loss network is `digits_loss`, another CNN).

For NFE in {3, 5, 7, 9} every baseline runs on its recommended schedule, with AFS on and off wherever that NFE is
reachable, and for each judge the better of the two is reported (a baseline is never shown in a worse setting than
it can do). The learned solvers use the predictors shipped in exp/, one row per solver and form: AdaSDE (`bash launch.sh
digits-nfe<N>`, digits-paper-nfe<N>: the plug-in form on deis, the paper's single-step form on dpm), and the peers of
`bash launch.sh digits-peers` (AMED-Solver, the AMED-Plugin on euler/dpm/ipndm/dpmpp, EPD-Solver, the EPD-Plugin
on ipndm, AdaSDE with gamma = 0), plus any given with --predictor LABEL=PATH. A learned solver sits at its real
number of network calls (EPD's own "parallel NFE" is printed beside it).

    python bench/quality.py [--num 10000] [--out docs/quality-bench]   # writes docs/quality-bench.json, .md, .png
    python bench/quality.py --out docs/quality-bench --replot          # redraw .md and .png from the .json
    python bench/quality.py --first_seed 100000 --num 2000 --nfe 5 --solvers deis --predictor mine=exps/00003-...
    python bench/quality.py --model digits_flow --num 2000 --out docs/quality-bench-flow   # the flow model

--model digits_flow benches the rectified-flow model (docs/flow.md) with the flow baselines users know, all on flow
sigmas (schedule 'flow', diffusers' FlowMatchEuler grid): euler (= FlowMatchEuler), heun, dpmpp (DPM-Solver++ 2M)
and unipc, and the digits_flow predictors shipped in exp/.
"""

import glob
import json
import os
import re
import time

import click
import numpy as np
import torch

import solvers
from fid import ImageFolder, frechet_distance, kernel_distance, load_stats, rmse_to_reference
from models import load_model
from models.detectors import get_detector
from models.zoo import detector_for
from sample import generate_images
from solvers.learned import PREDICTORS, load_predictor
from torch_utils.misc import atomic_write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = os.path.join(ROOT, 'src', 'digits', 'fid-ref.npz')
DATA = os.path.join(ROOT, 'src', 'digits', 'digits-8x8.zip')
CACHE = os.path.join(ROOT, 'samples', 'bench-cache')  # default of --cache
NFES = (3, 5, 7, 9)
BASELINES = [
    ('euler', {}), ('heun', {}), ('dpm', {}), ('dpmpp', dict(max_order=2)), ('dpmpp', dict(max_order=3)),
    ('unipc', {}), ('ipndm', {}), ('ipndm_v', {}), ('deis', {}), ('edm', {}), ('er_sde', {}),
]
FLOW_BASELINES = [('euler', {}), ('heun', {}), ('dpmpp', dict(max_order=2)), ('unipc', {})]  # on flow sigmas
CONVERGED = ('heun', 51)  # 100 NFE
METRICS = {'fid': 'FID (digits detector)', 'kid': 'KID (digits detector)',
           'rmse': 'RMSE to converged (pixels in [0, 1])'}

#----------------------------------------------------------------------------


def images_of(net, seeds, solver, options, num_steps, afs, schedule=None, batch=1000):
    """Samples of `seeds` as pixels 0..255 (float64, unquantised)."""
    schedule_type, rho = schedule or solvers.solver_info(solver).schedule
    chunks = [x for _, x in generate_images(net, seeds, solver, options, num_steps=num_steps, afs=afs,
                                            schedule_type=schedule_type, schedule_rho=rho, max_batch_size=batch,
                                            net_batch=batch, dtype=torch.float32)]
    return (torch.cat(chunks).to(torch.float64) * 127.5 + 127.5).clip(0, 255)


class Judges:
    """FID, KID and RMSE-to-converged of sample sets drawn from a fixed list of seeds."""

    def __init__(self, net, seeds, cache=CACHE, model='digits'):
        self.detector = get_detector(detector_for('digits'))
        ref = load_stats(REF)
        self.mu, self.sigma = ref['mu'], ref['sigma']
        real = ImageFolder(DATA)
        self.real_features = self.features(torch.from_numpy(np.stack([real[i] for i in range(len(real))])))
        os.makedirs(cache, exist_ok=True)
        prefix = '' if model == 'digits' else f'{model}-'
        path = os.path.join(cache, f'{prefix}{CONVERGED[0]}{CONVERGED[1]}-{seeds[0]}-{len(seeds)}.pt')
        if os.path.isfile(path):
            self.converged = torch.load(path, weights_only=True)
        else:
            self.converged = images_of(net, seeds, CONVERGED[0], {}, CONVERGED[1], False)
            atomic_write(path, lambda tmp: torch.save(self.converged, tmp))

    def features(self, pixels):
        with torch.no_grad():
            quantised = (pixels + 0.5).floor().clip(0, 255).to(torch.uint8)  # what a PNG of the sample holds
            return torch.cat([self.detector(b) for b in quantised.split(2000)]).double().numpy()

    def __call__(self, pixels):
        f = self.features(pixels)
        return dict(fid=frechet_distance(f.mean(0), np.cov(f, rowvar=False), self.mu, self.sigma),
                    kid=kernel_distance(f, self.real_features), rmse=rmse_to_reference(pixels, self.converged))


def predictor_label(p):
    """'adasde (dpm)' (the paper's form), 'adasde (deis)' (plug-in), 'amed', 'amed (euler)' (AMED-Plugin), 'epd',
    'epd (ipndm)' (EPD-Plugin)."""
    base = getattr(p, 'base', None)
    return p.kind if base in (None, p.kind) else f'{p.kind} ({base})'


def shipped_predictors(model='digits'):
    """{label: [paths]} of the predictors of `model` under exp/ (the newest snapshot of each run), by
    predictor_label; the gamma = 0 ablation runs (<run>-nogamma) get ', gamma=0' in their label."""
    found = {}
    for run in sorted(glob.glob(os.path.join(ROOT, 'exp', f'*-{model}-*'))):
        snapshots = sorted(glob.glob(os.path.join(run, 'network-snapshot-*.safetensors')))
        if snapshots and re.match(rf'\d+-{re.escape(model)}-', os.path.basename(run)):
            label = predictor_label(load_predictor(snapshots[-1]))
            if run.endswith('-nogamma'):  # the ablation runs of launch.sh digits-peers
                label = label[:-1] + ', gamma=0)'
            found.setdefault(label, []).append(snapshots[-1])
    return found


LEARNED_LABELS = tuple(PREDICTORS)  # a row is a learned solver's if its label starts with one of these


def is_learned(label):
    return label.split(' ')[0] in LEARNED_LABELS


def measure(seeds, nfes, only, predictors, cache=CACHE, model='digits'):
    """{label: {nfe: {metric: (value, setting)}}}: per judge, the best setting of each solver at each NFE."""
    net = load_model(model)
    start = time.time()
    judges = Judges(net, seeds, cache, model)
    baselines, schedule = (FLOW_BASELINES, ('flow', 1)) if model == 'digits_flow' else (BASELINES, None)
    print(f'converged reference ({CONVERGED[0]}, N={CONVERGED[1]}) ready after {time.time() - start:.0f} s',
          flush=True)
    rows = {}

    def report(label, nfe, scores, note):
        cell = rows.setdefault(label, {}).setdefault(nfe, {})
        for metric, value in scores.items():
            if metric not in cell or value < cell[metric][0]:
                cell[metric] = (value, note)
        print(f'{label:24s} NFE {nfe:3d}  ' + '  '.join(f'{m} {v:8.4f}' for m, v in scores.items()) + f'  ({note})',
              flush=True)

    report('converged', solvers.nfe(CONVERGED[0], CONVERGED[1]), judges(judges.converged), f'N={CONVERGED[1]}')
    for nfe in nfes:
        for name, options in baselines:
            label = name + ''.join(f' {k}={v}' for k, v in options.items())
            if only and label not in only and name not in only:
                continue
            for afs in (False, True):
                for num_steps in range(2, 40):
                    if solvers.nfe(name, num_steps, afs=afs, **options) == nfe:
                        scores = judges(images_of(net, seeds, name, options, num_steps, afs, schedule))
                        report(label, nfe, scores, f'N={num_steps}{", afs" if afs else ""}')
    for label, paths in predictors.items():
        for path in paths:
            p = load_predictor(path)
            s = p.settings
            nfe = solvers.nfe(p.kind, p.num_steps, afs=s.get('afs', False), predictor=p)  # real network calls
            if nfe not in nfes:
                continue
            parallel = p.parallel_nfe(p.num_steps) - int(bool(s.get('afs')))
            scores = judges(images_of(net, seeds, p.kind, dict(predictor=p), p.num_steps, s['afs'],
                                      schedule=(s['schedule_type'], s['schedule_rho'])))
            report(label, nfe, scores, f'N={p.num_steps}{", afs" if s["afs"] else ""}'
                   + (f', reported NFE {parallel}' if parallel != nfe else '')
                   + f', {os.path.relpath(os.path.dirname(os.path.abspath(path)), ROOT)}')
    print(f'{time.time() - start:.0f} s')
    return rows


def markdown(rows, num, first_seed, nfes, model='digits'):
    lines = [f'Quality of {num} `{model}` samples per cell (seeds {first_seed}-{first_seed + num - 1}, which training '
             'never draws), from `python bench/quality.py`. Each baseline in its best setting for that judge (AFS '
             'on or off; the setting follows each value), each learned solver with its predictor named. Lower is '
             'better; bold: best at that NFE. No predictor here was trained against the digits detector.', '']
    lines += winners(rows, nfes) + [''] + summary(rows, nfes) + ['']
    for metric, title in METRICS.items():
        lines += [f'### {title}', '', '| solver | ' + ' | '.join(f'NFE {n}' for n in nfes) + ' |',
                  '|---|' + '---|' * len(nfes)]
        for label, cells in rows.items():
            if label == 'converged':
                continue
            best = {n: min((r[n][metric][0] for r in rows.values() if n in r and r is not cells), default=np.inf)
                    for n in nfes}
            lines.append(f'| {label} | ' + ' | '.join(
                ('**{:.4g}** ({})' if cells[n][metric][0] < best[n] else '{:.4g} ({})').format(*cells[n][metric])
                if n in cells else '-' for n in nfes) + ' |')
        (nfe, cell), = rows['converged'].items()
        lines += ['', f'Converged sampler ({CONVERGED[0]}, {nfe} NFE): {cell[metric][0]:.4g}.', '']
    return '\n'.join(lines)


def winners(rows, nfes):
    """One line per NFE and judge: the best training-free solver, the best AdaSDE row and the best other learned
    solver (each with its row label), bold for the best of the three."""
    lines = ['### Who wins where: training-free, AdaSDE, the other learned solvers', '',
             'Per NFE (real network calls) and judge, the best row of each group; bold: the best of the three.', '',
             '| NFE | judge | best training-free | best AdaSDE | best other learned |', '|---|---|---|---|---|']
    groups = (lambda label: not is_learned(label), lambda label: label.startswith('adasde'),
              lambda label: is_learned(label) and not label.startswith('adasde'))
    for n in nfes:
        for metric in METRICS:
            best = []
            for member in groups:
                cells = [(c[n][metric][0], label) for label, c in rows.items()
                         if label != 'converged' and member(label) and n in c]
                best.append(min(cells) if cells else None)
            if best[0] is None:
                continue
            top = min(b[0] for b in best if b is not None)
            shown = ['-' if b is None else (f'**{b[0]:.4g}** ({b[1]})' if b[0] == top else f'{b[0]:.4g} ({b[1]})')
                     for b in best]
            lines.append(f'| {n} | {metric.upper()} | ' + ' | '.join(shown) + ' |')
    return lines


def summary(rows, nfes):
    """One line per NFE and judge: the best training-free solver against each AdaSDE row (bold: better)."""
    learned = [label for label in rows if is_learned(label)]
    lines = ['### Summary: the best training-free solver against each learned solver, per judge', '',
             'Bold: better than the best training-free solver at that NFE (real network calls); -: no setting of '
             'that solver makes that many calls.', '',
             '| NFE | judge | best training-free solver (setting) | ' + ' | '.join(learned) + ' |',
             '|---|---|---|' + '---|' * len(learned)]
    for n in nfes:
        for metric in METRICS:
            free = [(cells[n][metric][0], label, cells[n][metric][1]) for label, cells in rows.items()
                    if n in cells and label != 'converged' and label not in learned]
            if not free:
                continue
            value, label, note = min(free)
            cells = [rows[a][n][metric][0] if n in rows[a] else None for a in learned]
            shown = ['-' if v is None else (f'**{v:.4g}**' if v < value else f'{v:.4g}') for v in cells]
            lines.append(f'| {n} | {metric.upper()} | {value:.4g} ({label}, {note}) | ' + ' | '.join(shown) + ' |')
    return lines


def plot(rows, path, nfes, model='digits'):
    try:
        import matplotlib
    except ImportError:
        print(f'matplotlib is not installed (pip install -e .[bench]): {path} not drawn')
        return
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(METRICS), figsize=(15, 4.8), dpi=110)
    colors = plt.get_cmap('tab20').colors
    for ax, (metric, title) in zip(axes, METRICS.items()):
        for k, (label, cells) in enumerate(item for item in rows.items() if item[0] != 'converged'):
            xs = [n for n in nfes if n in cells]
            if label.startswith('adasde'):
                style = dict(lw=2.5, color='k' if '(dpm' in label else 'C3', marker='o',
                             ls='--' if 'gamma=0' in label else '-')
            elif is_learned(label):
                style = dict(lw=1.8, color=colors[2 * k % 20], marker='D', ms=4, ls='-.')
            else:
                style = dict(lw=1, color=colors[2 * k % 20 + k // 10], marker='.^sv'[k % 4], ms=4)
            ax.plot(xs, [cells[n][metric][0] for n in xs], label=label, **style)
        (cell,) = rows['converged'].values()
        if metric != 'rmse':  # the converged sampler is the RMSE's reference: 0 there
            ax.axhline(cell[metric][0], color='gray', ls='--', lw=1, label='converged (heun, 100 NFE)')
        # KID is unbiased and so can be negative near 0: linear within [-1, 1], logarithmic beyond.
        if metric == 'kid':
            ax.set_yscale('symlog', linthresh=1)
            ax.set_ylim(bottom=-1)
        else:
            ax.set_yscale('log')
        ax.set_xlabel('NFE (real network calls)')
        ax.set_title(title, fontsize=10)
        ax.set_xticks(nfes)
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle(f'Embedded {model} model: quality vs NFE, three judges (lower is better)')
    fig.tight_layout()
    fig.savefig(path)


def load_rows(path):
    with open(path) as f:
        saved = json.load(f)
    rows = {label: {int(n): {m: tuple(v) for m, v in cell.items()} for n, cell in cells.items()}
            for label, cells in saved['rows'].items()}
    return saved['num'], saved['first_seed'], tuple(saved['nfes']), rows, saved.get('model', 'digits')


@click.command()
@click.option('--num', help='Images per cell', type=click.IntRange(min=2), default=10000, show_default=True)
@click.option('--first_seed', help='First seed (seeds first_seed .. first_seed + num - 1)', type=click.IntRange(0),
              default=0, show_default=True)
@click.option('--nfe', 'nfes', help='NFEs to measure', default='3,5,7,9', show_default=True)
@click.option('--solvers', 'only', help='Only these baselines (names or labels, comma-separated; "none" for none)',
              default=None)
@click.option('--predictor', 'predictors', help='Extra predictor (any learned solver) as LABEL=PATH (repeatable)',
              multiple=True)
@click.option('--no_shipped', help='Leave out the predictors shipped in exp/', is_flag=True)
@click.option('--model', help='The embedded model to bench', type=click.Choice(['digits', 'digits_flow']),
              default='digits', show_default=True)
@click.option('--out', help='Write <out>.json (the measurements), <out>.md and <out>.png', type=str, default=None)
@click.option('--replot', help='Only redraw <out>.md and <out>.png from <out>.json', is_flag=True)
@click.option('--merge', help='Start from the rows of earlier .json files (same seeds; repeatable, e.g. one per '
              'NFE run in parallel), replacing those measured again', multiple=True)
@click.option('--cache', help='Folder of the converged images, kept for the next run on the same seeds', type=str,
              default=CACHE, show_default=True)
def main(num, first_seed, nfes, only, predictors, no_shipped, model, out, replot, merge, cache):
    """Quality vs NFE of every solver on the digits model, by FID, KID and RMSE to the converged sampler."""
    nfes = tuple(int(n) for n in nfes.split(','))
    if replot:
        if out is None:
            raise click.UsageError('--replot needs --out')
        num, first_seed, nfes, rows, model = load_rows(out + '.json')
    else:
        torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', os.cpu_count() or 1)))
        extra = {} if no_shipped else shipped_predictors(model)
        for item in predictors:
            label, sep, path = item.partition('=')
            if not sep:
                raise click.BadParameter(f'expected LABEL=PATH, got {item!r}', param_hint='--predictor')
            extra.setdefault(label, []).append(path)
        only = None if only is None else set(only.split(','))
        merged, nfes_all = {}, set(nfes)
        for path in merge:  # checked before any measurement
            old_num, old_first, old_nfes, old_rows, old_model = load_rows(path)
            if (old_num, old_first, old_model) != (num, first_seed, model):
                raise click.UsageError(f'{path} was measured on other seeds or another model')
            for label, cells in old_rows.items():
                merged.setdefault(label, {}).update(cells)
            nfes_all |= set(old_nfes)
        rows = measure(list(range(first_seed, first_seed + num)), nfes, only, extra, cache, model)
        for label, cells in rows.items():
            merged.setdefault(label, {}).update(cells)
        rows = merged
        nfes = tuple(sorted(nfes_all))
    text = markdown(rows, num, first_seed, nfes, model)
    print(text)
    if out:
        if not replot:
            with open(out + '.json', 'w') as f:
                json.dump(dict(num=num, first_seed=first_seed, nfes=nfes, rows=rows, model=model), f, indent=1)
        with open(out + '.md', 'w') as f:
            f.write(text)
        plot(rows, out + '.png', nfes, model)

#----------------------------------------------------------------------------


if __name__ == '__main__':
    main()
