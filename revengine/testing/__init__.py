"""Checking and fuzzing reversible layers.

    report = revengine.testing.check_layer(my_coupling, x)       # numbers, not "looks right"
    report.assert_ok()

    from hypothesis import given
    from revengine.testing import strategies as rst
    @given(layer=rst.couplings(width=8), x=rst.inputs(width=16))
    def test_mine(layer, x): check_layer(layer, x).assert_ok()
"""
import importlib

from .check import Report, check_layer

__all__ = ["Report", "check_layer", "strategies"]


def __getattr__(name):
    # strategies needs hypothesis, a test-time dependency: imported on first use, not with revengine.
    if name == "strategies":
        return importlib.import_module(".strategies", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
