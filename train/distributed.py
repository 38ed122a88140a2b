"""One run on many processes: ``torchrun --nproc_per_node=N train.py CONFIG.json``.

torchrun starts N copies of the command with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` in their environment; :func:`current` sees them and joins the
process group the first time a run is built (gloo on the CPU, NCCL on CUDA,
where rank r uses ``cuda:LOCAL_RANK``). Every rank then builds the same run
from the same seed and draws the same epoch of groups, so each training step
has the same global batch (the config's ``batch_size``) everywhere:

* each rank takes a contiguous share of the step's groups (:meth:`Group.share`)
  and computes its loss and gradients on them alone;
* after ``backward`` the gradients are combined with one ``all_reduce`` of one
  flat buffer, each rank's weighted by its share of the groups, so the sum is
  the gradient of the loss over the whole batch (also when the last step of
  an epoch does not split evenly) and every rank steps its own optimizer to
  the same weights;
* the metric sums (:class:`train.metrics.Tally`) of training and of the
  evaluation, whose groups are shared out the same way, are summed over the
  ranks before anything reads them, so every rank holds the logged numbers;
* rank 0 alone locks and prepares the run folder and writes metrics and
  checkpoints; the other ranks load the same checkpoint on ``--resume`` and
  print nothing to stdout.

Why an ``all_reduce`` of the gradients rather than DistributedDataParallel:
DDP averages gradients with equal weights (wrong for an uneven last step),
needs the forward pass to go through its wrapper (the computation lives in
coders/code.py and calls the encoder, F and the decoder itself), and its
overlap of communication with backward buys little for coders of a few
million parameters; one flat buffer per step is one collective per step, as
DDP's buckets would be for models this size.
"""
from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as tdist

from util.errors import RunDiverged, UserError

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched() -> bool:
    """Whether torchrun (or any launcher setting its variables) started this process with more than one rank."""
    return all(v in os.environ for v in ENV) and int(os.environ["WORLD_SIZE"]) > 1


@dataclass
class Share:
    """This rank's part of a step's groups and its weight in the combined gradient."""

    part: slice
    weight: float


class Group:
    """The process group of a torchrun launch, and the collectives a run needs."""

    def __init__(self, device: torch.device):
        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.cuda = device.type == "cuda"
        if self.cuda:
            if self.local_rank >= torch.cuda.device_count():
                raise UserError(f"torchrun started local rank {self.local_rank} on a node with "
                                f"{torch.cuda.device_count()} GPU(s), and each rank trains on its own GPU. Fix: pass "
                                f"--nproc_per_node={torch.cuda.device_count()} or less, or set \"device\": \"cpu\".")
            torch.cuda.set_device(self.local_rank)
        if not tdist.is_initialized():
            tdist.init_process_group("nccl" if self.cuda else "gloo")
            atexit.register(_finish)
        self.is_main = self.rank == 0

    # -- where each rank works ---------------------------------------------------------------------
    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: its own GPU (``cuda:LOCAL_RANK``) on CUDA, the CPU otherwise."""
        return torch.device("cuda", self.local_rank) if device.type == "cuda" else device

    def part(self, n: int) -> slice:
        """This rank's contiguous slice of ``n`` items (sizes differ by at most one)."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def share(self, n: int) -> Share:
        part = self.part(n)
        return Share(part, (part.stop - part.start) / n)

    # -- collectives -------------------------------------------------------------------------------
    def combine_gradients(self, params: list[torch.Tensor], weight: float) -> None:
        """Replace each rank's gradients by sum over ranks of ``weight`` x gradient, in one all_reduce.

        A parameter no rank got a gradient for keeps ``None`` (as in one process, so the
        optimizer skips it); a rank with no groups in this step contributes zeros.
        """
        if not params:
            return
        pieces = [p.grad.reshape(-1) * weight if p.grad is not None else p.new_zeros(p.numel()) for p in params]
        present = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device,
                               dtype=pieces[0].dtype)
        flat = torch.cat(pieces + [present])
        tdist.all_reduce(flat)
        offset = 0
        for p, has in zip(params, flat[-len(params):].tolist()):
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone() if has > 0 else None
            offset += n

    def sum_tally(self, tally) -> None:
        """Sum a :class:`train.metrics.Tally`'s sums and count over the ranks (a rank with none adds zeros)."""
        dev = self.device(torch.device("cuda" if self.cuda else "cpu"))
        sums = tally.sums.float() if tally.sums is not None else torch.zeros(tally.WIDTH, device=dev)
        flat = torch.cat([sums.to(dev), torch.tensor([float(tally.n)], device=dev)])
        tdist.all_reduce(flat)
        tally.sums, tally.n = flat[:-1], int(round(flat[-1].item()))

    def broadcast_modules(self, modules) -> None:
        """Every rank gets rank 0's parameters and buffers (they are built from one seed; this makes sure)."""
        for m in modules:
            if m is None:
                continue
            for t in list(m.parameters()) + list(m.buffers()):
                with torch.no_grad():
                    tdist.broadcast(t.data, 0)

    def on_main(self, fn, *args):
        """Run ``fn(*args)`` on rank 0 and hand its result (or its UserError) to every rank."""
        box: list = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn(*args))
            except UserError as exc:
                box[0] = ("error", type(exc).__name__, str(exc))
                tdist.broadcast_object_list(box, 0)
                raise
        tdist.broadcast_object_list(box, 0)
        if box[0][0] == "error":
            raise (RunDiverged if box[0][1] == "RunDiverged" else UserError)(box[0][2])
        return box[0][1]

    def main_first(self, fn):
        """``fn()`` on rank 0, then on the other ranks (rank 0 writes a file, the others read it)."""
        result: list = []
        self.on_main(lambda: result.append(fn()))
        return result[0] if self.is_main else fn()

    def prepare_folder(self, run, resume: bool, overwrite: bool) -> None:
        """Rank 0 locks and prepares the run folder (and loads the checkpoint when resuming); the
        other ranks then load that same checkpoint, so all ranks start from one state."""

        def prepare() -> bool:
            loads = resume and (run.folder / "current.pt").exists()  # what prepare_folder will do
            run.prepare_folder(resume, overwrite)
            return loads

        if self.on_main(prepare) and not self.is_main:
            run.load_state(run.folder / "current.pt")
        self.broadcast_modules([run.encoder, run.decoder, run.parity_models])


def quiet_other_ranks() -> None:
    """Under torchrun, send the standard output of every rank but 0 to /dev/null (at the file
    descriptor, so streams already handed around go quiet too): one copy of each printed line.
    Called when this module is imported, before the command prints anything; stderr stays."""
    if launched() and int(os.environ["RANK"]) != 0:
        sys.stdout.flush()
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 1)
        os.close(fd)


quiet_other_ranks()


def _finish() -> None:
    if tdist.is_initialized():
        try:
            tdist.destroy_process_group()
        except Exception:  # at exit, after a failure on another rank
            pass


_GROUP: Optional[Group] = None


def current(device: torch.device) -> Optional[Group]:
    """The torchrun process group (joined on the first call), or None in a plain single process."""
    global _GROUP
    if _GROUP is None and launched():
        _GROUP = Group(device)
    return _GROUP
