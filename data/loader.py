"""The loader over the example stream: a torch DataLoader (loader worker processes when asked), batches
unpacked in the training process, worker processes shut down when an epoch is cut short."""

from __future__ import annotations

import signal

import torch

from data.stream import ExampleStream


def _identity(x):
    return x


def _ignore_stop_signals(_worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGUSR1 (Slurm sends them to every process) to the training
    process, which decides when to stop; a worker killed by them would break the final checkpoint."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class BatchLoader:
    """A torch DataLoader over the stream, unpacking batches in the main process. With several workers
    the loader takes their batches round-robin, which is the global order the stream deals them in.
    ``len()`` is the batches of the current epoch. Call ``stream.set_epoch(e[, start])`` before each
    epoch (as with DistributedSampler)."""

    def __init__(self, stream: ExampleStream, pin_memory: bool = False, packed: bool = False):
        self.stream, self.packed = stream, packed
        stream.packed = True
        n = stream.num_workers if stream.num_workers > 1 else 0
        self.loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=n, collate_fn=_identity,
                                                  pin_memory=pin_memory, persistent_workers=False,
                                                  prefetch_factor=4 if n else None,
                                                  worker_init_fn=_ignore_stop_signals if n else None)

    def __iter__(self):
        """Batches, or with ``packed`` the PackedBatch buffers (to move to a device in one copy each).
        Closing the iterator early (a run that stops mid-epoch) shuts its worker processes down; left to
        the interpreter's exit, joining them would hang."""
        it = iter(self.loader)
        try:
            for packed in it:
                yield packed if self.packed else packed.unpack()
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def __len__(self) -> int:
        """Batches of the current epoch."""
        return self.stream.batches_per_epoch(self.stream.epoch) - self.stream.start


def make_loader(stream: ExampleStream, pin_memory: bool = False, packed: bool = False) -> BatchLoader:
    return BatchLoader(stream, pin_memory, packed)
