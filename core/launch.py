"""``qlora run --nproc-per-node N``: hand the job to torchrun's elastic agent
(``torch.distributed.run``), which starts one ``python -m qlora_plugins run ...`` per rank,
rendezvouses the nodes and stops every rank when one fails. No process manager of our own.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Sequence

from qlora_plugins.core.errors import DistributedError
from qlora_plugins.core.wording import option


def torchrun_args(
    worker_args: Sequence[str], nproc_per_node: int, nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None
) -> list[str]:
    """The ``torch.distributed.run`` command line that starts ``worker_args`` on every rank.

    :raises DistributedError: several nodes without a rendezvous endpoint.
    """
    args = ["--nproc-per-node", str(nproc_per_node), "--nnodes", str(nnodes), "--max-restarts", "0", "--monitor-interval", "0.2"]
    if nnodes > 1 or rdzv_endpoint:
        if not rdzv_endpoint:
            raise DistributedError(f"{option('rdzv_endpoint')}: name HOST:PORT of the rendezvous when {option('nnodes')} is more than 1")
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--node-rank", str(node_rank)]
    else:
        args += ["--standalone"]
    return [*args, "-m", "qlora_plugins", *worker_args]


def launch(worker_args: Sequence[str], nproc_per_node: int, nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None) -> int:
    """Run the job under torchrun's agent in this process; return the exit code (0, or the
    first failed rank's: 2 after a failure it reported in one line).

    :raises DistributedError: a rank died without a word (a signal): names the rank.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per process unless the config says otherwise
    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # the failed rank speaks for itself
    parsed = get_args_parser().parse_args(torchrun_args(worker_args, nproc_per_node, nnodes, node_rank, rdzv_endpoint))
    try:
        run(parsed)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = str(-code)
            raise DistributedError(f"rank {rank} was stopped by {name}; the other ranks were stopped") from None
        return code if code else 2
    return 0
