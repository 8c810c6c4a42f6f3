"""The top-level package exposes what a notebook needs, loaded on first use."""

import subprocess
import sys

import pytest

import xferlens as xl


def test_every_public_name_resolves_to_the_subpackage_object():
    import xferlens.evaluation
    import xferlens.mappers
    import xferlens.steering

    for name in xl.__all__:
        assert getattr(xl, name) is not None, name
    assert xl.fit_mapper is xferlens.mappers.fit_mapper
    assert xl.transfer is xferlens.steering.transfer
    assert xl.dose_response is xferlens.evaluation.dose_response
    assert set(xl.__all__) <= set(dir(xl))


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'fit_mappers'"):
        xl.fit_mappers  # noqa: B018


def test_import_stays_light():
    """``import xferlens`` does not pull in the mappers, steering or sae-lens."""
    code = (
        "import sys, xferlens; "
        "print(any(m.startswith(('xferlens.mappers', 'xferlens.steering', 'sae_lens')) for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
