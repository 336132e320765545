"""The optional [out_of_domain] entry: text from none of the domains, for the reports only."""

from __future__ import annotations

import pytest
from project_builders import numbered_docs, refused, write_jsonl, write_text

from gatemix.project import load_project
from gatemix.project_writer import write_project_file


def test_a_project_without_out_of_domain_text_has_none(code_pool):
    project = load_project(code_pool)
    assert project.out_of_domain is None and project.out_of_domain_texts() == []


def test_out_of_domain_sources_are_read_like_a_split(tmp_path, code_pool):
    write_jsonl(tmp_path / "ood" / "changes.jsonl", [{"body": "fixed a bug"}, {"body": "  "}])
    write_text(tmp_path / "ood" / "notes" / "a.txt", "release notes")
    code_pool.write_text(code_pool.read_text() + (
        '[out_of_domain]\ntext_field = "body"\n'
        'eval = ["ood/changes.jsonl", {path = "ood/notes", format = "text"}]\n'))
    project = load_project(code_pool)
    assert [source.path for source in project.out_of_domain] == [
        tmp_path / "ood" / "changes.jsonl", tmp_path / "ood" / "notes"]
    assert project.out_of_domain_documents() == [
        ("ood/changes.jsonl#0", "fixed a bug"), ("ood/notes/a.txt", "release notes")]
    assert project.domains == ["code"]  # not a domain: no expert, no split, no fit


def test_out_of_domain_text_field_defaults_to_the_data_default(tmp_path, code_pool):
    write_jsonl(tmp_path / "ood.jsonl", numbered_docs(2, "changelog"))
    code_pool.write_text(code_pool.read_text() + '[out_of_domain]\neval = "ood.jsonl"\n')
    assert load_project(code_pool).out_of_domain_texts() == ["changelog number 0", "changelog number 1"]


@pytest.mark.parametrize(("entry", "named"), [
    ('[out_of_domain]\neval = ["absent.jsonl"]\n', "absent.jsonl"),
    ('[out_of_domain]\nfiles = ["ood.jsonl"]\n', "files"),
    ('[out_of_domain]\ntext_field = "body"\n', "eval"),
    ('out_of_domain = "ood.jsonl"\n', "[out_of_domain]"),
])
def test_a_bad_out_of_domain_entry_is_one_line_naming_the_problem(tmp_path, code_pool, entry, named):
    write_jsonl(tmp_path / "ood.jsonl", numbered_docs(2))
    text = code_pool.read_text()
    code_pool.write_text(entry + text if not entry.startswith("[") else text + entry)
    refused(lambda: load_project(code_pool), code_pool, named)


def test_write_project_file_round_trips_the_out_of_domain_sources(tmp_path, make_expert):
    folder = tmp_path / "proj"
    experts = {"code": make_expert("code")}
    write_jsonl(folder / "data" / "code.jsonl", numbered_docs(10))
    ood = write_jsonl(folder / "ood" / "eval.jsonl", numbered_docs(3, "news"))
    path = write_project_file(folder, name="p", experts=experts,
                              data={"code": {"files": [folder / "data" / "code.jsonl"]}},
                              out_of_domain=[ood])
    assert '[out_of_domain]\neval = ["ood/eval.jsonl"]' in path.read_text()
    assert load_project(path).out_of_domain_texts() == [f"news number {i}" for i in range(3)]
