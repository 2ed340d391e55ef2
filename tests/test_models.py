"""models: the one loader (zoo names, EDM network pickles, safetensors model directories), the zoo table, EDM
preconditioning, the digits dataset and detector. Nothing here touches the network: downloads are intercepted."""

import dataclasses
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import uuid
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

import dataset_tool
from models import ModelError, detectors, edm, load_model, zoo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#----------------------------------------------------------------------------
# The embedded default model.


def test_digits_loads_offline_and_fast(tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    monkeypatch.setenv('ADASDE_SRC_DIR', str(tmp_path / 'src'))
    monkeypatch.setattr(urllib.request, 'urlopen', _no_network)
    start = time.perf_counter()
    net = load_model('digits')
    elapsed = time.perf_counter() - start
    print(f'load_model("digits"): {elapsed:.3f} s')
    assert elapsed < 10  # typically ~0.2 s; bench/digits_fid.py reports the figure
    assert not os.path.exists(tmp_path / 'src') and not os.path.exists(tmp_path / 'cache')
    assert (net.img_resolution, net.img_channels, net.label_dim) == (8, 1, 0)
    assert (net.sigma_min, net.sigma_max, net.sigma_data) == (0.002, 80.0, 0.5)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert net.training_options['command'].startswith('python train_digits.py denoiser')


def test_denoiser_contract():
    net = load_model('digits')
    x = torch.randn([5, 1, 8, 8], generator=torch.Generator().manual_seed(0)) * 2
    sigmas = torch.tensor([0.01, 0.3, 1.0, 5.0, 60.0])
    out = net(x, sigmas)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert net(x.double(), sigmas.double()).dtype == torch.float32
    # A scalar sigma is broadcast; a per-sample sigma acts per sample only.
    assert torch.equal(net(x, torch.tensor(1.0)), net(x, torch.ones(5)))
    assert torch.equal(net(x, 1.0), net(x, torch.ones(5)))
    for i in range(5):
        torch.testing.assert_close(net(x[i:i + 1], sigmas[i:i + 1]), out[i:i + 1], rtol=1e-5, atol=1e-5)
    # D -> x as sigma -> 0 (c_skip -> 1, c_out -> 0); at large sigma D lies near the data range [-1, 1].
    torch.testing.assert_close(net(x, 1e-6), x, rtol=0, atol=1e-5)
    assert net(torch.randn(64, 1, 8, 8) * 80, 80.0).abs().max() < 1.5
    assert net.round_sigma(0.25) == torch.tensor(0.25)


class _RecordingUNet(torch.nn.Module):
    """Stand-in for the U-Net: records its inputs, returns F = 1."""

    def forward(self, x, noise_labels, class_labels=None):
        self.seen = (x, noise_labels, class_labels)
        return torch.ones_like(x)


def test_edm_precond_coefficients():
    # Hand-computed at sigma = 0.5, sigma_data = 0.5: c_skip = 1/2, c_out = 0.25/sqrt(0.5), c_in = 1/sqrt(0.5),
    # c_noise = ln(0.5)/4.
    net = edm.EDMPrecond(8, 1, label_dim=3, model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    net.model = _RecordingUNet()
    x = torch.full([2, 1, 8, 8], 2.0)
    D = net(x, torch.tensor([0.5, 0.5]), class_labels=torch.eye(3)[[0, 2]])
    torch.testing.assert_close(D, torch.full_like(x, 0.5 * 2 + 0.25 / np.sqrt(0.5)))
    x_in, c_noise, labels = net.model.seen
    torch.testing.assert_close(x_in, torch.full_like(x, 2 / np.sqrt(0.5)))
    torch.testing.assert_close(c_noise, torch.full([2], np.log(0.5) / 4))
    assert torch.equal(labels, torch.eye(3)[[0, 2]])
    net(x, 0.5)
    assert torch.equal(net.model.seen[2], torch.zeros([2, 3]))  # no labels: zeros, broadcast to the batch


def test_safetensors_round_trip(tmp_path):
    torch.manual_seed(0)
    net = edm.EDMPrecond(8, 1, label_dim=10, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                         attn_resolutions=[4], sigma_min=0.01, sigma_max=50.0)
    for p in net.parameters():  # the zero-initialised output layers would hide a bad round trip
        torch.nn.init.normal_(p, std=0.1)
    net.eval()
    edm.save_model(net, tmp_path / 'm', training_options=dict(seed=3))
    assert sorted(os.listdir(tmp_path / 'm')) == ['model.json', 'model.safetensors']
    config = json.loads((tmp_path / 'm' / 'model.json').read_text())
    assert config['class'] == 'EDMPrecond' and config['training_options'] == dict(seed=3)
    loaded = load_model(str(tmp_path / 'm'))
    assert (loaded.sigma_min, loaded.sigma_max, loaded.label_dim) == (0.01, 50.0, 10)
    x, labels = torch.randn(4, 1, 8, 8), torch.eye(10)[[1, 2, 3, 4]]
    assert torch.equal(loaded(x, torch.tensor([0.1, 1, 2, 3]), labels), net(x, torch.tensor([0.1, 1, 2, 3]), labels))
    with pytest.raises(ModelError, match='no model.json'):
        edm.load_local(str(tmp_path))


def test_an_error_without_a_message_is_named(tmp_path, monkeypatch):
    edm.save_model(edm.EDMPrecond(8, 1, model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[]),
                   tmp_path / 'm')

    def load_file(*args, **kwargs):
        raise RuntimeError()
    monkeypatch.setattr(edm, 'load_file', load_file)
    with pytest.raises(ModelError, match=r'model.safetensors: weights do not match .*model.json \(RuntimeError\)$'):
        edm.load_local(str(tmp_path / 'm'))


def test_edm_precond_gradients():
    net = edm.EDMPrecond(8, 1, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    sigma = torch.tensor(0.7, requires_grad=True)
    net(x, sigma).sum().backward()
    assert x.grad is not None and sigma.grad is not None and torch.isfinite(x.grad).all()

#----------------------------------------------------------------------------
# EDM network pickles: a small EDM-style network in a module of its own, with
# persistence-decorated classes, pickled the way EDM's training loop does.


NETWORK_SRC = '''
    """A tiny EDM-style network (test fixture)."""
    import numpy as np
    import torch
    from torch_utils import persistence

    @persistence.persistent_class
    class TinyUNet(torch.nn.Module):
        def __init__(self, channels, hidden):
            super().__init__()
            self.conv0 = torch.nn.Conv2d(channels, hidden, 3, padding=1)
            self.emb = torch.nn.Linear(1, hidden)
            self.conv1 = torch.nn.Conv2d(hidden, channels, 3, padding=1)

        def forward(self, x, noise_labels, class_labels=None):
            emb = self.emb(noise_labels.reshape(-1, 1)).reshape(x.shape[0], -1, 1, 1)
            return self.conv1(torch.nn.functional.silu(self.conv0(x) + emb))

    @persistence.persistent_class
    class EDMPrecond(torch.nn.Module):
        def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                     sigma_max=float('inf'), sigma_data=0.5, hidden=8):
            super().__init__()
            self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
            self.use_fp16, self.sigma_min, self.sigma_max, self.sigma_data = use_fp16, sigma_min, sigma_max, sigma_data
            self.model = TinyUNet(img_channels, hidden)

        def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
            x = x.to(torch.float32)
            sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
            c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
            c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
            c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
            F_x = self.model(c_in * x, (sigma.log() / 4).flatten().expand(x.shape[0]))
            return c_skip * x + c_out * F_x

        def round_sigma(self, sigma):
            return torch.as_tensor(sigma)
'''


@pytest.fixture(scope='module')
def edm_pickle(tmp_path_factory):
    """(path of a network pickle, x, sigma, D of the original network) for a module that is then forgotten."""
    folder = tmp_path_factory.mktemp('netsrc')
    module_name = f'tiny_networks_{uuid.uuid4().hex[:8]}'
    (folder / f'{module_name}.py').write_text(textwrap.dedent(NETWORK_SRC))
    sys.path.insert(0, str(folder))
    try:
        module = __import__(module_name)
        torch.manual_seed(0)
        net = module.EDMPrecond(img_resolution=8, img_channels=2, hidden=8).eval().requires_grad_(False)
        data = dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs=dict(path='x.zip'))
        path = folder / 'network-snapshot-000010.pkl'
        with open(path, 'wb') as f:
            pickle.dump(data, f)
        x = torch.randn([3, 2, 8, 8], generator=torch.Generator().manual_seed(1))
        sigma = torch.tensor([0.05, 1.0, 30.0])
        D = net(x, sigma)
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(module_name, None)
    return str(path), module_name, x, sigma, D


def test_edm_pickle_in_fresh_process(edm_pickle, tmp_path):
    path, module_name, x, sigma, D = edm_pickle
    torch.save(dict(x=x, sigma=sigma), tmp_path / 'inputs.pt')
    script = textwrap.dedent(f'''
        import importlib.util, torch
        assert importlib.util.find_spec({module_name!r}) is None
        from models import load_model
        net = load_model({path!r})
        inp = torch.load({str(tmp_path / 'inputs.pt')!r})
        assert (net.sigma_min, net.sigma_max, net.img_channels) == (0.002, 80.0, 2), net.sigma_min
        assert not net.training and not any(p.requires_grad for p in net.parameters())
        torch.save(net(inp['x'], inp['sigma']), {str(tmp_path / 'out.pt')!r})
    ''')
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=str(torch.get_num_threads()))
    result = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert torch.equal(torch.load(tmp_path / 'out.pt'), D)


def test_edm_pickle_errors(tmp_path):
    with open(tmp_path / 'adasde.pkl', 'wb') as f:
        pickle.dump(dict(model=1, loss_fn=2), f)
    with open(tmp_path / 'other.pkl', 'wb') as f:
        pickle.dump(dict(G=1), f)
    (tmp_path / 'junk.pkl').write_bytes(b'not a pickle at all')
    (tmp_path / 'cut.pkl').write_bytes(pickle.dumps(dict(ema=list(range(100))))[:40])
    cases = [('adasde.pkl', 'learned-solver predictor snapshot'),
             ('other.pkl', 'expected a dict with key "ema", got G'),
             ('junk.pkl', 'not a model file of a format this project reads'),
             ('cut.pkl', 'not a readable network pickle'), ('missing.pkl', 'network pickle not found')]
    for name, message in cases:
        with pytest.raises(ModelError, match=message) as err:
            load_model(str(tmp_path / name))
        assert '\n' not in str(err.value)

#----------------------------------------------------------------------------
# The zoo. Downloads are intercepted: either no network at all, or a fake server.


def _no_network(*args, **kwargs):
    raise urllib.error.URLError('network is unreachable (test)')


class _FakeResponse(io.BytesIO):
    headers = {}




def test_zoo_table():
    assert set(zoo.ZOO) == {'digits', 'digits_flow', 'cifar10', 'ffhq', 'afhqv2', 'imagenet64', 'lsun_bedroom',
                            'imagenet256', 'lsun_bedroom_ldm', 'ms_coco', 'sdxl', 'sd3', 'flux', 'prompts'}
    md5 = lambda url: hashlib.md5(url.encode()).hexdigest()  # noqa: E731
    # URLs checked against the md5 table of the official AdaSDE download list (docs/references.md).
    assert md5(zoo.ZOO['cifar10'].url) == 'c320a0e2338e26e7ce763402b5b56d98'
    assert md5(zoo.ZOO['ffhq'].url) == '35d31d0db80c6846cfe376859f74d64c'
    assert md5(zoo.ZOO['afhqv2'].url) == 'c3238fd63e57b9ea1562999e0c55f411'
    assert md5(zoo.ZOO['imagenet64'].url) == '8b9a74a815e2cf3084dfec9f4876c76d'
    assert md5(zoo.ZOO['cifar10'].fid_ref) == 'fb5723973c843f2c5ec8c9c512572ae2'
    for name, e in zoo.ZOO.items():
        assert e.name == name and (e.url is None) == (e.storage == 'repo')
        if e.kind != 'file':
            assert e.resolution and e.channels and 0 < e.sigma_min < e.sigma_max
    assert zoo.ZOO['imagenet64'].label_dim == 1000 and zoo.ZOO['imagenet64'].label_kind == 'onehot'
    assert zoo.ZOO['ms_coco'].guidance_rate == 7.5 and zoo.ZOO['digits'].detector == 'digits'
    assert os.path.isfile(zoo.ZOO['digits'].fid_ref)


@pytest.mark.parametrize('name', ['cifar10', 'ffhq', 'afhqv2', 'imagenet64'])
def test_zoo_without_network(offline, name):
    tmp_path, calls = offline
    with pytest.raises(ModelError, match='cannot download') as err:
        load_model(name)
    message = str(err.value)
    assert '\n' not in message and zoo.ZOO[name].url in message and str(tmp_path / 'src' / name) in message
    assert calls and set(calls) == {zoo.ZOO[name].url}
    assert not os.path.exists(tmp_path / 'src' / name / zoo.ZOO[name].file)


def test_zoo_prompts_and_unknown(offline):
    with pytest.raises(ModelError, match='not a model'):
        load_model('prompts')
    with pytest.raises(ModelError, match='cannot download'):
        zoo.fetch('prompts')
    with pytest.raises(ModelError, match='unknown model .cifar100.'):
        load_model('cifar100')
    with pytest.raises(ModelError, match=r"^model 'digits' takes no option guidance_rate \(it has no guidance\)$"):
        load_model('digits', guidance_rate=2.0)
    with pytest.raises(ModelError, match=r"^model 'digits' takes no option arch$"):  # not "(it has no guidance)"
        load_model('digits', arch='{}')


def test_zoo_stored_file_and_cache(offline, edm_pickle):
    tmp_path, calls = offline
    path, _, x, sigma, D = edm_pickle
    # A file already in <src>/<name>/ ...
    stored = tmp_path / 'src' / 'cifar10' / zoo.ZOO['cifar10'].file
    stored.parent.mkdir(parents=True)
    stored.write_bytes(open(path, 'rb').read())
    assert torch.equal(load_model('cifar10')(x, sigma), D)
    # ... or in the dnnlib cache under <md5(url)>_<name> is used offline.
    cache = tmp_path / 'cache' / 'downloads'
    cache.mkdir(parents=True)
    url = zoo.ZOO['ffhq'].url
    (cache / f'{hashlib.md5(url.encode()).hexdigest()}_net.pkl').write_bytes(open(path, 'rb').read())
    assert torch.equal(load_model('ffhq')(x, sigma), D)
    assert calls == []


def test_zoo_download(offline, edm_pickle, monkeypatch):
    tmp_path, _ = offline
    path, _, x, sigma, D = edm_pickle
    calls = []

    def urlopen(request, *args, **kwargs):
        calls.append(request.full_url)
        return _FakeResponse(open(path, 'rb').read())
    monkeypatch.setattr(urllib.request, 'urlopen', urlopen)
    net = load_model('afhqv2')
    assert calls == [zoo.ZOO['afhqv2'].url] and torch.equal(net(x, sigma), D)
    assert os.listdir(tmp_path / 'src' / 'afhqv2') == [zoo.ZOO['afhqv2'].file]
    load_model('afhqv2')
    assert len(calls) == 1  # stored: not downloaded again


def test_zoo_rows_are_what_their_loaders_produce(offline, edm_pickle, monkeypatch):
    """A row states what runs: the embedded model as loaded, and the sigma range the loader gives EDM pickles (the
    openai-UNet rows are checked in tests/test_backends.py, ms_coco in tests/test_sd.py)."""
    tmp_path, calls = offline
    from torch_utils.cli import GUIDANCE_TYPES
    for name, e in zoo.ZOO.items():
        assert e.detector in detectors.DETECTORS and e.feature_net in detectors.FEATURE_NETS, name
        assert e.guidance_type in (None, *GUIDANCE_TYPES) and zoo.detector_for(name) == e.detector, name
        if e.fid_ref is not None:  # images shaped like a row's reference statistics are judged by its detector
            assert zoo.detector_for(image_shape=e.ref_image_shape) == e.detector, name
    assert zoo.detector_for('my-model') == zoo.detector_for(image_shape=(3, 8, 8)) == zoo.DEFAULT_DETECTOR

    e, net = zoo.ZOO['digits'], load_model('digits')
    assert (net.img_channels, net.img_resolution, net.label_dim) == (e.channels, e.resolution, e.label_dim)
    assert (net.sigma_min, net.sigma_max, getattr(net, 'guidance_type', None)) == (e.sigma_min, e.sigma_max,
                                                                                   e.guidance_type)
    with np.load(e.fid_ref) as ref:
        assert str(ref['detector']) == e.detector
        assert ref['mu'].shape == (detectors.get_detector(e.detector).feature_dim,)

    # EDM's networks carry sigma_min = 0, sigma_max = inf, as the stand-in does: the range that runs is the row's.
    path = edm_pickle[0]
    for name in [name for name, e in zoo.ZOO.items() if e.kind == 'edm']:
        e = zoo.ZOO[name]
        (tmp_path / 'src' / name).mkdir(parents=True)
        (tmp_path / 'src' / name / e.file).write_bytes(open(path, 'rb').read())
        net = load_model(name)
        assert (net.sigma_min, net.sigma_max) == (e.sigma_min, e.sigma_max), name
        # Resolution and class conditioning as EDM's file names state them.
        size = f'-{e.resolution}x{e.resolution}'
        assert size in e.url and size in e.fid_ref and ('-cond-' in e.url) == (e.label_dim > 0), name
    monkeypatch.setitem(zoo.ZOO, 'cifar10', dataclasses.replace(zoo.ZOO['cifar10'], sigma_min=0.01, sigma_max=50.0))
    net = load_model('cifar10')
    assert (net.sigma_min, net.sigma_max) == (0.01, 50.0) and calls == []


def test_zoo_ms_coco_offline(tmp_path):
    # Stable Diffusion goes through diffusers and the Hugging Face cache; offline and uncached it is one line.
    pytest.importorskip('diffusers')
    script = textwrap.dedent('''
        from models import load_model, ModelError
        try:
            load_model('ms_coco')
        except ModelError as err:
            print('ERROR', err)
    ''')
    env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'),
               ADASDE_SRC_DIR=str(tmp_path / 'src'), DNNLIB_CACHE_DIR=str(tmp_path / 'cache'))
    result = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith('ERROR')]
    assert len(lines) == 1 and 'Stable Diffusion' in lines[0], result.stdout

#----------------------------------------------------------------------------
# The digits dataset and detector.


def test_dataset_round_trip(tmp_path):
    images = np.random.RandomState(0).randint(0, 256, [3, 8, 8]).astype(np.uint8)
    dataset_tool.write_dataset(str(tmp_path / 'd.zip'), images, [4, 0, 9])
    with zipfile.ZipFile(tmp_path / 'd.zip') as zf:
        assert zf.namelist() == ['00000/img00000000.png', '00000/img00000001.png', '00000/img00000002.png',
                                 'dataset.json']
        assert all(info.compress_type == zipfile.ZIP_STORED for info in zf.infolist())
        assert json.loads(zf.read('dataset.json')) == {'labels': [['00000/img00000000.png', 4],
                                                                  ['00000/img00000001.png', 0],
                                                                  ['00000/img00000002.png', 9]]}
    for dest in ('d.zip', 'folder'):
        if dest == 'folder':
            dataset_tool.write_dataset(str(tmp_path / dest), images, [4, 0, 9])
        x, labels = dataset_tool.read_dataset(str(tmp_path / dest))
        assert x.dtype == np.uint8 and np.array_equal(x[:, 0], images) and labels.tolist() == [4, 0, 9]


def test_one_reader_of_edm_image_folders(tmp_path):
    import fid
    assert fid.ImageFolder is dataset_tool.ImageFolder  # fid.py reads image folders with the same class
    images = np.random.RandomState(1).randint(0, 256, [6, 8, 8]).astype(np.uint8)
    dataset_tool.write_dataset(str(tmp_path / 'd.zip'), images, [5, 4, 3, 2, 1, 0])
    # A seeded subset, as EDM: the labels follow the images they belong to.
    folder = dataset_tool.ImageFolder(str(tmp_path / 'd.zip'), max_size=4, random_seed=7)
    x, labels = dataset_tool.read_dataset(str(tmp_path / 'd.zip'), max_size=4, random_seed=7)
    assert len(folder) == 4 and np.array_equal(x[:, 0], images[folder.indices])
    assert labels.tolist() == (5 - folder.indices).tolist() == folder.labels().tolist()
    (tmp_path / 'empty').mkdir()
    with pytest.raises(dataset_tool.DatasetError, match='No images found in'):
        dataset_tool.read_dataset(str(tmp_path / 'empty'))
    PIL.Image.fromarray(np.zeros([8, 8], dtype=np.uint16)).save(tmp_path / 'empty' / 'deep.png')
    with pytest.raises(dataset_tool.DatasetError, match='is not 8-bit'):
        dataset_tool.read_dataset(str(tmp_path / 'empty'))


def test_shipped_digits_dataset():
    x, labels = dataset_tool.read_dataset(os.path.join(REPO, 'src', 'digits', 'digits-8x8.zip'))
    assert x.shape == (1797, 1, 8, 8) and x.dtype == np.uint8 and x.max() == 255
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    sklearn = pytest.importorskip('sklearn.datasets')
    digits = sklearn.load_digits()
    assert np.array_equal(x[:, 0], np.round(digits.images * 255 / 16).astype(np.uint8))


def test_digits_detector():
    det = detectors.get_detector('digits', 'cpu')
    assert det is detectors.get_detector('digits', torch.device('cpu'))
    assert (det.name, det.feature_dim) == ('digits', 128)
    x, labels = dataset_tool.read_dataset(os.path.join(REPO, 'src', 'digits', 'digits-8x8.zip'))
    x = torch.as_tensor(x[:200])
    features = det(x)
    assert features.shape == (200, 128) and features.dtype == torch.float32
    assert torch.equal(det(x.float()), features)
    classifier = detectors.load_digits_classifier()
    assert (classifier.classify(x).argmax(1).numpy() == labels[:200]).mean() > 0.98
    # Differentiable for float input (AdaSDE's feature loss).
    xf = x[:4].float().requires_grad_(True)
    det(xf).square().sum().backward()
    assert xf.grad is not None and xf.grad.abs().sum() > 0
    with pytest.raises(ValueError, match='unknown detector'):
        detectors.get_detector('resnet', 'cpu')


def test_a_loss_on_a_detector_follows_the_detector(monkeypatch):
    detectors.get_feature_net('digits')  # once with the real detector
    monkeypatch.setattr(detectors, 'get_detector', lambda name, device: lambda images: images.flatten(1).float())
    x, y = torch.rand(3, 1, 8, 8) * 255, torch.rand(3, 1, 8, 8) * 255
    torch.testing.assert_close(detectors.get_feature_net('digits').distance(x, y), ((x - y) ** 2).flatten(1).mean(1))


INCEPTION_SRC = '''
    """Stand-in for the Inception pickle (test fixture): 2048 features from the 3 channel means."""
    import torch
    from torch_utils import persistence

    @persistence.persistent_class
    class FakeInception(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 2048)

        def forward(self, img, return_features=False):
            assert img.shape[1] == 3 and return_features
            return self.proj(img.to(torch.float32).mean(dim=(2, 3)) / 255)
'''


def test_inception_detector_from_cache(offline):
    tmp_path, calls = offline
    module_name = f'fake_inception_{uuid.uuid4().hex[:8]}'
    (tmp_path / f'{module_name}.py').write_text(textwrap.dedent(INCEPTION_SRC))
    sys.path.insert(0, str(tmp_path))
    try:
        torch.manual_seed(0)
        net = __import__(module_name).FakeInception()
        cache = tmp_path / 'cache' / 'downloads'
        cache.mkdir(parents=True)
        md5 = hashlib.md5(detectors.INCEPTION_URL.encode()).hexdigest()
        with open(cache / f'{md5}_inception-2015-12-05.pkl', 'wb') as f:
            pickle.dump(net, f)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(module_name, None)
    detectors._cache.clear()
    try:
        det = detectors.get_detector('inception', 'cpu')
        assert (det.name, det.feature_dim) == ('inception', 2048) and calls == []
        gray = torch.randint(0, 256, [2, 1, 8, 8], dtype=torch.uint8)
        features = det(gray)
        assert features.shape == (2, 2048) and features.dtype == torch.float32
        assert torch.equal(features, net(gray.repeat(1, 3, 1, 1).float(), return_features=True))
        xf = gray.float().requires_grad_(True)
        det(xf).sum().backward()
        assert xf.grad is not None
    finally:
        detectors._cache.clear()


def test_inception_detector_offline(offline):
    detectors._cache.clear()
    with pytest.raises(ValueError, match='Inception') as err:
        detectors.get_detector('inception', 'cpu')
    assert '\n' not in str(err.value)

#----------------------------------------------------------------------------
# The command-line tools, on tiny settings.


def test_dataset_tool_cli(tmp_path):
    pytest.importorskip('sklearn')
    from click.testing import CliRunner
    result = CliRunner().invoke(dataset_tool.main, ['--source=digits', f'--dest={tmp_path / "d.zip"}',
                                                    '--max-images=5'])
    assert result.exit_code == 0, result.output
    x, labels = dataset_tool.read_dataset(str(tmp_path / 'd.zip'))
    shipped, shipped_labels = dataset_tool.read_dataset(os.path.join(REPO, 'src', 'digits', 'digits-8x8.zip'))
    assert np.array_equal(x, shipped[:5]) and labels.tolist() == shipped_labels[:5].tolist() == [0, 1, 2, 3, 4]
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'a.txt').write_text('x')
    result = CliRunner().invoke(dataset_tool.main, ['--source=digits', f'--dest={tmp_path / "full"}'])
    assert result.exit_code != 0 and 'is not empty' in result.output


def test_train_digits_cli(tmp_path):
    from click.testing import CliRunner

    import train_digits
    result = CliRunner().invoke(train_digits.main, ['denoiser', f'--outdir={tmp_path / "m"}', '--kimg=0.1',
                                                    '--batch=50', '--channels=16', '--channel_mult=1,2'])
    assert result.exit_code == 0, result.output
    net = load_model(str(tmp_path / 'm'))
    assert net.training_options['kimg'] == 0.1 and len(net.training_options['loss_curve']) == 2
    result = CliRunner().invoke(train_digits.main, ['detector', f'--outdir={tmp_path / "d"}', '--steps=3'])
    assert result.exit_code == 0, result.output
    assert 'test accuracy' in result.output
    assert detectors.load_digits_classifier(str(tmp_path / 'd')).feature_dim == 128

#----------------------------------------------------------------------------
