"""Run by tests/test_distributed.py under ``torch.distributed.run --nproc-per-node 2``: every
builtin quantizer's QuantLinear layers (plus a trainable LoRA-like pair) sharded by FSDP2 on gloo
give the unsharded model's output and gradients, and each rank keeps about half of the packed
bytes. Prints one JSON line per quantizer on rank 0."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from qlora_plugins.core import fsdp
from qlora_plugins.core.options import build_options
from qlora_plugins.testing import make_registry


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = torch.nn.Linear(128, 128)
        self.lora_a = torch.nn.Linear(128, 4, bias=False)
        self.lora_b = torch.nn.Linear(4, 128, bias=False)
        torch.nn.init.normal_(self.lora_b.weight, std=0.02)

    def forward(self, x):
        return x + self.base(x) + self.lora_b(self.lora_a(x))


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def build(cls, options):
    torch.manual_seed(0)
    model = Net()
    cls(build_options(cls.Options, options, "quantizer")).quantize_model(model, ["lora_a", "lora_b"])
    for name, p in model.named_parameters():
        p.requires_grad_("lora" in name)
    return model


def main() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    registry = make_registry()
    for name in sys.argv[1:]:
        cls = registry.get("quantizer", name)
        options = {"double_quant": True} if "double_quant" in attrs_fields(cls) else {}
        reference, sharded = build(cls, options), build(cls, options)
        total = fsdp.resident_quantized_bytes(sharded)
        fsdp.packed_to_parameters(sharded)
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in sharded.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        mine = fsdp.resident_quantized_bytes(sharded)
        x = torch.randn(6, 128, generator=torch.Generator().manual_seed(1))
        ref_out = reference(x)
        ref_out.square().sum().backward()
        out = sharded(x)
        out.square().sum().backward()
        grads = {n: whole(p.grad) for n, p in sharded.named_parameters() if p.requires_grad}
        ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
        result = {
            "quantizer": name,
            "out_diff": float((out - ref_out).detach().abs().max()),
            "grad_diff": max(float((grads[n] - ref_grads[n]).abs().max()) for n in ref_grads),
            "share": mine / total if total else None,
        }
        if rank == 0:
            print(json.dumps(result), flush=True)
    dist.destroy_process_group()


def whole(tensor):
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def attrs_fields(cls) -> set:
    import attrs

    return {f.name for f in attrs.fields(cls.Options)}


if __name__ == "__main__":
    main()
