"""Checking and fuzzing reversible layers.

    report = revengine.testing.check_layer(my_coupling, x)       # numbers, not "looks right"
    report.assert_ok()

    from hypothesis import given
    from revengine.testing import strategies as rst
    @given(layer=rst.couplings(width=8), x=rst.inputs(width=16))
    def test_mine(layer, x): check_layer(layer, x).assert_ok()
"""
from .check import Report, check_layer
from . import strategies

__all__ = ["Report", "check_layer", "strategies"]
