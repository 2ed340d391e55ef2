"""FID vs NFE on the embedded digits model: AdaSDE against every baseline, plus the converged sampler.

For NFE in {3, 5, 7, 9} every baseline runs on its recommended schedule, with AFS on and off wherever that NFE is
reachable, and the better of the two is reported (a baseline is never shown in a worse setting than it can do).
AdaSDE uses the predictors shipped in exp/ (trained by `bash launch.sh digits-nfe<N>`), or any given with
--predictor. FID uses the shipped digits detector against src/digits/fid-ref.npz, on the same seeds for every row.

    python bench/quality.py [--num 10000] [--out docs/quality]    # writes docs/quality.json, .md and .png
    python bench/quality.py --out docs/quality --replot           # redraw .md and .png from the .json
"""

import glob
import json
import os
import re
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import solvers  # noqa: E402
from fid import fid_from_images  # noqa: E402
from models import load_model  # noqa: E402
from sample import generate_images  # noqa: E402
from solvers.adasde import AdaSDEPredictor  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = os.path.join(ROOT, 'src', 'digits', 'fid-ref.npz')
NFES = (3, 5, 7, 9)
BASELINES = [
    ('euler', {}), ('heun', {}), ('dpm', {}), ('dpmpp', dict(max_order=2)), ('dpmpp', dict(max_order=3)),
    ('unipc', {}), ('ipndm', {}), ('ipndm_v', {}), ('deis', {}), ('edm', {}), ('er_sde', {}),
]

#----------------------------------------------------------------------------


def images_of(net, seeds, solver, options, num_steps, afs, schedule=None, batch=1000):
    schedule_type, rho = schedule or solvers.solver_info(solver).schedule
    chunks = [x for _, x in generate_images(net, seeds, solver, options, num_steps=num_steps, afs=afs,
                                            schedule_type=schedule_type, schedule_rho=rho, max_batch_size=batch,
                                            net_batch=batch, dtype=torch.float32)]
    return (torch.cat(chunks) * 127.5 + 128).clip(0, 255).to(torch.uint8)


def shipped_predictors():
    """{nfe: path} of the digits predictors under exp/ (the newest snapshot of each run)."""
    found = {}
    for run in sorted(glob.glob(os.path.join(ROOT, 'exp', '*-digits-*'))):
        snapshots = sorted(glob.glob(os.path.join(run, 'network-snapshot-*.safetensors')))
        m = re.match(r'\d+-digits-(\d+)-(\d+)-', os.path.basename(run))
        if snapshots and m:
            found[int(m.group(2))] = snapshots[-1]
    return found


def measure(num, predictors):
    """{label: {nfe: (fid, setting)}} for the converged reference, every baseline and the AdaSDE predictors."""
    torch.set_num_threads(os.cpu_count() or 1)
    net = load_model('digits')
    seeds = range(num)
    fid = lambda imgs: fid_from_images(imgs, REF)  # noqa: E731
    rows = {}

    def report(label, nfe, value, note):
        rows.setdefault(label, {})[nfe] = (value, note)
        print(f'{label:24s} NFE {nfe:3d}  FID {value:8.4f}  ({note})', flush=True)

    start = time.time()
    ref_steps = 51  # heun: 100 NFE
    report('heun (converged)', solvers.nfe('heun', ref_steps), fid(images_of(net, seeds, 'heun', {}, ref_steps, False)),
           f'N={ref_steps}')
    for nfe in NFES:
        for name, options in BASELINES:
            label = name + ''.join(f' {k}={v}' for k, v in options.items())
            best = None
            for afs in (False, True):
                for num_steps in range(2, 40):
                    if solvers.nfe(name, num_steps, afs=afs, **options) == nfe:
                        value = fid(images_of(net, seeds, name, options, num_steps, afs))
                        if best is None or value < best[0]:
                            best = (value, f'N={num_steps}{", afs" if afs else ""}')
            if best is not None:
                report(label, nfe, *best)
    found = shipped_predictors()
    for path in predictors:
        p = AdaSDEPredictor.load(path)
        found[solvers.nfe('adasde', p.num_steps, afs=p.settings.get('afs', False), predictor=p)] = path
    for nfe, path in sorted(found.items()):
        p = AdaSDEPredictor.load(path)
        s = p.settings
        value = fid(images_of(net, seeds, 'adasde', dict(predictor=p), p.num_steps, s['afs'],
                              schedule=(s['schedule_type'], s['schedule_rho'])))
        report('adasde', nfe, value, f'N={p.num_steps}{", afs" if s["afs"] else ""}, '
               f'{os.path.relpath(os.path.dirname(path), ROOT)}')
    print(f'{time.time() - start:.0f} s')
    return rows


def markdown(rows, num):
    header = '| solver | ' + ' | '.join(f'NFE {n}' for n in NFES) + ' |'
    lines = [f'FID of {num} digits samples (shipped digits detector, `src/digits/fid-ref.npz`), from '
             '`python bench/quality.py`. Each baseline at its better AFS setting; the setting (N time points, AFS) '
             'follows each FID, and for AdaSDE the predictor file. Bold: best at that NFE.', '', header,
             '|---|' + '---|' * len(NFES)]
    for label, cells in rows.items():
        if label.endswith('(converged)'):
            continue
        best = {n: min(r[n][0] for r in rows.values() if n in r and r is not cells) for n in NFES}
        lines.append(f'| {label} | ' + ' | '.join(
            ('**{:.3f}** ({})' if n in cells and cells[n][0] < best[n] else '{:.3f} ({})').format(*cells[n])
            if n in cells else '-' for n in NFES) + ' |')
    (nfe, (value, _)), = rows['heun (converged)'].items()
    lines += ['', f'Converged reference: heun, {nfe} NFE: FID {value:.3f}.']
    return '\n'.join(lines) + '\n'


def plot(rows, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colors = plt.get_cmap('tab20').colors
    for k, (label, cells) in enumerate(item for item in rows.items() if not item[0].endswith('(converged)')):
        nfes = [n for n in NFES if n in cells]
        style = dict(lw=2.5, color='k', marker='o') if label == 'adasde' else \
            dict(lw=1, color=colors[2 * k % 20 + k // 10], marker='.^sv'[k % 4], ms=4)
        ax.plot(nfes, [cells[n][0] for n in nfes], label=label, **style)
    (value, _), = rows['heun (converged)'].values()
    ax.axhline(value, color='gray', ls='--', lw=1, label='heun, converged')
    ax.set_yscale('log')
    ax.set_xlabel('NFE')
    ax.set_ylabel('FID (digits detector)')
    ax.set_xticks(NFES)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title('Embedded digits model: FID vs NFE')
    fig.tight_layout()
    fig.savefig(path)


@click.command()
@click.option('--num', help='Images per FID', type=int, default=10000, show_default=True)
@click.option('--out', help='Write <out>.json (the measurements), <out>.md and <out>.png', type=str, default=None)
@click.option('--predictor', 'predictors', help='Extra AdaSDE predictor file (repeatable)', multiple=True)
@click.option('--replot', help='Only redraw <out>.md and <out>.png from <out>.json', is_flag=True)
def main(num, out, predictors, replot):
    if replot:
        if out is None:
            raise click.UsageError('--replot needs --out')
        with open(out + '.json') as f:
            saved = json.load(f)
        num, rows = saved['num'], {label: {int(n): tuple(v) for n, v in cells.items()}
                                   for label, cells in saved['rows'].items()}
    else:
        rows = measure(num, predictors)
    text = markdown(rows, num)
    print(text)
    if out:
        if not replot:
            with open(out + '.json', 'w') as f:
                json.dump(dict(num=num, rows=rows), f, indent=1)
        with open(out + '.md', 'w') as f:
            f.write(text)
        plot(rows, out + '.png')

#----------------------------------------------------------------------------


if __name__ == '__main__':
    main()
