"""``python -m qlora_plugins``: the ``qlora`` command (what ``qlora run --nproc-per-node`` starts
on each rank through ``torch.distributed.run``)."""

from qlora_plugins.cli import main

if __name__ == "__main__":
    main()
