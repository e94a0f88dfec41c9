"""The ACP_FWD_CONFIG and ACP_BWD_CONFIG spellings of kernel configs (the benchmarks' tuning hooks)."""
import pytest

from acp_compile.kernels.fox_triton.configs import FwdConfig, override_string, parse_override


def test_override_string_round_trips_every_field():
    cfgs = {128: FwdConfig(128, 64, 8, 3, True, False, True), 64: FwdConfig(64, 32, 4, 2)}
    text = ";".join(override_string(d, c) for d, c in cfgs.items())
    assert parse_override(text) == cfgs


def test_short_override_leaves_the_flags_off():
    assert parse_override("128:128,128,8,3") == {128: FwdConfig(128, 128, 8, 3, False, False, False)}


def test_backward_override_parses_and_names_the_fields_on_error():
    from acp_compile.kernels.fox_triton.backward import BackwardConfig, parse_backward_override
    assert parse_backward_override("64,128,128,32,8,3,4,3") == BackwardConfig(64, 128, 128, 32, 8, 3, 4, 3)
    with pytest.raises(ValueError, match="ACP_BWD_CONFIG"):
        parse_backward_override("64,128")
