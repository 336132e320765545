"""Every bad input is one ProjectError line that names the project file (and the data file)."""

from __future__ import annotations

import json

import pytest
from project_builders import numbered_docs, refused, write_jsonl, write_text

from gatemix.project import load_project

CODE_EXPERT = """
    [experts]
    code = "models/code"
"""


@pytest.fixture
def project_with(code_expert, write_project):
    """``project_with(body)``: the code expert's project file, with ``body`` after [experts]."""
    return lambda body, file_name="gatemix.toml": write_project(CODE_EXPERT + body, file_name)


# ---- the file itself ----

def test_a_missing_project_file(tmp_path):
    missing = tmp_path / "nope.toml"
    refused(lambda: load_project(missing), missing)


def test_a_folder_without_a_project_file(tmp_path):
    refused(lambda: load_project(tmp_path), tmp_path, "gatemix.toml")


def test_a_folder_with_two_project_files(tmp_path, code_pool):
    (tmp_path / "gatemix.yaml").write_text("experts: {}\n")
    message = refused(lambda: load_project(tmp_path), tmp_path)
    assert "gatemix.toml and gatemix.yaml" in message


def test_a_file_that_is_neither_toml_nor_yaml(tmp_path):
    path = write_text(tmp_path / "project.json", "{}")
    refused(lambda: load_project(path), path)


def test_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "gatemix.toml"
    path.write_bytes(b"name = \"\xff\xfe\"\n")
    assert "unreadable" in refused(lambda: load_project(path), path)


def test_invalid_toml_names_the_parser_problem(write_project):
    path = write_project("[experts\ncode = 1\n")
    assert "not valid TOML" in refused(lambda: load_project(path), path.resolve())


def test_invalid_yaml_is_one_line_with_the_parser_message(write_project):
    path = write_project("experts:\n  code: [unclosed\n", "gatemix.yaml")
    message = refused(lambda: load_project(path), path.resolve())
    assert "not valid YAML" in message and "line" in message


def test_yaml_whose_top_level_is_not_a_table(write_project):
    path = write_project("- a\n- b\n", "gatemix.yaml")
    assert "top level" in refused(lambda: load_project(path), path.resolve())


# ---- the tables ----

@pytest.mark.parametrize("body, named", [
    ('colour = "blue"\n' + CODE_EXPERT, "colour"),
    (CODE_EXPERT + '[data.code]\nfiles = ["x.jsonl"]\nsplits = 3\n', "splits"),
    (CODE_EXPERT + '[data]\nshuffle = true\n[data.code]\nfiles = ["x.jsonl"]\n', "shuffle"),
    (CODE_EXPERT + '[data.code]\nfiles = [{path = "x.jsonl", colum = "t"}]\n', "colum"),
    (CODE_EXPERT + '[data.code]\nfiles = ["x.jsonl"]\n[serve]\ndraft_model = "s"\n', "draft_model"),
    ('[base]\nfolder = "b"\n' + CODE_EXPERT + '[data.code]\nfiles = ["x.jsonl"]\n', "folder"),
])
def test_unknown_keys_are_named(tmp_path, code_expert, write_project, body, named):
    write_jsonl(tmp_path / "x.jsonl", numbered_docs(3))
    path = write_project(body)
    message = refused(lambda: load_project(path), path.resolve(), named)
    assert "unknown key" in message


@pytest.mark.parametrize("body, named", [
    ('name = 3\n[experts]\ncode = "models/code"\n', "name must be a string"),
    ('work_dir = ["a"]\n[experts]\ncode = "models/code"\n', "work_dir must be a string"),
    ('experts = "models/code"\n', "[experts] must be a table"),
    ("[experts]\ncode = 3\n", "[experts] code must be a string"),
    ('[experts]\ncode = "models/code"\n[data]\nseed = "zero"\n', "[data] seed must be an integer"),
    ('[experts]\ncode = "models/code"\n[data.code]\ngate_fraction = 1.5\nfiles = ["x.jsonl"]\n',
     "[data.code] gate_fraction must be between 0 and 1"),
    ('[experts]\ncode = "models/code"\n[data.code]\ntrain = 3\n', "[data.code] train must be a list"),
    ('[experts]\ncode = "models/code"\n[data.code]\ntrain = [{path = 3}]\n', "path must be"),
    ('[experts]\ncode = "models/code"\n[data.code]\nfiles = ["x.jsonl"]\n[serve]\ndraft = 3\n',
     "[serve] draft must be a string"),
    (('[experts]\ncode = "models/code"\n[data.code]\nfiles = ["x.jsonl"]\n[serve]\ndraft = "s"\n'
     'num_draft_tokens = 0\n'), "[serve] num_draft_tokens must be 1 to 16"),
    ('[experts]\ncode = "models/code"\n[data.code]\nfiles = ["x.jsonl"]\n[serve]\nnum_draft_tokens = 2\n',
     "[serve] num_draft_tokens needs a draft"),
    ('base = "b"\n[experts]\ncode = "models/code"\n', "[base] must be a table"),
    ('[base]\npath = 3\n[experts]\ncode = "models/code"\n', "[base] path must be a string"),
    ('[base]\npath = " "\n[experts]\ncode = "models/code"\n', "[base] path must name the base model"),
])
def test_wrong_types_are_refused(tmp_path, code_expert, write_project, body, named):
    write_jsonl(tmp_path / "x.jsonl", numbered_docs(3))
    path = write_project(body)
    refused(lambda: load_project(path), path.resolve(), named)


# ---- experts ----

@pytest.mark.parametrize("body", ["[experts]\n", 'name = "x"\n'])
def test_no_experts(write_project, body):
    path = write_project(body)
    assert "[experts]" in refused(lambda: load_project(path), path.resolve())


def test_an_expert_name_that_cannot_be_served(write_project, code_pool):
    code_pool.write_text(code_pool.read_text().replace("code =", "Code ="))
    refused(lambda: load_project(code_pool), code_pool.resolve(), "'Code'")


def test_a_missing_expert_folder(tmp_path, code_pool):
    code_pool.write_text(code_pool.read_text().replace("models/code", "models/gone"))
    refused(lambda: load_project(code_pool), code_pool.resolve(), "expert 'code'",
            tmp_path / "models" / "gone")


def test_an_expert_folder_without_config(tmp_path, code_pool):
    (tmp_path / "models" / "code" / "config.json").unlink()
    assert "no config.json" in refused(lambda: load_project(code_pool), code_pool.resolve(),
                                       "expert 'code'", tmp_path / "models" / "code")


def test_an_expert_that_is_not_a_causal_lm(tmp_path, code_pool):
    config = tmp_path / "models" / "code" / "config.json"
    config.write_text(json.dumps({"architectures": ["BertModel"], "vocab_size": 300}))
    assert "not a causal language model" in refused(
        lambda: load_project(code_pool), code_pool.resolve(), tmp_path / "models" / "code")


@pytest.mark.parametrize("overrides, problem", [
    ({"tokenizer_model": "wordpiece"}, "different tokenizers"),
    ({"vocab_size": 512}, "vocab_size"),
])
def test_experts_without_one_shared_vocabulary(tmp_path, code_pool, make_expert, overrides,
                                               problem):
    make_expert("legal", **overrides)
    write_jsonl(tmp_path / "legal.jsonl", numbered_docs(3))
    code_pool.write_text(code_pool.read_text().replace(
        "[data.code]", 'legal = "models/legal"\n[data.legal]\nfiles = ["legal.jsonl"]\n[data.code]'))
    assert problem in refused(lambda: load_project(code_pool), code_pool.resolve(), "'legal'")


def test_a_domain_without_an_expert(tmp_path, code_pool):
    code_pool.write_text(code_pool.read_text() + '[data.math]\nfiles = ["data/code.jsonl"]\n')
    assert "names no expert" in refused(lambda: load_project(code_pool), code_pool.resolve(),
                                        "[data.math]")


def test_an_expert_without_a_domain(tmp_path, code_pool, make_expert):
    make_expert("legal")
    code_pool.write_text(code_pool.read_text().replace(
        'code = "models/code"', 'code = "models/code"\nlegal = "models/legal"'))
    assert "has no data" in refused(lambda: load_project(code_pool), code_pool.resolve(), "'legal'")


def test_a_missing_baseline_folder(tmp_path, code_pool):
    code_pool.write_text(code_pool.read_text() + '[baselines]\nmono = "models/mono"\n')
    refused(lambda: load_project(code_pool), code_pool.resolve(), "baseline 'mono'",
            tmp_path / "models" / "mono")
    assert load_project(code_pool, check_data=False).baselines == {
        "mono": tmp_path / "models" / "mono"}


# ---- a domain's sources ----

@pytest.mark.parametrize("body, problem", [
    ('train = ["x.jsonl"]\nfiles = ["y.jsonl"]\n', "both files and train"),
    ('text_field = "body"\n', "declares no data"),
    ("train = []\n", "lists no sources"),
    ('train = ["x.jsonl"]\neval = ["x.jsonl"]\n', "listed twice"),
])
def test_a_domain_table_that_declares_its_data_wrongly(tmp_path, project_with, body, problem):
    write_jsonl(tmp_path / "x.jsonl", numbered_docs(3))
    path = project_with("[data.code]\n" + body)
    assert problem in refused(lambda: load_project(path), path.resolve(), "[data.code]")


def test_a_missing_data_source(tmp_path, project_with):
    path = project_with('[data.code]\ntrain = ["data/missing.jsonl"]\n')
    assert "does not exist" in refused(lambda: load_project(path), path.resolve(),
                                       tmp_path / "data" / "missing.jsonl", "[data.code] train")


def test_an_unknown_format(tmp_path, project_with):
    write_jsonl(tmp_path / "x.jsonl", numbered_docs(3))
    path = project_with('[data.code]\ntrain = [{path = "x.jsonl", format = "csv"}]\n')
    assert "unknown format 'csv'" in refused(lambda: load_project(path), path.resolve(),
                                             tmp_path / "x.jsonl")


@pytest.mark.parametrize("lines, problem", [
    ('{"text": "ok"}\n{not json\n', "line 2: not JSON"),
    ('{"text": "ok"}\n\n{"body": "no text field"}\n', "line 3: no 'text' field (found: body)"),
    ('{"text": ["a", "list"]}\n', "line 1: field 'text' is a list, not a string"),
])
def test_bad_jsonl_lines_name_the_file_and_line(tmp_path, project_with, lines, problem):
    data_file = write_text(tmp_path / "data" / "bad.jsonl", lines)
    project = load_project(project_with('[data.code]\ntrain = ["data/bad.jsonl"]\n'))
    message = refused(lambda: project.documents("code", "train"), project.path, data_file)
    assert problem in message


def test_a_parquet_file_without_the_text_column(tmp_path, project_with):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data_file = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"content": ["a"], "id": [1]}), data_file)
    project = load_project(project_with('[data.code]\ntrain = ["rows.parquet"]\n'))
    message = refused(lambda: project.documents("code", "train"), project.path, data_file)
    assert "no column 'text' (columns: content, id)" in message


def test_a_dataset_without_the_text_column(tmp_path, project_with):
    import datasets

    datasets.Dataset.from_dict({"body": ["a"]}).save_to_disk(tmp_path / "ds")
    project = load_project(project_with('[data.code]\ntrain = ["ds"]\n'))
    message = refused(lambda: project.documents("code", "train"), project.path, tmp_path / "ds")
    assert "no column 'text' (columns: body)" in message


def test_a_dataset_dict_without_the_named_split(tmp_path, project_with):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(
        tmp_path / "dd")
    project = load_project(project_with('[data.code]\ntrain = [{path = "dd", split = "test"}]\n'))
    message = refused(lambda: project.documents("code", "train"), project.path, tmp_path / "dd")
    assert "no split 'test' (splits: train)" in message


def test_a_split_on_a_source_that_is_no_dataset(tmp_path, project_with):
    write_jsonl(tmp_path / "x.jsonl", numbered_docs(3))
    path = project_with('[data.code]\ntrain = [{path = "x.jsonl", split = "train"}]\n')
    assert "only to a datasets folder" in refused(lambda: load_project(path), path.resolve(),
                                                 tmp_path / "x.jsonl")


def test_a_text_file_that_is_not_utf8(tmp_path, project_with):
    write_text(tmp_path / "docs" / "a.txt", "fine")
    binary = tmp_path / "docs" / "b.bin"
    binary.write_bytes(b"\xff\xfe\x00")
    project = load_project(project_with('[data.code]\ntrain = ["docs"]\n'))
    message = refused(lambda: project.documents("code", "train"), project.path, binary)
    assert "not UTF-8" in message


def test_a_domain_that_is_not_a_table(write_project, code_expert):
    path = write_project("experts: {code: models/code}\ndata: {code: null}\n", "gatemix.yaml")
    assert "[data.code] must be a table" in refused(lambda: load_project(path), path.resolve())


def test_a_split_whose_texts_are_all_empty(tmp_path, project_with):
    write_jsonl(tmp_path / "blank.jsonl", [{"text": "  "}, {"text": "\n"}])
    project = load_project(project_with('[data.code]\ntrain = ["blank.jsonl"]\n'))
    message = refused(lambda: project.documents("code", "train"), project.path,
                      tmp_path / "blank.jsonl")
    assert "[data.code] train holds no documents" in message


def test_an_empty_pool_folder(tmp_path, project_with):
    write_text(tmp_path / "pool" / ".only-hidden", "x")
    project = load_project(project_with('[data.code]\nfiles = ["pool"]\n'))
    message = refused(lambda: project.documents("code", "eval"), project.path, tmp_path / "pool")
    assert "[data.code] files holds no documents" in message


def test_a_pool_too_small_to_split(tmp_path, project_with):
    write_jsonl(tmp_path / "two.jsonl", numbered_docs(2))
    project = load_project(project_with('[data.code]\nfiles = ["two.jsonl"]\n'))
    message = refused(lambda: project.documents("code", "train"), project.path, "[data.code] files")
    assert "2 documents; need at least 3" in message


# ---- asking for what the project does not define ----

def test_asking_for_a_split_the_domain_does_not_define(tmp_path, project_with):
    write_jsonl(tmp_path / "x.jsonl", numbered_docs(3))
    project = load_project(project_with('[data.code]\ntrain = ["x.jsonl"]\n'))
    message = refused(lambda: project.documents("code", "gate"), project.path)
    assert "no gate split" in message and "add gate = " in message and "[data.code]" in message


def test_asking_for_an_unknown_domain_or_split(code_pool):
    project = load_project(code_pool)
    assert "no domain 'math'" in refused(lambda: project.documents("math", "train"), project.path)
    assert "unknown split 'test'" in refused(lambda: project.has_split("code", "test"),
                                             project.path)
