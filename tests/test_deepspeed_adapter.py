"""allo_kernels.integrations.deepspeed without an engine: the parameter selection allo_train uses, the small public
surface SparseAdamW gives adapters, and the gather contexts. (Engines: test_zero_sparse_adamw.py, 2 gloo ranks.)"""

import pytest
import torch

from allo_kernels import SparseAdamW
from allo_kernels.integrations import DEFAULT_GATHER, ParamGather, ZeRO3Gather
from allo_kernels.integrations import deepspeed as ak_deepspeed
from allo_kernels.optim._layout import make_layout


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3))


def test_select_parameters_trains_only_named_masks_and_freezes_the_rest():
    m = model()
    rows = torch.tensor([True, False, True, False, False, True])
    params, masks = ak_deepspeed.select_parameters(
        m, {"0.weight": rows, "0.bias": torch.zeros(6, dtype=torch.bool), "1.weight": torch.ones(3, dtype=torch.bool)}
    )
    assert params == [m[0].weight, m[1].weight]  # 0.bias selects nothing, 1.bias has no mask: both frozen
    assert list(masks) == [m[0].weight] and torch.equal(masks[m[0].weight], rows)  # all-True 1.weight: dense
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["0.weight", "1.weight"]
    params, masks = ak_deepspeed.select_parameters(model(), None)
    assert len(params) == 4 and masks == {}


def test_select_parameters_checks_names_and_shapes_before_reading_masks():
    m = model()
    with pytest.raises(ValueError, match=r"masks name parameters the model does not have: \['0.wieght'\]"):
        ak_deepspeed.select_parameters(m, {"0.wieght": torch.ones(6, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"must have shape \(6,\) \(rows\) or \(6, 4\) \(elements\)"):
        ak_deepspeed.select_parameters(m, {"0.weight": torch.ones(4, 6, dtype=torch.bool)})
    with pytest.raises(TypeError, match=r"dtype torch\.bool"):
        ak_deepspeed.select_parameters(m, {"0.weight": torch.ones(6)})
    assert all(p.requires_grad for p in m.parameters())  # nothing was frozen by a refused call


def test_select_parameters_takes_a_tied_weights_mask_under_either_name():
    m = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False))
    m[1].weight = m[0].weight
    mask = torch.tensor([True, False, False, False, True])
    params, masks = ak_deepspeed.select_parameters(m, {"1.weight": mask})
    assert params == [m[0].weight] and torch.equal(masks[m[0].weight], mask)


def test_sparse_adamw_surface_for_adapters():
    p, q = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))
    mask = torch.tensor([True, False, True, False])
    opt = SparseAdamW([p, q], masks={p: mask}, backend="torch")
    assert list(opt.masks) == [p] and torch.equal(opt.masks[p], mask)
    with pytest.raises(TypeError):
        opt.masks[q] = mask  # a read-only view
    assert opt.layout(p).n_compact == 6 and opt.layout(q).dense
    # An adapter steps q under a layout of its own (elements 1..3), named after what q holds.
    layout = make_layout(5, torch.tensor([1]), torch.tensor([3]))
    opt.set_layout(q, layout, holds=["model.x", "model.x", "model.y"])
    p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    before = q.detach().clone()
    opt.step()
    assert torch.equal(q[[0, 4]], before[[0, 4]]) and not torch.equal(q[1:4], before[1:4])
    with pytest.raises(RuntimeError, match="set_mask after bind"):
        opt.set_mask(p, None)
    with pytest.raises(RuntimeError, match="before the first optimizer step"):
        opt.set_layout(q, make_layout(5, torch.tensor([0]), torch.tensor([5])))
    with pytest.raises(ValueError, match="layout for 4 elements given for a tensor of 5"):
        opt.set_layout(q, make_layout(4, torch.tensor([0]), torch.tensor([4])))
    sd = opt.state_dict()
    sd["allo_layouts"][1] = {**sd["allo_layouts"][1], "param_shape": (7,)}
    with pytest.raises(ValueError, match=r"param 1 \(shape \(5,\)\) holding model.x, model.y was saved"):
        opt.load_state_dict(sd)


def test_export_state_needs_bind():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = SparseAdamW([p], masks={p: torch.ones(4, dtype=torch.bool)}, backend="torch")
    with pytest.raises(RuntimeError, match="bind"):
        ak_deepspeed.export_state(opt)


def test_gather_contexts():
    plain = torch.randn(3, 2)
    base = ParamGather()
    assert base.full_shape(plain) == (3, 2)
    with base.gathered(plain, None):
        pass
    base.gather_for_backward(plain)()
    assert isinstance(DEFAULT_GATHER, ZeRO3Gather)
    assert DEFAULT_GATHER.full_shape(plain) == (3, 2) and not ak_deepspeed.is_zero3_partitioned(plain)


class CountingGather(ParamGather):
    """A framework-free gather context that records what the op asks of it."""

    def __init__(self):
        self.calls = []

    def full_shape(self, p):
        self.calls.append("shape")
        return super().full_shape(p)

    def gathered(self, *params):
        self.calls.append("forward")
        return super().gathered(*params)

    def gather_for_backward(self, *params):
        self.calls.append("backward")
        release = super().gather_for_backward(*params)

        def counted():
            self.calls.append("release")
            release()

        return counted


def test_fused_linear_asks_its_gather_context(backend):
    import allo_kernels as ak

    backend("torch")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 5, 8, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (4, 5), generator=g)
    ctx = CountingGather()
    out = ak.fused_linear_token_logprobs(hidden, weight, labels, gather=ctx)
    out.sum().backward()
    assert ctx.calls == ["shape", "forward", "backward", "release"]
    want = torch.log_softmax(hidden.detach() @ weight.detach().t(), -1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(out.detach(), want)
    ctx = CountingGather()
    ref = -torch.rand(4, 5, generator=g)
    loss, _ = ak.preference_loss(hidden, labels, lm_head_weight=weight, ref_logprobs=ref, gather=ctx)
    loss.backward()
    assert ctx.calls == ["shape", "forward", "backward", "release"]
    with pytest.raises(TypeError, match=r"gather must be an allo_kernels\.integrations\.ParamGather"):
        ak.fused_linear_token_logprobs(hidden, weight, labels, gather=object())


def test_only_the_adapter_knows_deepspeed():
    """Outside integrations/deepspeed.py, allo_kernels reads no DeepSpeed attribute and imports no deepspeed."""
    import re
    from pathlib import Path

    root = Path(ak_deepspeed.__file__).resolve().parents[1]
    internals = re.compile(r"ds_status|ds_shape|grad_position|round_robin|_hp_mapping|partition\(\)|all_gather\(\)")
    imports = re.compile(r"^\s*(import deepspeed|from deepspeed)", re.MULTILINE)
    found = []
    for path in sorted(root.rglob("*.py")):
        if path == Path(ak_deepspeed.__file__).resolve():
            continue
        text = path.read_text(encoding="utf-8")
        found += [
            f"{path.relative_to(root)}: {m.group(0)}" for m in (*internals.finditer(text), *imports.finditer(text))
        ]
    assert found == []
    assert internals.search(Path(ak_deepspeed.__file__).read_text(encoding="utf-8"))


TWO_RANK_INIT = """
import torch
from allo_train.engine import init_distributed

rank, world, _ = init_distributed()
t = torch.tensor([float(rank + 1)])
torch.distributed.all_reduce(t)
print("sum", world, float(t))
"""


def test_two_cpu_ranks_start_past_a_stale_shm_comm_build_lock(tmp_path):
    """A process killed while DeepSpeed JIT-built its shm comm op leaves torch's lock file behind; CPU jobs used to
    wait on it forever (the CI hang). They must not build the op at all."""
    import os
    import socket
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    ext = tmp_path / "torch_extensions"
    for sub in ("py311_cpu", f"py{sys.version_info[0]}{sys.version_info[1]}_cpu"):
        (ext / sub / "deepspeed_shm_comm").mkdir(parents=True, exist_ok=True)
        (ext / sub / "deepspeed_shm_comm" / "lock").write_text("")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
        env.update(MASTER_PORT=str(port), TORCH_EXTENSIONS_DIR=str(ext), OMP_NUM_THREADS="1")
        procs.append(
            subprocess.Popen([sys.executable, "-c", TWO_RANK_INIT], env=env, stdout=subprocess.PIPE, text=True)
        )
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all("sum 2 3.0" in out for out in outs), outs
    assert not any("deepspeed_shm_comm" in out for out in outs), outs
