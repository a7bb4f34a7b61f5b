"""core/machine.py: each run records the machine(s) it trained on, a resume elsewhere appends, damage is survivable."""
import json

import pytest

from core import machine


def test_record_machine_appends_only_a_new_machine(tmp_path, monkeypatch):
    first = machine.record_machine(tmp_path)
    assert first == [machine.describe()] and first[0]["cpu"] and first[0]["accelerator"] == "none"
    assert machine.record_machine(tmp_path) == first                      # resumed on the same machine
    monkeypatch.setattr(machine, "cpu_model", lambda: "Other CPU")
    both = machine.record_machine(tmp_path)
    assert [m["cpu"] for m in both] == [first[0]["cpu"], "Other CPU"]
    assert json.loads((tmp_path / machine.MACHINE_FILE).read_text()) == both
    assert machine.machine_text(both) == f"{first[0]['cpu']} ({first[0]['cores']} cores) then Other CPU ({first[0]['cores']} cores)"


def test_damaged_file_is_replaced_and_bad_shapes_refused(tmp_path):
    (tmp_path / machine.MACHINE_FILE).write_text("{not json")
    assert machine.record_machine(tmp_path) == [machine.describe()]
    assert machine.machine_text(None) is None
    with pytest.raises(TypeError, match="not a list"):
        machine.machine_text({"cpu": "x"})
