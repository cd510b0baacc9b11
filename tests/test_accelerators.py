"""Accelerator descriptions: shipped TOMLs validate; each malformed case names file and field."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hwrel.cli import main
from hwrel.errors import HwrelError
from hwrel.seu import accelerator as acc
from hwrel.seu.accelerator import accelerators_table, list_accelerators, load_accelerator

REQUIRED = ["eyeriss-v1", "tpu-v1", "nvdla-small", "nvdla-full", "gemmini", "ethos-u55",
            "xilinx-dpu-b4096"]
MiB = 2 ** 20

BASE = """\
name = "{stem}"
title = "Test chip"
vendor = "Nobody"
technology_node_nm = 28
formats = ["int8", "fp16"]
sources = ["made up for a test"]

[confidence]
technology_node_nm = "assumed"

[[memory]]
name = "gbuf"
size_bytes = 1024
holds = ["weights", "activations"]
word_bits = 64
protection = "secded"
ecc_data_bits = 64
ecc_check_bits = 8
ser_fit_per_mbit = 105.0
ser_source = "UG116 28 nm"
source = "made up"

[memory.confidence]
size_bytes = "assumed"
word_bits = "assumed"
ser_fit_per_mbit = "secondary"
ecc_data_bits = "assumed"
ecc_check_bits = "assumed"
"""


def write(tmp_path: Path, text: str, stem: str = "test-chip") -> Path:
    path = tmp_path / f"{stem}.toml"
    path.write_text(text.replace("{stem}", stem), encoding="utf-8")
    return path


def test_required_descriptions_are_shipped() -> None:
    assert set(REQUIRED) <= set(list_accelerators())


@pytest.mark.parametrize("name", list_accelerators())
def test_every_shipped_description_loads_and_is_complete(name: str) -> None:
    a = load_accelerator(name)
    assert a.name == name == a.path.stem
    assert a.sources and a.formats and a.memories
    assert a.memories_holding("weights"), "somewhere must hold the weights"
    for m in a.memories:
        levels = dict(m.confidence)
        for field in ("size_bytes", "word_bits", "ser_fit_per_mbit"):
            assert levels[field] in acc.CONFIDENCES
        assert m.ser_source.strip() and m.source.strip()
        assert m.bits == 8 * m.size_bytes
        assert m.stored_bits >= m.bits


def test_shipped_numbers_match_the_reference_data() -> None:
    tpu = load_accelerator("tpu-v1")
    assert tpu.technology_node_nm == 28 and tpu.formats == ("int8",)
    assert tpu.memory("unified_buffer").size_bytes == 24 * MiB
    assert tpu.memory("accumulators").size_bytes == 4 * MiB
    ddr = tpu.memory("ddr3_weight_memory")
    assert ddr.off_chip and ddr.size_bytes == 8 * 2 ** 30 and "weights" in ddr.holds
    assert ddr.ser_fit_per_mbit < 0.1                         # DRAM, not SRAM
    assert tpu.memory("unified_buffer").ser_fit_per_mbit == 66 + 39   # UG116 28 nm
    eye = load_accelerator("eyeriss-v1")
    assert eye.technology_node_nm == 65 and eye.formats == ("int16",)
    assert eye.memory("global_buffer").size_bytes == 108 * 1024
    assert eye.memory("global_buffer").ser_fit_per_mbit == 692
    assert eye.memory("pe_filter_spad").bits == 168 * 224 * 16
    dpu = load_accelerator("xilinx-dpu-b4096")
    assert dpu.technology_node_nm == 16 and dpu.memory("block_ram").ser_fit_per_mbit == 20.2
    ecc = load_accelerator("xilinx-dpu-b4096-ecc").memory("block_ram").protection
    assert (ecc.kind, ecc.data_bits, ecc.check_bits) == ("secded", 64, 8)
    # FinFET defaults where the node is the integrator's are marked assumed.
    for name in ("nvdla-small", "nvdla-full", "gemmini"):
        a = load_accelerator(name)
        assert a.confidence_of("technology_node_nm") == "assumed"
        for m in a.memories:
            if not m.off_chip:
                assert m.confidence_of("ser_fit_per_mbit") == "assumed"


def test_accelerators_table() -> None:
    t = accelerators_table()
    assert list(t["name"]) == list_accelerators()
    row = t.set_index("name").loc["tpu-v1"]
    assert row["on_chip_bytes"] == 24 * MiB + 4 * MiB + 256 * 1024
    assert row["off_chip_bytes"] == 8 * 2 ** 30
    assert "secondary" in row["on_chip_ser_fit_per_mbit"]


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(HwrelError, match="unknown accelerator 'tpu-v9'.*tpu-v1"):
        load_accelerator("tpu-v9")


def test_environment_overrides_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, BASE)
    monkeypatch.setenv(acc.ENV_DIR, str(tmp_path))
    assert list_accelerators() == ["test-chip"]
    assert load_accelerator("test-chip").memory("gbuf").stored_bits == 1024 // 8 * 72


def test_base_case_is_valid(tmp_path: Path) -> None:
    m = load_accelerator(write(tmp_path, BASE)).memory("gbuf")
    assert m.protection.word_bits == 72 and m.protection.interleave == 1


SECTION = "[[memory]]"
BAD_CASES = [
    # (id, transform of BASE, field named, problem pattern)
    ("malformed", lambda s: s.replace('title = "Test chip"', 'title = "Test chip'), "",
     "malformed TOML"),
    ("missing-top", lambda s: s.replace('vendor = "Nobody"\n', ""), "vendor", "missing"),
    ("missing-memory-field", lambda s: s.replace("word_bits = 64\n", ""),
     r"memory\[gbuf\]\.word_bits", "missing"),
    ("wrong-type", lambda s: s.replace("size_bytes = 1024", 'size_bytes = "1 KiB"'),
     r"memory\[gbuf\]\.size_bytes", "expected int"),
    ("bool-as-number", lambda s: s.replace("technology_node_nm = 28", "technology_node_nm = true"),
     "technology_node_nm", "expected"),
    ("negative-size", lambda s: s.replace("size_bytes = 1024", "size_bytes = -1024"),
     r"memory\[gbuf\]\.size_bytes", "must be > 0"),
    ("negative-ser", lambda s: s.replace("ser_fit_per_mbit = 105.0", "ser_fit_per_mbit = -1.0"),
     r"memory\[gbuf\]\.ser_fit_per_mbit", ">= 0"),
    ("unknown-protection", lambda s: s.replace('protection = "secded"', 'protection = "tmr"'),
     r"memory\[gbuf\]\.protection", "unknown protection 'tmr'.*secded"),
    ("secded-without-word", lambda s: s.replace("ecc_data_bits = 64\n", "", 1),
     r"memory\[gbuf\]\.ecc_data_bits", "required"),
    ("secded-too-few-check-bits",
     lambda s: s.replace("ecc_check_bits = 8\n", "ecc_check_bits = 7\n", 1),
     r"memory\[gbuf\]\.ecc_check_bits", "need >= 8"),
    ("ecc-without-secded", lambda s: s.replace('protection = "secded"', 'protection = "parity"'),
     r"memory\[gbuf\]\.ecc_data_bits", "only valid"),
    ("unknown-format", lambda s: s.replace('"fp16"]', '"fp12"]'), "formats", "fp12"),
    ("alias-format", lambda s: s.replace('"fp16"]', '"float16"]'), "formats", "canonical"),
    ("duplicate-memory", lambda s: s + s[s.index(SECTION):], r"memory\[gbuf\]\.name", "duplicate"),
    ("unknown-holds", lambda s: s.replace('"activations"]', '"biases"]'), r"memory\[gbuf\]\.holds",
     "unknown entry 'biases'"),
    ("missing-confidence", lambda s: s.replace('ser_fit_per_mbit = "secondary"\n', ""),
     r"memory\[gbuf\]\.confidence\.ser_fit_per_mbit", "missing"),
    ("bad-confidence", lambda s: s.replace('"secondary"', '"probably"'),
     r"memory\[gbuf\]\.confidence\.ser_fit_per_mbit", "unknown level"),
    ("unknown-key", lambda s: s.replace("word_bits = 64\n", "word_bits = 64\nsize_kb = 1\n"),
     r"memory\[gbuf\]\.size_kb", "unknown field"),
    ("empty-source", lambda s: s.replace('source = "made up"', 'source = "  "'),
     r"memory\[gbuf\]\.source", "empty"),
    ("no-memory", lambda s: s[:s.index(SECTION)], "memory", "missing"),
]


@pytest.mark.parametrize("transform, field, problem", [c[1:] for c in BAD_CASES],
                         ids=[c[0] for c in BAD_CASES])
def test_malformed_description_names_file_and_field(tmp_path: Path, transform, field: str,
                                                    problem: str) -> None:
    path = write(tmp_path, transform(BASE))
    with pytest.raises(HwrelError) as info:
        load_accelerator(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: ")
    assert re.search(f"{field}.*{problem}" if field else problem, msg), msg


def test_name_must_equal_the_file_stem(tmp_path: Path) -> None:
    path = tmp_path / "other.toml"
    path.write_text(BASE.replace("{stem}", "test-chip"), encoding="utf-8")
    with pytest.raises(HwrelError, match=r"other\.toml: name: .*file stem"):
        load_accelerator(path)


def test_cli_json_lists_every_description(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["accelerators", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in data] == list_accelerators()
    tpu = next(d for d in data if d["name"] == "tpu-v1")
    ub = next(m for m in tpu["memories"] if m["name"] == "unified_buffer")
    assert ub["size_bytes"] == 24 * MiB and ub["confidence"]["ser_fit_per_mbit"] == "secondary"


def test_cli_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, BASE)
    assert main(["accelerators", "--validate", str(good)]) == 0
    assert "1 description(s) valid" in capsys.readouterr().out
    assert main(["accelerators", "--memories"]) == 0
    assert "unified_buffer" in capsys.readouterr().out
    bad = write(tmp_path, BASE.replace("size_bytes = 1024", "size_bytes = -1"), stem="bad-chip")
    assert main(["accelerators", "--json", "--validate", str(good), str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == ""                                        # no partial output
    assert err.startswith("hwrel: error: ") and "bad-chip.toml" in err and "size_bytes" in err
