"""Flush-to-zero of subnormal floats on every CPU thread PyTorch computes on.

``torch.set_flush_denormal`` sets the FTZ/DAZ bits of the calling thread's MXCSR register only;
PyTorch's intra-op OpenMP worker threads keep their own, so with more than one thread part of
every parallel operation still computes with subnormals (measured: half of a 2-thread
elementwise product). Threads created afterwards inherit the creating thread's setting, but the
pool usually exists already. ``set_flush_denormal`` therefore also copies the calling
thread's floating-point environment to the workers: it runs ``fesetenv`` from the C library as
the body of one OpenMP parallel region of the runtime torch is linked with (``GOMP_parallel`` of
the bundled libgomp on Linux). Where that runtime is not found, only the calling thread is set
and ``flushed_on_all_threads`` tells."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

import torch

logger = logging.getLogger("deepeq")


@functools.cache
def _runtime() -> tuple | None:
    """(GOMP_parallel, fegetenv, fesetenv address) of this process, or None."""
    try:
        with open("/proc/self/maps") as fh:
            paths = sorted({ln.split()[-1] for ln in fh if "libgomp" in ln and "/" in ln})
        libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        # already loaded by torch: the same handle, hence the same thread pool
        parallel = ctypes.CDLL(paths[0]).GOMP_parallel
    except (OSError, AttributeError, IndexError):
        return None
    parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    parallel.restype = None
    return parallel, libm.fegetenv, ctypes.cast(libm.fesetenv, ctypes.c_void_p).value


def _copy_to_workers() -> bool:
    rt = _runtime()
    if rt is None:
        return False
    parallel, fegetenv, fesetenv = rt
    env = ctypes.create_string_buffer(256)  # fenv_t is 28-32 bytes on x86-64
    if fegetenv(env) != 0:
        return False
    parallel(fesetenv, ctypes.cast(env, ctypes.c_void_p), torch.get_num_threads(), 0)
    return True


def set_flush_denormal(on: bool) -> bool:
    """``torch.set_flush_denormal(on)`` on the calling thread and on torch's intra-op worker
    threads. Returns False where the CPU cannot flush subnormals (then nothing changes)."""
    if not torch.set_flush_denormal(on):
        return False
    if torch.get_num_threads() > 1 and not _copy_to_workers():
        logger.info(
            "flush_denormal: PyTorch's OpenMP runtime (libgomp) was not found; subnormals are "
            "flushed on the main thread only."
        )
    return True


def flushed_on_all_threads() -> bool:
    """Does a parallel elementwise product over all of torch's threads flush subnormals?"""
    n = (1 << 17) * max(1, torch.get_num_threads())  # well above the parallel grain size
    x = torch.full((n,), 0x007FFFFF, dtype=torch.int32).view(torch.float32)  # largest subnormal
    return bool(((x * 1.0) == 0).all())
