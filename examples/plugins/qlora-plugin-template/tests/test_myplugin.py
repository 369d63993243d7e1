"""The package's own tests: the quantizer passes qlora-plugins' conformance kit, both plugins
register cleanly, and options are validated. Run with ``pytest`` after ``pip install -e .``."""

from __future__ import annotations

import pytest
import qlora_myplugin

from qlora_plugins.testing import quantizer_checks


@pytest.mark.parametrize("check", quantizer_checks(), ids=lambda c: c.__name__)
def test_quantizer_conformance(check):
    check(qlora_myplugin.MyPluginInt4, {"blocksize": 64})


def test_hooks_register_both_plugins():
    registered = []
    qlora_myplugin.register_quantizers(registered.append)
    qlora_myplugin.register_exporters(registered.append)
    assert registered == [qlora_myplugin.MyPluginInt4, qlora_myplugin.MyPluginWeights]
    assert {cls.name for cls in registered} == {"myplugin_int4", "myplugin_weights"}


def test_options_are_validated():
    import attrs

    with pytest.raises(ValueError, match="must be in"):
        qlora_myplugin.MyPluginInt4Options(max_code=9)
    options = qlora_myplugin.MyPluginWeightsOptions(dtype="float16")
    assert qlora_myplugin.MyPluginWeights(options).default_tolerance() == {"max_tensor_rel_error": 1e-3}
    assert attrs.has(type(options.tolerance))
