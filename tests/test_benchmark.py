"""examples/benchmark.py runs and reports what it promises, and the speed-ups it measures
(in student.py / losses.py) compute exactly what the plain formulation computes.

No test here asserts a timing: timings depend on the machine.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from tailor_cli.backbone import describe_chain
from tailor_cli.losses import mse, relative_se, teacher_term
from tailor_cli.pooling import MaxPool2d, _max_pool_nograd, make_pool
from tailor_cli.student import Structure, Student, teacher_forward

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("nettailor_benchmark", ROOT / "examples" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- the benchmark
TINY = ["--backbone", "test_resnet", "--batch-size", "4", "--img-size", "32", "--repeats", "1", "--warmup", "0",
        "--batch1-iters", "1", "--threads", "1"]  # one thread: no OpenMP spinning on a busy test machine


def test_benchmark_json_has_every_measurement(capsys, monkeypatch):
    bench = _load_benchmark()

    def in_process(argv, kinds=("finetune", "tailor")):  # the fresh processes are tested below
        return {kind: bench.memory_child(bench.parse_args([*argv, "--_memory-child", kind])) for kind in kinds}

    monkeypatch.setattr(bench, "measure_memory", in_process)
    res = bench.main([*TINY, "--json"])
    out = capsys.readouterr().out
    assert json.loads(out) == json.loads(json.dumps(res))  # exactly one JSON document on stdout
    assert len(out.strip().splitlines()) == 1

    cfg = res["config"]
    assert (cfg["backbone"], cfg["batch_size"], cfg["img_size"], cfg["device"]) == ("test_resnet", 4, 32, "cpu")
    assert cfg["amp"] is False and cfg["channels_last"] is False and cfg["repeats"] == 1

    for side in ("finetune", "tailor"):
        row = res["train"][side]
        assert row["seconds"] > 0 and row["images_per_s"] > 0 and len(row["all_seconds"]) == 1
        assert isinstance(row["cpu_seconds"], float)
    assert math.isclose(res["train"]["ratio"], res["train"]["tailor"]["seconds"] / res["train"]["finetune"]["seconds"])
    # the MAC floor counts forward and backward: a fine-tuning step is about 3 forward passes
    macs = res["train"]["macs"]
    assert 2.5 * res["macs"]["full"] * 4 < macs["finetune"] < 3.5 * res["macs"]["full"] * 4  # batch 4
    assert math.isclose(res["train"]["mac_ratio"], macs["tailor"] / macs["finetune"])
    # tailor: a teacher forward and a student forward (all blocks plus proxies), then a backward
    assert 2.0 * res["macs"]["full"] * 4 < macs["tailor"] < 4.0 * res["macs"]["full"] * 4
    assert cfg["cpu_model"]

    mem = res["memory"]
    assert isinstance(mem["finetune"]["peak_bytes"], int) and isinstance(mem["tailor"]["peak_bytes"], int)
    # in this process the peak may predate the step (0 growth); fresh processes are tested below
    assert mem["finetune"]["peak_bytes"] >= 0 and mem["tailor"]["peak_bytes"] >= 0
    assert math.isclose(mem["ratio"], mem["tailor"]["peak_bytes"] / max(mem["finetune"]["peak_bytes"], 1))

    macs = res["macs"]
    assert all(isinstance(macs[k], int) and macs[k] > 0 for k in ("full", "student_full", "pruned"))
    assert macs["pruned"] < macs["student_full"]
    assert math.isclose(macs["full_over_pruned"], macs["full"] / macs["pruned"])
    assert res["pruned_structure"]["blocks"] == 4 - cfg["drop_blocks"]

    for key, n in (("batch_1", 1), ("batch_b", 4)):
        row = res["inference"][key]
        assert row["batch_size"] == n
        assert row["full"]["images_per_s"] > 0 and row["pruned"]["images_per_s"] > 0
        assert math.isclose(row["speedup"], row["pruned"]["images_per_s"] / row["full"]["images_per_s"])
        assert math.isclose(row["efficiency"], row["speedup"] / row["mac_ratio"])

    targets = res["targets"]
    assert set(targets) == {"train_step_ratio", "memory_ratio", "inference_efficiency_batch_1",
                            "inference_efficiency_batch_b"}
    for t in targets.values():
        assert isinstance(t["value"], float) and isinstance(t["limit"], float) and isinstance(t["pass"], bool)
    assert targets["train_step_ratio"]["limit"] == 1.1 and targets["memory_ratio"]["limit"] == 1.25
    assert isinstance(res["all_pass"], bool)


def test_memory_is_measured_in_a_fresh_process():
    bench = _load_benchmark()
    res = bench.measure_memory(TINY, kinds=("finetune",))
    assert set(res) == {"finetune"}
    assert isinstance(res["finetune"]["peak_bytes"], int) and res["finetune"]["peak_bytes"] > 0
    assert "fresh process" in res["finetune"]["method"]


def test_benchmark_table_without_json(capsys):
    bench = _load_benchmark()
    threads = torch.get_num_threads()
    bench.main(["--backbone", "test_resnet", "--batch-size", "2", "--img-size", "32", "--repeats", "1",
                "--warmup", "0", "--batch1-iters", "1", "--no-memory", "--drop-blocks", "1", "--threads", "1"])
    assert torch.get_num_threads() == threads  # restored
    out = capsys.readouterr().out
    assert "tailor / finetune" in out and "targets:" in out and "memory_ratio" in out


def test_pruned_structure_is_what_pruning_can_produce():
    bench = _load_benchmark()
    student = Student(timm.create_model("resnet18", pretrained=False), 3)
    k, structure = bench.pruned_structure(student, 3)
    assert k == 3 and structure.counts()["blocks"] == 5
    assert all(spec.alive for spec in structure.layers)
    student.prune_(structure)  # a valid sub-structure
    student.eval()(torch.randn(1, 3, 32, 32))


# --------------------------------------------------------------------------- fast paths are exact
@pytest.mark.parametrize("stride", [2, 4, 8])
@pytest.mark.parametrize("size", [(1, 1), (2, 3), (5, 5), (16, 16), (17, 9), (33, 45)])
def test_separable_max_pool_equals_the_kernel(stride, size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size)
    x[0, 0, 0, 0] = float("nan")
    x[1, 2, -1, -1] = float("-inf")
    x[1, 1] = x[1, 1].clamp_min(0)  # ties
    pool = make_pool(stride)
    want = F.max_pool2d(x, stride + 1, stride, stride // 2)
    got = _max_pool_nograd(x, (stride + 1,) * 2, (stride,) * 2, (stride // 2,) * 2)
    assert got.shape == want.shape
    assert torch.equal(torch.nan_to_num(got, nan=7.0), torch.nan_to_num(want, nan=7.0))
    assert torch.isnan(got).sum() == torch.isnan(want).sum()
    with torch.inference_mode():
        big = torch.relu(torch.randn(4, 64, 33, 31))  # large enough for the fast path
        assert torch.equal(pool(big), nn.MaxPool2d.forward(pool, big))


def test_pool_with_gradient_routes_ties_like_the_kernel():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(8, 64, 16, 16)).round()  # many ties
    g = torch.randn(8, 64, 8, 8)
    pool = make_pool(2)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    pool(a).backward(g)  # fast path
    nn.MaxPool2d.forward(pool, b).backward(g)  # PyTorch's NCHW kernel
    assert torch.equal(a.grad, b.grad)


def test_student_stem_is_counted_and_runs_the_fast_pool():
    student = Student(timm.create_model("test_resnet", pretrained=False), 3)
    assert isinstance(student.stem.maxpool, MaxPool2d)
    assert set(student.state_dict()) == set(Student(timm.create_model("test_resnet", pretrained=False), 3).state_dict())


def _reference_forward(student: Student, x: torch.Tensor):
    """The student's graph written plainly: x_l = act(sum_k alpha_lk * path_k)."""
    alphas = student.attention()
    h = x
    for m in student.stem:
        h = nn.MaxPool2d.forward(m, h) if isinstance(m, nn.MaxPool2d) else m(h)
    nodes = [h] + [None] * len(student.layers)
    for l, layer in enumerate(student.layers, 1):
        if not layer.alive:
            continue
        a = alphas[l - 1]
        paths = [layer.block(nodes[l - 1])] if layer.block is not None else []
        for src in layer.sources:
            pool = student.pools[str(student.stride(src, l))]
            pooled = nn.MaxPool2d.forward(pool, nodes[src]) if isinstance(pool, nn.MaxPool2d) else nodes[src]
            paths.append(layer.proxies[str(src)].body(pooled))
        # (a single path has alpha exactly 1 and is not multiplied, so its logit gets no gradient)
        nodes[l] = layer.act(paths[0] if len(paths) == 1 else sum(a[k] * p for k, p in enumerate(paths)))
    return student.fc(nodes[-1].mean(dim=(2, 3))), nodes[1:]


@pytest.mark.parametrize("name,size", [("test_resnet", 32), ("resnet14t", 32)])  # basic and bottleneck proxies
def test_student_forward_and_gradients_equal_the_plain_formula(name, size, monkeypatch):
    """Attention folded into the proxies' BN, fused block weighting, in-place sums and the fast
    pools change nothing but rounding: in float64 the student equals the plain formula."""
    import tailor_cli.pooling as pooling_module

    monkeypatch.setattr(pooling_module, "_FAST_POOL_MIN_NUMEL", 0)  # fast pools even on tiny tensors
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3).double()
    fast = Student(model, 3).double().train()
    with torch.no_grad():
        for layer in fast.layers:
            layer.logits.normal_()
        for m in fast.modules():
            if isinstance(m, nn.BatchNorm2d) and m.weight.requires_grad:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    structure = Structure.from_json(fast.structure.to_json())
    structure.layers[1].block = False  # a layer made of proxies only
    structure.layers[2].proxies = []  # a layer with its block only
    fast.prune_(structure)
    ref = copy.deepcopy(fast)
    teacher = timm.create_model(name, pretrained=False, num_classes=3).double().eval()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.inference_mode():
        t_logits, t_feats = teacher_forward(teacher, describe_chain(teacher), x)

    got_logits, got_feats = fast(x, return_features=True)
    want_logits, want_feats = _reference_forward(ref, x)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-10, atol=1e-12)
    for g, w in zip(got_feats, want_feats):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    teacher_term(got_logits, got_feats, t_logits, t_feats, kind="mse").backward()
    want_omega = (F.mse_loss(want_logits.float(), t_logits.float())
                  + sum(F.mse_loss(w.float(), t.float()) for w, t in zip(want_feats, t_feats))) / len(want_feats)
    want_omega.backward()
    fast_params, ref_params = dict(fast.named_parameters()), dict(ref.named_parameters())
    assert any(p.grad is not None for p in fast_params.values())
    for key, p in fast_params.items():
        q = ref_params[key]
        assert (p.grad is None) == (q.grad is None), key
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=key)  # float32 MSE
    for (key, a), (_, b) in zip(fast.named_buffers(), ref.named_buffers()):  # running statistics
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=key)
    # inference (nodes freed as soon as no later layer reads them) gives the same logits
    fast.eval()
    ref.eval()
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), _reference_forward(ref, x)[0], rtol=1e-10, atol=1e-12)


def test_mse_matches_autograd_and_accepts_inference_targets():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    with torch.inference_mode():
        t = torch.randn(3, 4, 5, 5)
    y = x.detach().clone().requires_grad_()
    got = mse(x, t)
    want = (y - t.clone()).square().mean()
    torch.testing.assert_close(got, want)
    (got * 3).backward()
    (want * 3).backward()
    torch.testing.assert_close(x.grad, y.grad)
    xb = x.detach().bfloat16().requires_grad_()
    mse(xb, t).backward()
    assert xb.grad.dtype == torch.bfloat16


def test_relative_error_matches_autograd_and_ignores_the_activation_scale():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    with torch.inference_mode():
        t = torch.randn(3, 4, 5, 5) + 0.5
    y = x.detach().clone().requires_grad_()
    got = relative_se(x, t)
    want = (y - t.clone()).square().sum() / ((t.clone().square().sum() + y.detach().square().sum()) / 2)
    torch.testing.assert_close(got, want)
    (got * 3).backward()
    (want * 3).backward()
    torch.testing.assert_close(x.grad, y.grad)
    # the same relative error whatever the family's activation magnitudes: x100 changes nothing
    with torch.inference_mode():
        t100 = t * 100
    torch.testing.assert_close(relative_se(x.detach() * 100, t100), got.detach())
    assert mse(x.detach() * 100, t100).item() > 1000 * mse(x.detach(), t).item()
