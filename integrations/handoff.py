"""Run one of the project's solvers with its network calls answered from outside, one call at a time.

The solvers call `net(x, sigma)` synchronously, while a diffusers pipeline owns the loop and calls the UNet itself,
once per entry of `scheduler.timesteps`. `SolverThread` runs the solver in a worker thread whose `net` hands each
request (x, sigma) to the thread that drives it and waits for the denoised output. The two threads never run at
the same time: the worker runs only between `start()`/`answer()` and the next request it makes.

A call on several stacked copies of the batch (EPD's K points in one call) is split into one request per copy, as
the pipeline can only evaluate the batch it holds.
"""

import queue
import threading

import torch


class _Stop(BaseException):
    """Raised inside the worker to unwind a solver that will not be answered any more (not an Exception, so that
    no solver code catches it)."""


class SolverThread:
    """`run(net)` runs in a worker thread; `net(x, sigma, **extra_args)` there becomes a request (x, sigma) here.

    `start()` and `answer(denoised)` return the next request as ('call', x, sigma) with sigma one level per row, or
    ('done', result) when `run` has returned. `features` (optional) is a module the worker's net calls with the
    features handed to `answer`, so that forward hooks on it (AMED's bottleneck capture) see them.
    """

    def __init__(self, run, batch, bottleneck=None):
        self.batch = int(batch)
        self.bottleneck_module = bottleneck
        self._to_worker = queue.Queue()
        self._from_worker = queue.Queue()
        self._thread = threading.Thread(target=self._main, args=(run,), daemon=True)
        self.pending = None

    # Worker side.

    def _main(self, run):
        try:
            self._from_worker.put(('done', run(_WorkerNet(self))))
        except _Stop:
            pass
        except BaseException as e:  # handed to the driving thread, which raises it
            self._from_worker.put(('error', e))

    def _request(self, x, sigma):
        self._from_worker.put(('call', x, sigma))
        reply = self._to_worker.get()
        if reply is None:
            raise _Stop
        return reply

    # Driving side.

    def _next(self):
        message = self._from_worker.get()
        if message[0] == 'error':
            self.pending = None
            raise message[1]
        self.pending = message
        return message

    def start(self):
        self._thread.start()
        return self._next()

    def answer(self, denoised, features=None):
        if self.pending is None or self.pending[0] != 'call':
            raise RuntimeError('the solver is not waiting for a network output')
        self._to_worker.put((denoised, features))
        return self._next()

    def stop(self):
        """Unwind a worker still waiting for an answer (a run abandoned half-way)."""
        if self.pending is not None and self.pending[0] == 'call' and self._thread.is_alive():
            self._to_worker.put(None)
            self._thread.join()
        self.pending = None


class _WorkerNet:
    """The denoiser the solver sees in the worker thread."""
    bottleneck = 'features'  # AMED's BottleneckCapture hooks get_submodule('features')
    bottleneck_cond_half = False  # the driver hands the conditional half only

    def __init__(self, owner):
        self.owner = owner

    def get_submodule(self, name):
        if self.owner.bottleneck_module is None:
            raise AttributeError(name)
        return self.owner.bottleneck_module

    def __call__(self, x, sigma, **extra_args):
        batch = self.owner.batch
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        if x.shape[0] % batch:
            raise ValueError(f'a network call on {x.shape[0]} rows cannot be split into batches of {batch}')
        outputs = []
        for start in range(0, x.shape[0], batch):
            denoised, features = self.owner._request(x[start:start + batch], sigma[start:start + batch])
            if features is not None and self.owner.bottleneck_module is not None:
                self.owner.bottleneck_module(features)
            outputs.append(denoised)
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

#----------------------------------------------------------------------------
# Noise. A list of generators (diffusers' per-image `generator=[...]`) draws row i from generator i, as sample.py
# draws each row from its seed's generator (torch_utils.misc.StackedRandomGenerator) and as diffusers draws the
# initial latents; one generator draws the whole batch; none uses torch's global generator. Each draws on its own
# device, as diffusers' randn_tensor does, and the noise then moves to the state's device.


def randn_like_for(generator):
    """The solvers' `randn_like` for a diffusers `generator` argument (None, a Generator, or one per image)."""
    if generator is None:
        return torch.randn_like
    if isinstance(generator, (list, tuple)):
        generators = list(generator)

        def per_image(x):
            if x.shape[0] != len(generators):
                raise ValueError(f'{len(generators)} generators for a batch of {x.shape[0]}')
            return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=g.device)
                                for g in generators]).to(x.device)
        return per_image
    return lambda x: torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)
