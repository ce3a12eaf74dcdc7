"""The student graph: equivalence with the backbone, proxy counts, shapes, frozen weights, pruning."""
from __future__ import annotations

import pytest
import timm
import torch

from tailor_cli.backbone import describe_chain
from tailor_cli.counting import student_macs
from tailor_cli.pooling import make_pool
from tailor_cli.proxies import PROXY_BUDGET, Proxy, ProxyForm, proxy_form
from tailor_cli.student import LayerSpec, Structure, Student


def _backbone_features(model, x):
    chain = describe_chain(model)
    h = chain.stem(x)
    feats = []
    for block in chain.blocks:
        h = block(h)
        feats.append(h)
    return feats


@pytest.mark.parametrize("name,size", [("test_resnet", (45, 37)), ("resnet18", (64, 64)), ("resnet26d", (50, 70))])
def test_blocks_only_student_reproduces_backbone_exactly(name, size):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=4).eval()
    # non-trivial BN statistics, so the check would catch a student that drops or re-inits them
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    n = len(describe_chain(model).blocks)
    student = Student(model, 4, structure=Structure([LayerSpec(True, []) for _ in range(n)])).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = _backbone_features(model, x)
        _, feats = student(x, return_features=True)
        alphas = student.attention()
    assert all(a.numel() == 1 and a.item() == 1.0 for a in alphas)
    for got, want in zip(feats, expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("train_bn", [False, True])
def test_attention_one_on_blocks_reproduces_backbone_with_proxies_present(train_bn):
    """Proxies present but with alpha 0 (logit -inf) also give the backbone exactly (with --train-bn too:
    its BatchNorms start from the pretrained scale and shift)."""
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    student = Student(model, 3, train_bn=train_bn).eval()
    with torch.no_grad():
        for layer in student.layers:
            layer.logits[1:] = float("-inf")
        x = torch.randn(1, 3, 40, 40)
        _, feats = student(x, return_features=True)
        expected = _backbone_features(model, x)
    for got, want in zip(feats, expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("name,layers,proxies", [("resnet34", 16, 45), ("resnet18", 8, 21), ("resnet50", 16, 45)])
def test_proxy_counts_match_the_paper(name, layers, proxies):
    student = Student(timm.create_model(name, pretrained=False), 10, max_skip=3)
    assert len(student.layers) == layers
    assert sum(len(l.sources) for l in student.layers) == proxies
    # attention initialised +2 for the block, -2 for each proxy
    first = student.layers[5].logits.tolist()
    assert first == [2.0, -2.0, -2.0, -2.0]


def test_proxy_form_is_the_most_expressive_one_within_a_twelfth_of_the_block():
    # ResNet BasicBlock 64 -> 64: 2 x 9 x 64 x 64 MACs per pixel, the dense 1x1 (64 x 64) is 1/18
    assert proxy_form(64, 64, 2 * 9 * 64 * 64) == ProxyForm("dense")
    # ResNet-50 layer2.0 from node 3 (256 -> 512): the dense 1x1 would be 1/2.6 of the block; a
    # low-rank pair of the largest width (multiple of 8) within 1/12
    # (conv1 runs at the input's 4x the output pixels; conv2 3x3 stride 2; conv3; downsample)
    block = 4 * 256 * 128 + 9 * 128 * 128 + 128 * 512 + 256 * 512
    form = proxy_form(256, 512, block)
    assert form == ProxyForm("lowrank", width=48)  # floor(475136 / 12 / 768) = 51 -> 48
    assert form.macs_per_pixel(256, 512) <= block / PROXY_BUDGET < ProxyForm("lowrank", width=56).macs_per_pixel(256, 512)
    # MobileNetV3's first block (depthwise-separable 16 -> 16, 400 MACs per pixel): a rank of 8
    # would cost 256; a 1x1 in 8 groups (32) fits
    assert proxy_form(16, 16, 16 * 9 + 16 * 16) == ProxyForm("grouped", groups=8)
    # channels without a common divisor: nothing cheaper than dense exists
    assert proxy_form(3, 5, 30) == ProxyForm("dense")


def test_proxy_modules_have_the_chosen_form():
    s50 = Student(timm.create_model("resnet50", pretrained=False), 10)
    proxy = s50.layers[3].proxies["3"]  # layer 4 (layer2.0): node 3 (256 ch) -> 512 ch
    convs = [m for m in proxy.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(48, 256, 1, 1), (512, 48, 1, 1)]
    assert isinstance(proxy.body[2], torch.nn.ReLU) and isinstance(proxy.body[-1], torch.nn.BatchNorm2d)
    s18 = Student(timm.create_model("resnet18", pretrained=False), 10)
    convs = [m for m in s18.layers[2].proxies["0"].modules() if isinstance(m, torch.nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(128, 64, 1, 1)]
    grouped = Proxy(16, 16, ProxyForm("grouped", groups=8))
    assert tuple(grouped.body[0].weight.shape) == (16, 2, 1, 1) and grouped.body[0].groups == 8


@pytest.mark.parametrize("size", [32, 33, 45, 64, 71])
def test_pooling_matches_strided_blocks_at_any_size(size):
    x = torch.randn(1, 2, size, size)
    for s in (2, 4, 8):
        h = size
        for _ in range({2: 1, 4: 2, 8: 3}[s]):
            h = (h + 1) // 2  # a 3x3 stride-2 conv with padding 1
        assert make_pool(s)(x).shape[-1] == h


def test_frozen_weights_get_no_gradient_and_trainable_ones_do():
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    student = Student(model, 3)
    loss = student(torch.randn(2, 3, 32, 32)).sum()
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in student.frozen_parameters())
    assert all(p.grad is not None for p in student.trainable_parameters())


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet"])
def test_train_bn_trains_the_backbones_batchnorm_affine_and_nothing_else_of_it(name):
    """--train-bn: exactly the backbone's BatchNorm weights and biases (outside its classifier) join the
    trainable tensors and leave the shared ones, counted naively on the timm model; one SGD step moves
    them and no frozen tensor; after pruning, only the surviving blocks' are trained."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3)
    naive = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)
                for p in (m.weight, m.bias))
    plain, bn = Student(model, 3), Student(model, 3, train_bn=True)
    count = lambda ps: sum(p.numel() for p in ps)
    assert count(bn.trainable_parameters()) - count(plain.trainable_parameters()) == naive
    assert count(plain.frozen_parameters()) - count(bn.frozen_parameters()) == naive
    task_keys = {k for k in bn.state_dict() if bn.timm_name(k) is None} - {
        k for k in plain.state_dict() if plain.timm_name(k) is None}
    assert len(task_keys) == 2 * sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert all(k.rsplit(".", 1)[1] in ("weight", "bias") and ".proxies." not in k for k in task_keys)

    frozen_before = [p.detach().clone() for p in bn.frozen_parameters()]
    bn_before = {k: v.detach().clone() for k, v in bn.state_dict().items() if k in task_keys}
    torch.nn.init.normal_(bn.fc.weight)  # the zero classifier would pass no gradient back
    opt = torch.optim.SGD(bn.trainable_parameters(), lr=0.1)
    bn.train()
    loss = torch.nn.functional.cross_entropy(bn(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in bn.frozen_parameters())
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, bn.frozen_parameters()))
    moved = [k for k, v in bn.state_dict().items() if k in bn_before and not torch.equal(v, bn_before[k])]
    assert len(moved) > len(task_keys) // 2  # (a BN whose output the loss ignores may get no gradient)

    layers = bn.structure.layers
    pruned = Structure([LayerSpec(spec.block and l % 2 == 0, spec.proxies) for l, spec in enumerate(layers)])
    bn.prune_(pruned)
    alive = {id(p) for p in bn.parameters()}
    assert all(id(p) in alive for p in bn.trainable_parameters())
    assert count(bn.trainable_parameters()) < count(plain.trainable_parameters()) + naive


def test_pruned_modules_are_gone_and_not_executed():
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    student = Student(model, 3)
    full_keys = set(student.state_dict())
    full_macs = student_macs(student, 64).total
    structure = Structure.from_json(student.structure.to_json())
    structure.layers[2].block = False  # layer 3: drop its universal block
    structure.layers[5].proxies = []  # layer 6: drop every proxy
    student.prune_(structure)
    keys = set(student.state_dict())
    assert not any(k.startswith("layers.2.block.") for k in keys)
    assert not any(k.startswith("layers.5.proxies.") for k in keys)
    assert student.layers[2].block is None
    assert len(keys) < len(full_keys)
    assert student.layers[5].logits.shape == (1,)
    assert student.layers[2].logits.shape == (3,)
    cost = student_macs(student, 64)
    assert cost.total < full_macs
    assert cost.paths[2] == [c for c in cost.paths[2]] and len(cost.paths[2]) == 3
    # a hook on every module shows that nothing removed runs
    ran = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: ran.append(n)) for n, m in student.named_modules()]
    student(torch.randn(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    assert not any(n.startswith("layers.2.block") for n in ran)
    assert "layers.6.proxies.5" in ran  # a kept proxy does run


def test_teacher_inference_tensors_can_supervise_student():
    from tailor_cli.losses import teacher_term
    from tailor_cli.student import teacher_forward

    model = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    student = Student(model, 3)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        t_logits, t_feats = teacher_forward(model, describe_chain(model), x)
    logits, feats = student(x, return_features=True)
    omega = teacher_term(logits, feats, t_logits, t_feats)
    omega.backward()
    assert omega.item() > 0
    assert student.layers[0].logits.grad is not None
