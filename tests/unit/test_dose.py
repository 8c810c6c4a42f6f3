"""Dose-response and the native-equivalent dose, on synthetic curves with a known answer."""

import numpy as np
import pytest

from xferlens.evaluation.dose import DoseResponse, dose_at_each_alpha, equivalent_dose

ALPHAS = [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0]


def _curves(c_true: float, n: int = 400, seed: int = 0, noise: float = 0.5):
    """Per-prompt scores: a prompt offset plus a saturating response f(alpha); the compared
    vector acts exactly like the reference at c_true x alpha."""
    rng = np.random.default_rng(seed)
    base = rng.normal(-4, 1, n)
    f = lambda a: 6 * np.tanh(a / 3)  # noqa: E731
    nat = np.stack([base + f(a) + rng.normal(0, noise, n) for a in ALPHAS])
    tra = np.stack([base + f(c_true * a) + rng.normal(0, noise, n) for a in ALPHAS])
    flat = np.stack([base + rng.normal(0, noise, n) for _ in ALPHAS])
    return DoseResponse(ALPHAS, base, {"native": nat, "transferred": tra, "random": flat})


@pytest.mark.parametrize("c_true", [0.6, 0.85, 1.0, 1.3])
def test_equivalent_dose_recovers_a_known_scale(c_true):
    dr = _curves(c_true)
    est = dr.equivalent_dose("transferred", n_boot=300)
    assert est.dose == pytest.approx(c_true, abs=0.05)
    assert est.ci[0] - 0.02 <= c_true <= est.ci[1] + 0.02
    assert est.ci[1] - est.ci[0] < 0.3
    # per-alpha doses: recovered wherever the compared curve stays within the reference's range
    for k, a in enumerate(ALPHAS):
        if c_true * a <= ALPHAS[-1] * 0.95:
            assert est.per_alpha[k] == pytest.approx(c_true, abs=0.12), a
    # the native vector against itself: 1; a random direction: ~0
    assert dr.equivalent_dose("native", n_boot=50).dose == pytest.approx(1.0, abs=0.01)
    assert dr.equivalent_dose("random", n_boot=50).dose < 0.1


def test_dose_functions_on_exact_linear_curves():
    a = np.array([1.0, 2.0, 4.0])
    ref = np.array([[0.0, 1.0, 2.0, 4.0]])  # ref(x) = x
    cur = np.array([[0.5, 1.0, 2.0]])  # = ref(0.5 x)
    assert equivalent_dose(a, ref, cur)[0] == pytest.approx(0.5, abs=1e-9)
    assert np.allclose(dose_at_each_alpha(a, ref, cur)[0], 0.5)
    above = np.array([[9.0, 9.0, 9.0]])  # beyond what the reference reaches
    assert np.isnan(dose_at_each_alpha(a, ref, above)[0]).all()
    with pytest.raises(ValueError, match="increasing"):
        equivalent_dose([2.0, 1.0], ref, cur)


def test_dose_response_views_and_round_trip():
    dr = _curves(0.8, n=50)
    md = dr.to_markdown(n_boot=50)
    assert "n = 50" in md and "transferred" in md
    back = DoseResponse.from_dict(dr.to_dict())
    assert np.allclose(back.scores["native"], dr.scores["native"])
    d = dr.difference("transferred", "random", n_boot=100)
    assert d.ci[-1][0] > 0  # the transferred curve separates from the flat one
    rows = d.to_dict()  # the rows difference() returned before it was a report
    assert [r["alpha"] for r in rows] == dr.alphas and rows[-1]["ci"] == d.ci[-1]
    assert isinstance(rows[0]["ci"], tuple) and set(rows[0]) == {"alpha", "diff", "ci"}
    want = dr.curve("transferred")[1:] - dr.curve("random")[1:]
    np.testing.assert_allclose([r["diff"] for r in rows], want)
    fig = dr.plot(n_boot=50)
    assert fig is not None
    with pytest.raises(ValueError, match="shape"):
        DoseResponse(ALPHAS, np.zeros(3), {"x": np.zeros((2, 3))})
    with pytest.raises(KeyError, match="no condition"):
        dr.curve("nope")


@pytest.mark.parametrize("c_true", [0.5, 0.8, 1.0, 1.25])
def test_a_curve_that_peaks_and_falls_is_read_on_its_rising_part(c_true):
    """Oversteering: the score rises, peaks at alpha 2 and falls. A late low score must not
    read as a small dose; past a curve's peak the per-alpha dose is undefined (nan)."""
    rng = np.random.default_rng(1)
    n = 400
    base = rng.normal(-4, 1, n)
    f = lambda a: 6 * (a / 2) * np.exp(1 - a / 2)  # noqa: E731  peak at a = 2
    nat = np.stack([base + f(a) + rng.normal(0, 0.3, n) for a in ALPHAS])
    tra = np.stack([base + f(c_true * a) + rng.normal(0, 0.3, n) for a in ALPHAS])
    dr = DoseResponse(ALPHAS, base, {"native": nat, "transferred": tra})
    assert dr.peak("native") == 2.0
    est = dr.equivalent_dose("transferred", n_boot=200)
    # linear interpolation on a concave curve reads a few hundredths high (0.84 for 0.8)
    assert est.dose == pytest.approx(c_true, abs=0.07)
    assert est.ci[0] - 0.06 <= c_true <= est.ci[1] + 0.06
    own_peak = dr.peak("transferred")
    for k, a in enumerate(ALPHAS):
        if a > own_peak:
            assert np.isnan(est.per_alpha[k]), a
        elif c_true * a <= 2.0 * 0.8:
            assert est.per_alpha[k] == pytest.approx(c_true, abs=0.12), a
    # the old rule (the whole curve, native made monotone) is what this guards against:
    # the native vector compared with itself still reads 1
    assert dr.equivalent_dose("native", n_boot=50).dose == pytest.approx(1.0, abs=0.01)


def test_a_reference_that_never_rises_gives_no_dose():
    a = np.array([1.0, 2.0])
    ref = np.array([[0.0, -1.0, -2.0]])
    cur = np.array([[0.5, 1.0]])
    assert np.isnan(equivalent_dose(a, ref, cur)[0])
    assert np.isnan(dose_at_each_alpha(a, ref, cur)[0]).all()
