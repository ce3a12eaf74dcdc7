"""The K search's decision rule: paired, and never turned by one or two validation images."""
from __future__ import annotations

import pytest
import torch

from tailor_cli.selection import compare, resolution_warning


def _pair(n: int, worse: int, better: int = 0, wrong_both: int = 10):
    """Reference right on all but ``wrong_both`` images; the candidate loses ``worse`` and wins ``better``."""
    ref = torch.ones(n, dtype=torch.bool)
    ref[:wrong_both] = False
    cand = ref.clone()
    cand[wrong_both:wrong_both + worse] = False
    cand[:better] = True
    return cand, ref


@pytest.mark.parametrize("n", [143, 287, 359])
def test_one_or_two_images_never_reject_a_candidate_even_at_tolerance_0(n):
    for worse in (1, 2):
        cand, ref = _pair(n, worse)
        result = compare(cand, ref, tolerance=0.0)
        assert result.accepted, result
        assert result.only_reference == worse and result.only_candidate == 0
    # the old rule (diff >= -tolerance) rejected 2 of 360 images at tolerance 0.5: this one does not
    cand, ref = _pair(360, 2)
    assert -compare(cand, ref, tolerance=0.5).diff > 0.5 and compare(cand, ref, tolerance=0.5).accepted


def test_a_candidate_that_loses_many_images_is_rejected():
    cand, ref = _pair(360, 20)
    result = compare(cand, ref, tolerance=0.5)
    assert not result.accepted and result.diff == pytest.approx(-100 * 20 / 360)
    # the margin is the noise of the paired difference: it grows with the discordant images only
    assert result.margin == pytest.approx(1.645 * 100 * torch.cat([-torch.ones(20), torch.zeros(340)]).std().item()
                                          / 360 ** 0.5)


def test_pairing_counts_images_that_swap_between_the_two():
    # same accuracy, but 30 images lost and 30 others won: no difference on average, accepted
    cand, ref = _pair(300, worse=30, better=30, wrong_both=40)
    result = compare(cand, ref, tolerance=0.0)
    assert result.diff == 0 and result.accepted
    assert (result.only_candidate, result.only_reference) == (30, 30)


def test_identical_networks_and_bad_input():
    ref = torch.tensor([True, False, True])
    assert compare(ref, ref, tolerance=0.0).accepted and compare(ref, ref, tolerance=0.0).margin == 0
    with pytest.raises(ValueError):
        compare(ref, ref[:2], tolerance=0.5)


def test_a_tolerance_of_fewer_than_three_validation_images_is_named():
    # the README's digits: 287 validation images, one image 0.35 points, --tolerance 0.5 allows one image
    message = resolution_warning(287, 0.5)
    assert message is not None and "287 images" in message and "0.35 points" in message
    assert "allows 1 image and" in message and "--tolerance 1.05, or a validation split of 600 images" in message
    assert "allows 2 images" in resolution_warning(575, 0.5)
    assert resolution_warning(599, 0.5) is not None  # 2.995 images
    assert resolution_warning(600, 0.5) is None and resolution_warning(10_000, 0.5) is None
    assert resolution_warning(287, 1.5) is None  # 4.3 images
