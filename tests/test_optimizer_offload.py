"""``offload_adamw``: AdamW stepping on host copies of the parameters equals torch's AdamW, keeps
its states on the host, survives a state_dict round trip (the run checkpoints' format) and runs in
a pipeline."""

from __future__ import annotations

import pytest
import torch
from conftest import base_config, invoke, new_registry

from qlora_plugins.builtin_plugins.optimizer_offload import host_adamw_class

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def make_params(dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=g).to(device=device, dtype=dtype)) for shape in [(7, 5), (5,), (3, 3, 2)]]


def grads_for(step: int, params):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g).to(p) for p in params]


def run(opt_cls, params, steps, schedule=True):
    opt = opt_cls(params, **HYPER)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)) if schedule else None
    for step in range(steps):
        for p, g in zip(params, grads_for(step, params)):
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched:
            sched.step()
    return opt


def test_equals_torch_adamw_on_cpu():
    ours, ref = make_params(), make_params()
    run(host_adamw_class(), ours, 6)
    run(torch.optim.AdamW, ref, 6)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_low_precision_params_step_on_fp32_host_master_copies():
    """A bf16 parameter is not its own host copy: the update runs on an fp32 master copy, exactly
    like torch's AdamW on fp32 copies, and is rounded into the parameter."""
    ours = make_params(torch.bfloat16)
    master = [torch.nn.Parameter(p.detach().float()) for p in ours]
    opt = host_adamw_class()(ours, **HYPER)
    ref = torch.optim.AdamW(master, **HYPER)
    for step in range(4):
        for p, m, g in zip(ours, master, grads_for(step, ours)):
            p.grad, m.grad = g, g.float()
        opt.step()
        ref.step()
    for p, m in zip(ours, master):
        torch.testing.assert_close(p, m.to(torch.bfloat16), rtol=0, atol=0)
    states = [s for s in opt.host_optimizer.state.values()]
    assert states and all(s["exp_avg"].device.type == "cpu" and s["exp_avg"].dtype == torch.float32 for s in states)


def test_state_dict_round_trip_through_the_checkpoint_format():
    from qlora_plugins.core.checkpointing import _flatten_optimizer, _unflatten_optimizer

    straight = make_params()
    run(host_adamw_class(), straight, 5, schedule=False)

    resumed = make_params()
    first = run(host_adamw_class(), resumed, 3, schedule=False)
    tensors, structure = _flatten_optimizer(first.state_dict())
    second = host_adamw_class()(resumed, **HYPER)
    second.load_state_dict(_unflatten_optimizer(tensors, structure))
    for step in range(3, 5):
        for p, g in zip(resumed, grads_for(step, resumed)):
            p.grad = g
        second.step()
    for a, b in zip(straight, resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_registered_with_a_note_on_cpu():
    optimizer = new_registry().create("optimizer", "offload_adamw", {"lr": 1e-3})
    assert "host memory" in optimizer.runtime_note(torch.device("cpu"))
    assert optimizer.runtime_note(torch.device("cuda")) is None
    opt = optimizer.create(make_params(), torch.device("cpu"))
    assert isinstance(opt, torch.optim.Optimizer)


@pytest.mark.slow
def test_pipeline_runs_with_offload_adamw(write_config, tmp_path):
    config = write_config(base_config(optimizer={"name": "offload_adamw", "lr": 1e-3}))
    result = invoke("run", config, "--output", tmp_path / "run", "--no-progress")
    assert result.exit_code == 0, result.output
    import json

    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["plugins"]["optimizer"]["name"] == "offload_adamw"
    assert any("offload_adamw" in note for note in report["notes"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_states_stay_on_the_host_for_cuda_params():
    ours = make_params(device="cuda")
    ref = make_params()
    opt = run(host_adamw_class(), ours, 4)
    run(torch.optim.AdamW, ref, 4)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6)
    for state in opt.host_optimizer.state.values():
        assert state["exp_avg"].device.type == "cpu" and state["exp_avg_sq"].device.type == "cpu"
    assert not opt.state  # nothing on the device
