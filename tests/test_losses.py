"""E[C] against a hand computation, the teacher term, and the logit distillation."""
from __future__ import annotations

import itertools
import math

import pytest
import timm
import torch

from tailor_cli.backbone import describe_chain
from tailor_cli.counting import path_costs
from tailor_cli.losses import ComplexityModel, logit_distillation, teacher_term
from tailor_cli.objectives import StudentObjective
from tailor_cli.student import LayerSpec, Structure, Student


def _small_graph():
    # 3 layers, max_skip 2: layer1 <- {block(0), p0}; layer2 <- {block(1), p1, p0}; layer3 <- {block(2), p2, p1}
    structure = Structure.full(3, 2)
    costs = [[0.30, 0.02], [0.25, 0.03, 0.01], [0.20, 0.04, 0.05]]
    return structure, costs


def _hand_ec(structure, costs, alphas):
    """Direct transcription of docs/method.md, independent of the implementation's scatter-products."""
    L = structure.num_layers
    paths = []  # (source, target, cost, alpha)
    for l, spec in enumerate(structure.layers, 1):
        sources = ([l - 1] if spec.block else []) + spec.proxies
        for src, c, a in zip(sources, costs[l - 1], alphas[l - 1]):
            paths.append((src, l, c, a))

    def p_in(i):
        return 0.0 if i == 0 else math.prod(1 - a for s, t, c, a in paths if t == i)

    def p_out(j):
        return 0.0 if j == L else math.prod(1 - a for s, t, c, a in paths if s == j)

    return sum(c * (a - p_in(s) - p_out(t)) for s, t, c, a in paths)


def test_expected_complexity_matches_hand_computation():
    structure, costs = _small_graph()
    model = ComplexityModel(structure, costs)
    alphas = [[0.7, 0.3], [0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]
    got = model([torch.tensor(a) for a in alphas]).item()
    assert abs(got - _hand_ec(structure, costs, alphas)) < 1e-6
    # a worked value for one path, to pin the formula itself:
    # path block 1->2: c=0.25, alpha=0.5, P_in(1) = (1-0.7)(1-0.3) = 0.21, P_out(2) = (1-0.1... reads of node 2) = (1-0.6)
    assert abs(_hand_ec(structure, costs, alphas) - got) < 1e-6


def test_expected_complexity_uses_true_source_of_long_skips():
    structure, costs = _small_graph()
    model = ComplexityModel(structure, costs)
    alphas = [[0.9, 0.1], [0.2, 0.2, 0.6], [0.3, 0.3, 0.4]]
    got = model([torch.tensor(a) for a in alphas]).item()
    assert abs(got - _hand_ec(structure, costs, alphas)) < 1e-6


def test_expected_complexity_on_pruned_structure():
    structure = Structure([LayerSpec(True, [0]), LayerSpec(False, [0]), LayerSpec(True, [1])])
    costs = [[0.3, 0.02], [0.01], [0.2, 0.04]]
    model = ComplexityModel(structure, costs)
    alphas = [[0.6, 0.4], [1.0], [0.8, 0.2]]
    got = model([torch.tensor(a) for a in alphas]).item()
    assert abs(got - _hand_ec(structure, costs, alphas)) < 1e-6


def test_complexity_falls_when_attention_moves_to_proxies():
    structure, costs = _small_graph()
    model = ComplexityModel(structure, costs)
    values = []
    for block_alpha in (0.95, 0.7, 0.4, 0.1):
        alphas = []
        for spec in structure.layers:
            rest = (1 - block_alpha) / len(spec.proxies)
            alphas.append(torch.tensor([block_alpha] + [rest] * len(spec.proxies)))
        values.append(model(alphas).item())
    assert all(a > b for a, b in itertools.pairwise(values)), values


def test_complexity_gradient_reaches_only_attention_logits():
    structure, costs = _small_graph()
    model = ComplexityModel(structure, costs)
    logits = [torch.tensor([2.0, -2.0], requires_grad=True), torch.tensor([2.0, -2.0, -2.0], requires_grad=True),
              torch.tensor([2.0, -2.0, -2.0], requires_grad=True)]
    ec = model([torch.softmax(l, 0) for l in logits])
    ec.backward()
    # gradient descent on E[C] lowers the block logits relative to the proxies
    for l in logits:
        assert l.grad[0] > 0
    assert list(model.parameters()) == []


def test_teacher_term_is_zero_for_a_perfect_student_and_skips_pruned_layers():
    logits = torch.randn(4, 3)
    feats = [torch.randn(4, 8, 4, 4) for _ in range(3)]
    assert teacher_term(logits, feats, logits.clone(), [f.clone() for f in feats]).item() == 0.0
    other = [f + 1.0 for f in feats]
    # the paper's form: each layer contributes MSE = 1, divided by L = 3
    full = teacher_term(logits, feats, logits, other, kind="mse").item()
    pruned = teacher_term(logits, [feats[0], None, feats[2]], logits, other, kind="mse").item()
    assert abs(full - 3 / 3) < 1e-6
    assert abs(pruned - 2 / 3) < 1e-6
    # the relative form: each layer contributes ||1||^2 / ((||x||^2 + ||t||^2) / 2)
    rel = [(torch.ones_like(t).square().sum() / ((t.square().sum() + f.square().sum()) / 2)).item()
           for f, t in zip(feats, other)]
    full = teacher_term(logits, feats, logits, other, kind="relative").item()
    pruned = teacher_term(logits, [feats[0], None, feats[2]], logits, other, kind="relative").item()
    assert abs(full - sum(rel) / 3) < 1e-5
    assert abs(pruned - (rel[0] + rel[2]) / 3) < 1e-5


def test_logit_distillation_is_hintons_kl_and_its_gradient():
    torch.manual_seed(0)
    s = torch.randn(5, 4, requires_grad=True)
    t, T = torch.randn(5, 4), 3.0
    p_t = torch.softmax(t / T, dim=1)
    naive = T * T * (p_t * (p_t.log() - torch.log_softmax(s / T, dim=1))).sum(dim=1).mean()
    with torch.inference_mode():  # the teacher's logits are inference tensors in training
        t_inf = t.clone()
    kd = logit_distillation(s, t_inf, T)
    assert kd.item() == pytest.approx(naive.item(), rel=1e-5)
    kd.backward()
    # d/ds of T^2 KL(p_t || softmax(s / T)), averaged over the batch: T (softmax(s / T) - p_t) / B
    assert torch.allclose(s.grad, T * (torch.softmax(s / T, dim=1) - p_t) / 5, atol=1e-6)
    assert logit_distillation(t, t, T).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("g2", [10.0, 0.0])  # the KD term needs the teacher even with no feature term
def test_the_student_objective_adds_the_weighted_distillation_term(g2):
    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    teacher = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval().requires_grad_(False)
    student = Student(backbone, 3)
    complexity = ComplexityModel(student.structure, path_costs(student, 32)[0])
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    plain = StudentObjective(student, teacher, describe_chain(teacher), complexity, 0.3, g2)
    with_kd = StudentObjective(student, teacher, describe_chain(teacher), complexity, 0.3, g2,
                               kd_weight=2.0, kd_temperature=4.0)
    assert with_kd.terms == plain.terms + ("kd",)
    base, logits, _ = plain(images, labels)
    loss, _, terms = with_kd(images, labels)
    expected_kd = logit_distillation(logits, teacher(images), 4.0)
    assert terms["kd"].item() == pytest.approx(expected_kd.item(), rel=1e-5)
    assert loss.item() == pytest.approx(base.item() + 2.0 * expected_kd.item(), rel=1e-5)
