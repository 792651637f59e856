"""New gradient buffers on CPU, with the memory of large ones kept from call to call.

glibc keeps freed blocks for reuse only up to 32 MiB; a larger buffer is mapped afresh on every
call, and the OS zeroes each of its pages when the kernel's writes first touch it. For a
stacked gradient of 256 x 32000 fp32 token pairs that fault-in took longer than the kernel:
6.5 ms a fwd+bwd call against 3.6 ms with the memory reused, and 40-70 ms for the calls that
waited while the OS compacted memory into huge pages. So buffers of 32 MiB or more are mapped
here, each lent to one tensor, and the last two given back (what one call of ``rdrop_loss``
takes) wait for the next call instead of going back to the OS.
"""

import collections
import ctypes
import mmap
import weakref

import torch
from torch import Tensor

MIN_BYTES = 32 << 20  # glibc's largest mmap threshold on 64-bit: it reuses smaller blocks itself
KEPT = 2  # blocks kept when nothing holds them
# Blocks that no tensor holds. deque.append and popleft are atomic, and a block is given back
# from whichever thread frees its last tensor, so no lock (a finalizer that waited for one, run
# by a collection inside `_take`, would wait forever).
_free: collections.deque = collections.deque()
_PRIVATE = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)


def empty_like(like: Tensor) -> Tensor:
    """A new contiguous tensor of like's shape, dtype and device, its memory reused where it is
    large and on CPU. Other tensors (on other devices, fake or subclassed ones, those made while
    tracing) come from torch.empty."""
    nbytes = like.numel() * like.element_size()
    if (like.device.type != "cpu" or type(like) is not Tensor or nbytes < MIN_BYTES
            or not hasattr(mmap, "MAP_PRIVATE") or torch.compiler.is_compiling()):
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)
    block = _take(nbytes)
    view = (ctypes.c_char * nbytes).from_buffer(block)
    # Runs once the last tensor on `view` is freed: torch.frombuffer holds `view` until then.
    weakref.finalize(view, _give_back, block).atexit = False
    return torch.frombuffer(view, dtype=like.dtype, count=like.numel()).view(like.shape)


def release() -> None:
    """Unmaps the blocks that no tensor holds."""
    _free.clear()


def _take(nbytes: int) -> mmap.mmap:
    """A free block of nbytes to 2 nbytes, else a new one; free blocks of other sizes are
    dropped (the sizes in use have changed)."""
    for _ in range(len(_free)):
        try:
            block = _free.popleft()
        except IndexError:  # another thread took it
            break
        if nbytes <= len(block) <= 2 * nbytes:
            return block
    return mmap.mmap(-1, nbytes, flags=_PRIVATE)


def _give_back(block: mmap.mmap) -> None:
    _free.append(block)
    while len(_free) > KEPT:
        try:
            _free.popleft()
        except IndexError:
            break
