"""No repr or str of an object that holds a record's text contains it (issue 25, point 2): a log line, a
traceback or pytest's own assertion message that prints a deletion target, a corpus record or the scan's
patterns would otherwise write the deleted text where the deletion cannot reach it."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

import sisaflow
from sisaflow.data.corpus import Record
from sisaflow.inference.classify import Input
from sisaflow.scan.targets import Needles, Target, build_needles

SECRET = "my note about my diagnosis of zqxj-syndrome"
TEXT_FIELDS = {"text", "prompt", "patterns", "bounded", "zlib_text"}
"""Field names that hold a record's text (or pieces of it, as bytes) in sisaflow's dataclasses."""


def library_dataclasses() -> list[type]:
    out = []
    for info in pkgutil.walk_packages(sisaflow.__path__, "sisaflow."):
        if info.name.endswith("__main__"):  # runs the CLI
            continue
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if dataclasses.is_dataclass(value) and isinstance(value, type) and value.__module__ == info.name:
                out.append(value)
    return out


def test_every_text_field_of_a_library_dataclass_is_left_out_of_its_repr():
    """Mutant: drop repr=False from Record.text (or Target.text, Needles.patterns): fails, naming the field."""
    held = [
        (cls, f.name)
        for cls in library_dataclasses()
        for f in dataclasses.fields(cls)
        if f.name in TEXT_FIELDS
    ]
    assert {(c.__name__, n) for c, n in held} >= {
        ("Record", "text"),
        ("Target", "text"),
        ("Needles", "patterns"),
    }
    shown = [
        f"{c.__module__}.{c.__name__}.{n}"
        for c, n in held
        if next(f for f in dataclasses.fields(c) if f.name == n).repr
    ]
    assert not shown, f"text fields in a repr: {shown}"


def test_the_objects_that_carry_a_deleted_text_never_print_it():
    record = Record("r-1", "owner-7", SECRET, "c0ffee")
    target = Target("req-1", "r-1", "c0ffee", SECRET)
    needles = build_needles([target], None, None)
    assert needles.patterns  # the patterns do hold the text: that is what the scan searches for
    assert any(SECRET.encode() in p for p in needles.patterns)
    for obj in (record, target, needles, Input("r-1", SECRET, None), [record], {"t": target}):
        for shown in (repr(obj), str(obj), f"{obj}", f"{obj!r}"):
            assert SECRET not in shown and "zqxj" not in shown, type(obj).__name__
    # what they show instead names the record by id and hash
    assert "r-1" in repr(record) and "c0ffee" in repr(target) and isinstance(needles, Needles)
