"""dnnlib.util, torch_utils.misc / persistence / distributed / training_stats: EDM-compatible behaviour."""

import copy
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import urllib.request
import uuid

import pytest
import torch

import dnnlib
from dnnlib import util
from torch_utils import cli, misc, persistence, training_stats
from torch_utils import distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#----------------------------------------------------------------------------
# dnnlib.util


def test_easydict_attribute_semantics():
    d = dnnlib.EasyDict(a=1)
    d.b = 2
    assert d == {'a': 1, 'b': 2} and d.a == 1 and d['b'] == 2
    del d.a
    assert 'a' not in d
    with pytest.raises(AttributeError):
        _ = d.missing
    with pytest.raises(AttributeError):
        del d.missing
    assert not hasattr(d, 'missing') and getattr(d, 'missing', 7) == 7
    e = pickle.loads(pickle.dumps(copy.deepcopy(d)))
    assert type(e) is dnnlib.EasyDict and e.b == 2


def test_cache_dir_priority(monkeypatch, tmp_path):
    monkeypatch.setattr(util, '_dnnlib_cache_dir', None)
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'env'))
    assert dnnlib.make_cache_dir_path('downloads') == os.path.join(str(tmp_path / 'env'), 'downloads')
    util.set_cache_dir(str(tmp_path / 'set'))
    assert dnnlib.make_cache_dir_path('a', 'b') == os.path.join(str(tmp_path / 'set'), 'a', 'b')
    monkeypatch.setattr(util, '_dnnlib_cache_dir', None)
    monkeypatch.delenv('DNNLIB_CACHE_DIR')
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    assert dnnlib.make_cache_dir_path() == os.path.join(str(tmp_path / 'home'), '.cache', 'dnnlib')


def _no_network(*args, **kwargs):
    raise AssertionError('network access attempted')


def test_open_url_local_and_file_url(tmp_path):
    path = tmp_path / 'data.bin'
    path.write_bytes(b'hello')
    with util.open_url(str(path)) as f:
        assert f.read() == b'hello'
    with util.open_url(path.as_uri()) as f:
        assert f.read() == b'hello'
    assert util.open_url(str(path), return_filename=True) == str(path)
    assert util.open_url(path.as_uri(), return_filename=True) == str(path)


def test_open_url_cache_hit_without_network(monkeypatch, tmp_path):
    monkeypatch.setattr(urllib.request, 'urlopen', _no_network)
    url = 'https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz'
    url_md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    assert url_md5.startswith('fb5723973c843f2c5ec8c9c512572ae2') # Spec table (formats.md 2.3).
    cache_dir = tmp_path / 'cache'
    cache_dir.mkdir()
    (cache_dir / f'{url_md5}_anything.npz').write_bytes(b'cached')
    with util.open_url(url, cache_dir=str(cache_dir)) as f:
        assert f.read() == b'cached'

    # The default cache directory is <cache>/downloads.
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path))
    monkeypatch.setattr(util, '_dnnlib_cache_dir', None)
    (tmp_path / 'downloads').mkdir()
    (tmp_path / 'downloads' / f'{url_md5}_x').write_bytes(b'default')
    assert util.open_url(url, return_filename=True) == str(tmp_path / 'downloads' / f'{url_md5}_x')


class _FakeResponse:
    def __init__(self, data, headers):
        self.data = data
        self.headers = headers

    def __enter__(self):
        return self

    def __exit__(self, *args):
        pass

    def read(self):
        return self.data


def test_open_url_download_retries_and_saves_atomically(monkeypatch, tmp_path):
    calls = []

    def fake_urlopen(request, timeout=None):
        calls.append(request.full_url)
        if len(calls) < 3:
            raise OSError('temporary failure')
        return _FakeResponse(b'payload', {'Content-Disposition': 'attachment; filename="my file (1).npz"'})

    monkeypatch.setattr(urllib.request, 'urlopen', fake_urlopen)
    url = 'https://example.com/x/y.npz?v=1'
    cache_file = util.open_url(url, cache_dir=str(tmp_path), return_filename=True, verbose=False)
    url_md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    assert cache_file == str(tmp_path / f'{url_md5}_my_file__1_.npz')
    assert len(calls) == 3 and os.listdir(tmp_path) == [os.path.basename(cache_file)]
    with open(cache_file, 'rb') as f:
        assert f.read() == b'payload'

    # A second call is a cache hit; with too few attempts the error surfaces.
    assert util.open_url(url, cache_dir=str(tmp_path), return_filename=True) == cache_file
    calls.clear()
    with pytest.raises(OSError, match='temporary failure'):
        util.open_url('https://example.com/z.npz', cache_dir=str(tmp_path), num_attempts=2, verbose=False)
    assert len(calls) == 2


def test_open_url_empty_download(monkeypatch, tmp_path):
    monkeypatch.setattr(urllib.request, 'urlopen', lambda request, timeout=None: _FakeResponse(b'', {}))
    with pytest.raises(OSError, match='No data received'):
        util.open_url('https://example.com/e.npz', cache_dir=str(tmp_path), num_attempts=1, verbose=False)
    assert os.listdir(tmp_path) == []


def test_is_url():
    assert util.is_url('https://nvlabs-fi-cdn.nvidia.com/edm/x.pkl')
    assert not util.is_url('https://localhost/x.pkl')
    assert not util.is_url('/tmp/x.pkl')
    assert not util.is_url('file:///tmp/x.pkl')
    assert util.is_url('file:///tmp/x.pkl', allow_file_urls=True)


def test_construct_by_name():
    od = util.construct_class_by_name(class_name='collections.OrderedDict', a=1)
    assert type(od).__name__ == 'OrderedDict' and od['a'] == 1
    assert util.call_func_by_name(3.0, 4.0, func_name='math.hypot') == 5.0
    assert util.get_obj_by_name('np.linalg.norm') is __import__('numpy').linalg.norm
    assert util.get_obj_by_name('torch_utils.misc.StackedRandomGenerator') is misc.StackedRandomGenerator
    with pytest.raises(ImportError):
        util.get_obj_by_name('no_such_module_xyz.thing')


def test_format_time():
    assert util.format_time(5) == '5s'
    assert util.format_time(125) == '2m 05s'
    assert util.format_time(2 * 3600 + 5 * 60 + 9) == '2h 05m 09s'
    assert util.format_time(26 * 3600 + 3 * 60) == '1d 02h 03m'


def test_logger(tmp_path):
    log = tmp_path / 'log.txt'
    with util.Logger(file_name=str(log), file_mode='a'):
        print('line one')
    print('not logged')
    assert log.read_text() == 'line one\n'

#----------------------------------------------------------------------------
# torch_utils.misc


def test_parse_int_list():
    assert list(misc.parse_int_list('1,2,5-10')) == [1, 2, 5, 6, 7, 8, 9, 10]
    assert misc.parse_int_list('1,2,5-10').ranges == (range(1, 3), range(5, 11))
    assert list(misc.parse_int_list('0-63')) == list(range(64))
    assert list(misc.parse_int_list('7')) == [7]
    assert list(misc.parse_int_list([3, 1])) == [3, 1]
    huge = misc.parse_int_list('0-99999999,5', max_value=2**32 - 1)  # never expanded
    assert len(huge) == 10**8 + 1 and huge[-1] == 5 and huge[12345678] == 12345678 and huge.first_duplicate() == 5
    with pytest.raises(ValueError, match='4294967296 in .* is too large'):
        misc.parse_int_list('0-4294967296', max_value=2**32 - 1)
    for bad, message in [('5-2', 'Invalid range "5-2"'), ('x', 'Invalid item "x"'), ('-3', 'Invalid item "-3"'),
                         ('1,,2', 'Invalid item ""'), ('', 'Expected a list of non-negative integers')]:
        with pytest.raises(ValueError, match=message) as err:
            misc.parse_int_list(bad)
        assert '\n' not in str(err.value)


def test_int_ranges_behave_as_their_list():
    values = [9, 10, 11, 3, 4, 20, 21, 22, 23, 0, 5]
    seq = misc.IntRanges.of(values)
    assert seq.ranges == (range(9, 12), range(3, 5), range(20, 24), range(0, 1), range(5, 6))
    assert list(seq) == values and len(seq) == 11 and seq.max() == 23 and seq.first_duplicate() is None
    for i in range(-11, 11):
        assert seq[i] == values[i]
    for a in range(-12, 13):
        for b in range(-12, 13):
            assert list(seq[a:b]) == values[a:b]
    with pytest.raises(IndexError):
        seq[11]
    # Duplicates: the smallest value met twice, found from the ranges alone.
    assert misc.IntRanges([range(0, 10), range(20, 30), range(25, 26)]).first_duplicate() == 25
    assert misc.IntRanges([range(5, 9), range(0, 6)]).first_duplicate() == 5
    # Subtraction keeps the order of the left side; the right side may be in any order and overlap.
    holes = misc.IntRanges.of([10, 4, 21, 22, 0, 3, 30])
    assert list(seq.without(holes)) == [v for v in values if v not in set(holes)]
    holes = misc.IntRanges([range(10, 20), range(15, 30), range(10**8 - 1, 10**8)])
    big = misc.IntRanges([range(10**8)]).without(holes)
    assert big.ranges == (range(0, 10), range(30, 10**8 - 1))


def test_stacked_random_generator_is_per_seed():
    seeds = [3, 7, 2**32 + 11]
    rnd = misc.StackedRandomGenerator('cpu', seeds)
    x = rnd.randn([3, 2, 4])
    for i, seed in enumerate([3, 7, 11]):
        ref = torch.randn([2, 4], generator=torch.Generator('cpu').manual_seed(seed))
        assert torch.equal(x[i], ref)
        assert torch.equal(misc.StackedRandomGenerator('cpu', [seed]).randn([1, 2, 4])[0], ref)

    # The draw after the first one continues each seed's own stream, whatever the batch.
    y = rnd.randn_like(torch.zeros([3, 5], dtype=torch.float64))
    single = misc.StackedRandomGenerator('cpu', [7])
    single.randn([1, 2, 4])
    assert y.dtype == torch.float64
    assert torch.equal(y[1], single.randn_like(torch.zeros([1, 5], dtype=torch.float64))[0])
    labels = misc.StackedRandomGenerator('cpu', seeds).randint(10, size=[3])
    assert labels.shape == (3,) and labels[0] == torch.randint(10, size=[], generator=torch.Generator().manual_seed(3))


def test_stacked_random_generator_draws_rows_in_place_as_fresh_generators_do():
    # Each row is drawn straight into the result; the numbers are those of a generator of its own, for every dtype
    # and for rows under 16 values (torch's normal kernel takes another path there).
    for shape in ([4, 7], [2, 15], [3, 16], [2, 3, 5, 5], [1, 1]):
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            seeds = [5, 6, 9, 11][:shape[0]]
            x = misc.StackedRandomGenerator('cpu', seeds).randn(shape, dtype=dtype)
            for row, seed in zip(x, seeds):
                ref = torch.randn(shape[1:], generator=torch.Generator().manual_seed(seed), dtype=dtype)
                assert row.dtype == dtype and torch.equal(row, ref)
    assert misc.StackedRandomGenerator('cpu', []).randn([0, 3]).shape == (0, 3)

def test_noise_ahead_gives_the_numbers_of_drawing_on_demand():
    seeds = [4, 8, 15]

    def on_demand(shapes):
        rnd = misc.StackedRandomGenerator('cpu', seeds)
        rnd.randn([3, 2])  # the latents come first
        return [rnd.randn_like(torch.zeros([3, *shape], dtype=dtype)) for shape, dtype in shapes]

    def ahead(plan, shapes):
        rnd = misc.StackedRandomGenerator('cpu', seeds)
        rnd.randn([3, 2])
        noise = misc.NoiseAhead(rnd, [(shape, dtype, torch.device('cpu')) for shape, dtype in plan])
        out = [noise.randn_like(torch.zeros([3, *shape], dtype=dtype)) for shape, dtype in shapes]
        return out, noise

    f32, f64 = torch.float32, torch.float64
    asked = [((5,), f64), ((5,), f64), ((2, 3), f32), ((5,), f64)]
    expected = on_demand(asked)
    for plan, given in [(asked, 4),                        # foreseen: all four drawn ahead
                        (asked + [((7,), f64)], 4),        # a call more in the plan: never drawn for the solver
                        (asked[:2], 2),                    # fewer: the rest on demand
                        (asked[:1] + asked[2:], 1),        # the second call differs: rewind after one
                        ([((5,), f32)] * 4, 0),            # the dtype differs at once
                        ([], 0)]:
        out, noise = ahead(plan, asked)
        assert all(torch.equal(a, b) for a, b in zip(out, expected)), plan
        assert noise.given == given and noise.calls == [(s, d, torch.device('cpu')) for s, d in asked]
    # After a rewind the stream goes on as on demand, also for draws after the batch's noise.
    out, noise = ahead(asked[1:], asked)
    rnd = misc.StackedRandomGenerator('cpu', seeds)
    rnd.randn([3, 2])
    for shape, dtype in asked:
        rnd.randn([3, *shape], dtype=dtype)
    assert torch.equal(noise.rnd.randn([3, 4]), rnd.randn([3, 4]))


#----------------------------------------------------------------------------
# Atomic writes


def test_atomic_write_bytes(tmp_path):
    path = tmp_path / 'new' / 'folder' / 'a.png'
    misc.atomic_write_bytes(str(path), b'x' * 70000)  # the folder is made
    assert path.read_bytes() == b'x' * 70000
    misc.atomic_write_bytes(str(path), memoryview(b'second'))  # replaces
    assert path.read_bytes() == b'second'
    # The mode is that of a plain write: 0666 less the umask.
    old = os.umask(0o027)
    try:
        misc.atomic_write_bytes(str(tmp_path / 'b.png'), b'b')
        with open(tmp_path / 'c.png', 'wb') as f:
            f.write(b'c')
    finally:
        os.umask(old)
    assert (tmp_path / 'b.png').stat().st_mode & 0o777 == (tmp_path / 'c.png').stat().st_mode & 0o777 == 0o640
    # A failed rename (the target is a folder) leaves the target as it was and no temporary file.
    (tmp_path / 'd.png').mkdir()
    with pytest.raises(OSError):
        misc.atomic_write_bytes(str(tmp_path / 'd.png'), b'd')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['b.png', 'c.png', 'd.png', 'new']
    assert os.listdir(tmp_path / 'd.png') == [] and os.listdir(path.parent) == ['a.png']


MEMORY_PROBE = """
import resource, sys
from torch_utils import cli
print(cli.apply_memory_policy() if sys.argv[1] == 'on' else False)
import torch
x = torch.randn(64, 3, 32, 32, dtype=torch.float64)  # 1.5 MiB, a batch of solver state
for _ in range(20):
    y = (x * 1.5 - x * 0.5) / 2
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    y = (x * 1.5 - x * 0.5) / 2
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc')
def test_memory_policy_keeps_freed_blocks():
    env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}
    faults = {}
    for state in ('off', 'on'):
        out = subprocess.run([sys.executable, '-c', MEMORY_PROBE, state], cwd=REPO, env=dict(env, OMP_NUM_THREADS='1'),
                             capture_output=True, text=True, check=True).stdout.split()
        assert out[0] == ('True' if state == 'on' else 'False')
        faults[state] = int(out[1])
    # Without the policy the temporaries of 1.5 MiB (384 pages each) keep coming back as fresh pages in every round
    # (glibc's own threshold catches some: 14,000-27,000 faults in the 100 rounds here); with it the heap serves them
    # again (0-768 faults all told, never more than one round's 4 x 384).
    assert faults['on'] <= 4 * 384 < 5000 < faults['off'], faults
    assert not cli.apply_memory_policy(dict(MALLOC_MMAP_THRESHOLD_='65536'))  # the environment wins


def test_constant_and_assert_shape():
    c = misc.constant([1.0, 2.0], shape=[3, 2])
    assert c.shape == (3, 2) and torch.equal(c[2], torch.tensor([1.0, 2.0]))
    assert misc.constant([1.0, 2.0], shape=[3, 2]) is c
    misc.assert_shape(c, [None, 2])
    with pytest.raises(AssertionError, match='dimension 1'):
        misc.assert_shape(c, [3, 4])
    with pytest.raises(AssertionError, match='number of dimensions'):
        misc.assert_shape(c, [3])


def test_copy_params_and_buffers():
    torch.manual_seed(0)
    src, dst = torch.nn.BatchNorm1d(4), torch.nn.BatchNorm1d(4)
    with torch.no_grad():
        src.weight.normal_()
        src.running_mean.normal_()
    misc.copy_params_and_buffers(src, dst, require_all=True)
    for (name, a), (_, b) in zip(misc.named_params_and_buffers(src), misc.named_params_and_buffers(dst)):
        assert torch.equal(a, b), name
    with pytest.raises(AssertionError, match='Missing tensor'):
        misc.copy_params_and_buffers(torch.nn.Sequential(src), dst, require_all=True)

#----------------------------------------------------------------------------
# torch_utils.persistence

_PERSIST_SRC = '''
import torch

from torch_utils import persistence

SCALE = 3.0


@persistence.persistent_class
class Affine(torch.nn.Module):
    def __init__(self, dim, offset=1.0):
        super().__init__()
        self.dim = dim
        self.weight = torch.nn.Parameter(torch.arange(dim * dim, dtype=torch.float32).reshape(dim, dim) / 10)
        self.register_buffer('bias', torch.full([dim], offset))
        self.act = torch.nn.Tanh()

    def forward(self, x):
        return SCALE * self.act(x @ self.weight.T + self.bias)


@persistence.persistent_class
class Holder:
    def __init__(self, net, label):
        self.net = net
        self.label = label
'''

_CHILD_SRC = '''
import importlib.util, json, pickle, sys
import torch
from torch_utils import persistence
assert importlib.util.find_spec(sys.argv[2]) is None, 'the defining module must not be importable here'
hooked = []
def hook(meta):
    hooked.append(meta.class_name)
    return meta
persistence.import_hook(hook)
with open(sys.argv[1], 'rb') as f:
    data = f.read()
a, b = pickle.loads(data), pickle.loads(data)
hooked_at_load = list(hooked)
x = torch.linspace(-1, 1, 12).reshape(4, 3)
print(json.dumps(dict(
    out=a.net(x).tolist(), label=a.label, dim=a.net.dim, hooked=hooked_at_load, module=type(a.net).__module__,
    same_class=type(a.net) is type(b.net), persistent=persistence.is_persistent(a.net),
    init_args=list(a.net.init_args), init_kwargs=a.net.init_kwargs, training=a.net.training,
    resaved_src=pickle.loads(pickle.dumps(a.net))._orig_module_src == a.net._orig_module_src)))
'''


@pytest.fixture
def persist_module(tmp_path, monkeypatch):
    """Import a freshly written module that defines persistent classes from a temporary folder."""
    name = f'persist_test_{uuid.uuid4().hex}'
    (tmp_path / f'{name}.py').write_text(_PERSIST_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(name)
    yield module
    sys.modules.pop(name, None)


def test_persistence_round_trip_in_fresh_process(persist_module, tmp_path):
    net = persist_module.Affine(3, offset=0.5).eval()
    holder = persist_module.Holder(net, 'hello')
    assert persistence.is_persistent(net) and persistence.is_persistent(persist_module.Affine)
    assert not persistence.is_persistent(torch.nn.Linear(1, 1))
    assert net.init_args == (3,) and net.init_kwargs == {'offset': 0.5}
    x = torch.linspace(-1, 1, 12).reshape(4, 3)
    expected = net(x).tolist()

    # The pickle names the reconstruction function and embeds the module source with format version 6.
    data = pickle.dumps(holder)
    assert b'_reconstruct_persistent_obj' in data and b'SCALE = 3.0' in data
    fields = net.__reduce__()
    assert fields[0] is persistence._reconstruct_persistent_obj and fields[2] is None
    assert list(fields[1][0].keys()) == ['type', 'version', 'module_src', 'class_name', 'state']
    assert fields[1][0]['version'] == 6 and fields[1][0]['class_name'] == 'Affine'

    pkl = tmp_path / 'holder.pkl'
    pkl.write_bytes(data)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='1')
    res = subprocess.run([sys.executable, '-c', _CHILD_SRC, str(pkl), persist_module.__name__],
        cwd=str(tmp_path / '..'), env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out['out'] == expected
    assert out['label'] == 'hello' and out['dim'] == 3 and out['training'] is False
    # Hooks run once per rebuilt object, children first; Holder also holds the deep copy of `net` in _init_args.
    assert out['hooked'] == ['Affine', 'Affine', 'Holder'] * 2
    assert out['module'].startswith('_imported_module_')
    assert out['same_class'] and out['persistent'] and out['resaved_src']
    assert out['init_args'] == [3] and out['init_kwargs'] == {'offset': 0.5}


def test_import_hook_patches_source(persist_module, monkeypatch):
    net = persist_module.Affine(2)
    x = torch.ones(1, 2)

    def hook(meta):
        meta.module_src = meta.module_src.replace('SCALE = 3.0', 'SCALE = -1.0')
        return meta

    monkeypatch.setattr(persistence, '_import_hooks', [hook])
    loaded = pickle.loads(pickle.dumps(net))
    assert torch.allclose(loaded(x), net(x) / -3.0)
    assert type(loaded).__module__ != type(net).__module__


def test_version_and_type_checks(persist_module):
    meta = dict(type='class', version=5, module_src=_PERSIST_SRC, class_name='Holder', state={})
    with pytest.raises(AssertionError):
        persistence._reconstruct_persistent_obj(meta)
    with pytest.raises(AssertionError):
        persistence._reconstruct_persistent_obj(dict(meta, version=6, type='function'))
    obj = persistence._reconstruct_persistent_obj(dict(meta, version=6, state=dict(label='x', net=None)))
    assert obj.label == 'x' and type(obj).__name__ == 'Holder'
    assert persistence._version == 6


def test_unpicklable_state_is_rejected(persist_module):
    with pytest.raises((pickle.PicklingError, AttributeError), match="pickle"):
        persist_module.Holder(lambda v: v, 'lambda is not pickleable')


class _CudaStorage:
    """Pickles like a tensor storage that was saved on cuda:0 (torch.storage._load_from_bytes of a legacy blob)."""

    def __reduce__(self):
        buf = io.BytesIO()
        torch.save(torch.arange(4.0), buf, _use_new_zipfile_serialization=False)
        blob = buf.getvalue().replace(b'X\x03\x00\x00\x00cpu', b'X\x06\x00\x00\x00cuda:0')
        return (torch.storage._load_from_bytes, (blob,))


@pytest.mark.skipif(torch.cuda.is_available(), reason='tests the CPU fallback for CUDA storages')
def test_load_network_pickle_maps_cuda_storages_to_cpu(tmp_path):
    data = pickle.dumps(dict(ema=_CudaStorage()))
    with pytest.raises(RuntimeError, match='CUDA'):
        pickle.loads(data)
    loaded = persistence.load_network_pickle(io.BytesIO(data))
    assert torch.equal(loaded['ema'], torch.arange(4.0))
    (tmp_path / 'net.pkl').write_bytes(data)
    assert torch.equal(persistence.load_network_pickle(str(tmp_path / 'net.pkl'))['ema'], torch.arange(4.0))

#----------------------------------------------------------------------------
# torch_utils.distributed and training_stats (single process)


def test_distributed_single_process(monkeypatch):
    for key in ['MASTER_ADDR', 'MASTER_PORT', 'RANK', 'LOCAL_RANK', 'WORLD_SIZE']:
        monkeypatch.setenv(key, '') # Recorded, so the values init() fills in are removed after the test.
        monkeypatch.delenv(key)
    dist.init()
    assert not torch.distributed.is_initialized()
    assert os.environ['WORLD_SIZE'] == '1' and os.environ['MASTER_PORT'] == '29500'
    assert dist.get_rank() == 0 and dist.get_world_size() == 1
    assert dist.device().type == ('cuda' if torch.cuda.is_available() else 'cpu')
    dist.barrier()
    t = torch.tensor([1.5, 2.0])
    assert dist.all_reduce(t) is t and torch.equal(t, torch.tensor([1.5, 2.0]))
    assert dist.should_stop() is False and dist.update_progress(1, 2) is None


def test_training_stats_collector():
    collector = training_stats.Collector(regex='Test/.*')
    training_stats.report('Test/loss', torch.tensor([1.0, 2.0, 3.0]))
    training_stats.report0('Test/loss', 5.0)
    training_stats.report('Other/x', 1.0)
    collector.update()
    assert collector.names() == ['Test/loss']
    assert collector.num('Test/loss') == 4 and collector.mean('Test/loss') == 2.75
    assert collector.std('Test/loss') == pytest.approx((((1 + 4 + 9 + 25) / 4) - 2.75 ** 2) ** 0.5, rel=1e-12)
    assert collector['Test/loss'] == 2.75 and collector.as_dict()['Test/loss'].num == 4

    # Nothing reported since the last update: keep_previous keeps the old values.
    collector.update()
    assert collector.num('Test/loss') == 4
    fresh = training_stats.Collector(regex='Test/.*', keep_previous=False)
    fresh.update()
    assert fresh.num('Test/loss') == 0 and fresh.mean('Test/loss') != fresh.mean('Test/loss')

#----------------------------------------------------------------------------


def test_bench_scripts_import_the_project_without_a_path_hack():
    """`python bench/<x>.py` puts bench/ first on sys.path: no script there may shadow a project package or
    module, and none inserts a path of its own."""
    import glob
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    project = {os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(root, '*', '__init__.py'))}
    project |= {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(root, '*.py'))}
    for script in glob.glob(os.path.join(root, 'bench', '*.py')):
        assert os.path.splitext(os.path.basename(script))[0] not in project, script
        assert 'sys.path.insert' not in open(script).read(), script


def test_pickle_or_safetensors_by_first_bytes(tmp_path):
    """A safetensors header of 640 bytes begins 0x80 0x02, the opening of a protocol-2 pickle: the JSON that follows
    tells them apart (a predictor with such a header was once taken for an official snapshot)."""
    import safetensors.torch

    from models import sniff_model_file
    from solvers.snapshot import read_predictor_file
    from torch_utils.misc import starts_a_pickle
    path = tmp_path / 'p.safetensors'
    for n in range(1000):
        safetensors.torch.save_file({'w': torch.zeros(2)}, path, metadata=dict(format='adasde-predictor', pad='x' * n))
        if path.read_bytes()[:2] == b'\x80\x02':
            break
    head = path.read_bytes()[:9]
    assert head[:2] == b'\x80\x02' and not starts_a_pickle(head, path.stat().st_size)
    assert read_predictor_file(path, 'AdaSDE')[0]['format'] == 'adasde-predictor'
    assert sniff_model_file(path) == 'predictor'
    for protocol in (2, 4, 5):
        data = pickle.dumps({'ema': list(range(100))}, protocol=protocol)
        assert starts_a_pickle(data[:9], len(data))
    (tmp_path / 'net.pkl').write_bytes(pickle.dumps({'ema': 1}, protocol=2))
    assert sniff_model_file(tmp_path / 'net.pkl') == 'pickle' and read_predictor_file(tmp_path / 'net.pkl', 'x') is None
