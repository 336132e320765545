"""The project file read the way every job reads it: each data form, splits, records, writing."""

from __future__ import annotations

import hashlib
import json

import pytest
from project_builders import numbered_docs, write_jsonl, write_text

from gatemix.data_sources import file_sha256, split_documents
from gatemix.project import SPLITS, ProjectError, load_project
from gatemix.project_writer import write_project_file


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_jsonl_splits_use_the_domain_text_field_and_drop_empty_texts(
        tmp_path, code_expert, write_project):
    train = tmp_path / "data" / "code" / "train.jsonl"
    train.parent.mkdir(parents=True)
    train.write_text('{"body": "def f(): pass"}\n\n{"body": "   "}\n{"body": "x = 1", "n": 2}\n')
    write_jsonl(tmp_path / "data" / "code" / "gate.jsonl", [{"body": "gate doc"}])
    write_jsonl(tmp_path / "data" / "code" / "eval.jsonl", [{"body": "eval doc"}])
    project = load_project(write_project("""
        [experts]
        code = "models/code"
        [data.code]
        text_field = "body"
        train = ["data/code/train.jsonl"]
        gate = ["data/code/gate.jsonl"]
        eval = ["data/code/eval.jsonl"]
    """))
    assert project.documents("code", "train") == [
        ("data/code/train.jsonl#0", "def f(): pass"), ("data/code/train.jsonl#3", "x = 1")]
    assert project.texts("code", "eval") == ["eval doc"]
    assert all(project.has_split("code", split) for split in SPLITS)


def test_text_file_and_folder_sources_give_one_document_per_file(
        tmp_path, code_expert, write_project):
    write_text(tmp_path / "notes.txt", "a whole file\nof notes\n")
    write_text(tmp_path / "docs" / "b.md", "second")
    write_text(tmp_path / "docs" / "a" / "z.rst", "first, by sorted path")
    write_text(tmp_path / "docs" / ".hidden", "skipped")
    write_text(tmp_path / "docs" / ".git" / "HEAD", "skipped too")
    project = load_project(write_project("""
        [experts]
        code = "models/code"
        [data.code]
        train = ["docs"]
        eval = ["notes.txt"]
    """))
    assert project.documents("code", "train") == [
        ("docs/a/z.rst", "first, by sorted path"), ("docs/b.md", "second")]
    assert project.documents("code", "eval") == [("notes.txt", "a whole file\nof notes\n")]
    assert not project.has_split("code", "gate")


def test_parquet_source_reads_its_text_column(tmp_path, code_expert, write_project):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"content": ["one", None, "three"], "n": [1, 2, 3]}),
                   tmp_path / "data" / "rows.parquet")
    project = load_project(write_project("""
        [experts]
        code = "models/code"
        [data.code]
        train = [{path = "data/rows.parquet", text_field = "content"}]
    """))
    assert project.documents("code", "train") == [
        ("data/rows.parquet#0", "one"), ("data/rows.parquet#2", "three")]


def test_datasets_folders_one_dataset_and_the_splits_of_a_dataset_dict(
        tmp_path, code_expert, write_project):
    import datasets

    datasets.Dataset.from_dict({"text": ["ds one", "ds two"]}).save_to_disk(tmp_path / "single")
    datasets.DatasetDict({
        "validation": datasets.Dataset.from_dict({"text": ["val doc"]}),
        "train": datasets.Dataset.from_dict({"text": ["train doc"]}),
    }).save_to_disk(tmp_path / "dict")
    project = load_project(write_project("""
        [experts]
        code = "models/code"
        [data.code]
        train = ["single", "dict"]
        eval = [{path = "dict", format = "datasets", split = "validation"}]
    """))
    assert project.documents("code", "train") == [
        ("single#0", "ds one"), ("single#1", "ds two"),
        ("dict#train/0", "train doc"), ("dict#validation/0", "val doc")]
    assert project.documents("code", "eval") == [("dict#validation/0", "val doc")]


def test_a_pool_is_split_disjoint_complete_and_the_same_on_every_load(code_pool):
    project = load_project(code_pool)
    splits = {split: project.documents("code", split) for split in SPLITS}
    ids = {split: {doc_id for doc_id, _ in documents} for split, documents in splits.items()}
    all_ids = {f"data/code.jsonl#{index}" for index in range(20)}
    assert set().union(*ids.values()) == all_ids
    assert sum(len(split_ids) for split_ids in ids.values()) == 20
    assert {split: len(split_ids) for split, split_ids in ids.items()} == {
        "train": 16, "gate": 2, "eval": 2}
    reloaded = load_project(code_pool)
    assert {split: reloaded.documents("code", split) for split in SPLITS} == splits


def test_the_pool_split_follows_the_seed(code_pool):
    first = load_project(code_pool).documents("code", "eval")
    code_pool.write_text(code_pool.read_text().replace("[data.code]", "[data.code]\nseed = 1"))
    assert load_project(code_pool).documents("code", "eval") != first


def test_split_documents_depends_on_the_set_of_ids_not_their_order():
    ids = [f"doc-{index}" for index in range(30)]
    kwargs = {"seed": 1, "domain": "code", "gate_fraction": 0.2, "eval_fraction": 0.1}
    assert split_documents(ids, **kwargs) == split_documents(ids[::-1], **kwargs)
    tiny = split_documents(ids[:3], **{**kwargs, "eval_fraction": 0.6, "gate_fraction": 0.3})
    assert sorted(len(split) for split in tiny.values()) == [1, 1, 1]


def test_split_documents_matches_the_demo_corpus_rule():
    from gatemix.demo.corpus import split_documents as demo_split_documents

    for count in (3, 4, 11, 50):
        ids = [f"doc-{index}" for index in range(count)]
        kwargs = {"seed": 3, "domain": "legal", "gate_fraction": 0.1, "eval_fraction": 0.2}
        assert split_documents(ids, **kwargs) == demo_split_documents(ids, **kwargs)


def test_write_split_record_lists_every_document_and_hashes_every_source(
        tmp_path, code_pool, make_expert, write_project):
    make_expert("legal")
    write_text(tmp_path / "legal" / "a.txt", "contract a")
    write_text(tmp_path / "legal" / "b.txt", "contract b")
    project = load_project(write_project("""
        [experts]
        code = "models/code"
        legal = "models/legal"
        [data.code]
        files = ["data/code.jsonl"]
        [data.legal]
        train = ["legal"]
    """))
    record_path = project.write_split_record()
    assert record_path == tmp_path / "gatemix-work" / "splits.json"
    assert [path.name for path in record_path.parent.iterdir()] == ["splits.json"]  # no temp left
    record = json.loads(record_path.read_text())
    assert record["splits"] == project.split_listing()
    assert set(record["splits"]) == {"code", "legal"}
    assert set(record["splits"]["legal"]) == {"train"}
    listed = record["splits"]["code"]["eval"]
    assert listed == [{"id": doc_id, "sha256": sha256(text)}
                      for doc_id, text in project.documents("code", "eval")]
    code_source, = record["sources"]["code"]["files"]
    assert code_source["path"] == "data/code.jsonl"
    assert code_source["sha256"] == file_sha256(tmp_path / "data" / "code.jsonl")
    folder_listing = [["a.txt", file_sha256(tmp_path / "legal" / "a.txt")],
                      ["b.txt", file_sha256(tmp_path / "legal" / "b.txt")]]
    assert record["sources"]["legal"]["train"][0]["sha256"] == sha256(json.dumps(folder_listing))
    elsewhere = project.write_split_record(tmp_path / "fit" / "record.json")
    assert json.loads(elsewhere.read_text()) == record


def test_yaml_and_toml_forms_give_the_same_project(tmp_path, code_expert, write_project):
    write_jsonl(tmp_path / "train.jsonl", [{"body": "train text"}])
    toml_project = load_project(write_project("""
        name = "ens"
        [experts]
        code = "models/code"
        [data]
        text_field = "body"
        [data.code]
        train = ["train.jsonl"]
    """, "project.toml"))
    yaml_project = load_project(write_project("""
        name: ens
        experts:
          code: models/code
        data:
          text_field: body
          code:
            train: [train.jsonl]
    """, "project.yaml"))
    assert yaml_project.experts == toml_project.experts
    assert yaml_project.data == toml_project.data
    assert yaml_project.documents("code", "train") == [("train.jsonl#0", "train text")]


@pytest.mark.parametrize("file_name", ["gatemix.toml", "gatemix.yaml"])
def test_a_folder_stands_for_the_project_file_inside_it(tmp_path, code_pool, file_name):
    if file_name.endswith(".yaml"):
        code_pool.unlink()
        (tmp_path / file_name).write_text(
            "experts: {code: models/code}\ndata: {code: {files: [data/code.jsonl]}}\n")
    project = load_project(tmp_path)
    assert project.path == (tmp_path / file_name).resolve()
    assert project.root == tmp_path.resolve()


def test_defaults_name_work_dir_and_the_job_folders(tmp_path, code_pool):
    project = load_project(code_pool)
    assert project.name == tmp_path.name
    assert project.work_dir == tmp_path / "gatemix-work"
    assert project.gate_dir == project.work_dir / "gate"
    assert project.composite_dir == project.work_dir / "composite"
    assert project.student_dir == project.work_dir / "student"
    assert project.cache_dir == project.work_dir / "cache"
    assert project.domains == ["code"] and project.baselines == {}


def test_serve_table_names_the_draft_relative_to_the_project(tmp_path, code_pool):
    assert load_project(code_pool).draft is None
    code_pool.write_text(code_pool.read_text() + '[serve]\ndraft = "gatemix-work/student"\nnum_draft_tokens = 4\n')
    project = load_project(code_pool)
    assert project.draft == tmp_path / "gatemix-work" / "student"
    assert project.num_draft_tokens == 4


def test_paths_expand_home_and_may_be_absolute(tmp_path, code_pool, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "models"))
    (tmp_path / "mono").mkdir()
    code_pool.write_text(f'work_dir = "{tmp_path / "elsewhere"}"\n'
                         + code_pool.read_text().replace('"models/code"', '"~/code"')
                         + f'[baselines]\nmono = "{tmp_path / "mono"}"\n')
    project = load_project(code_pool)
    assert project.experts == {"code": tmp_path / "models" / "code"}
    assert project.baselines == {"mono": tmp_path / "mono"}
    assert project.work_dir == tmp_path / "elsewhere"


def test_experts_are_read_in_order_without_hashing_weights(tmp_path, code_pool, make_expert):
    make_expert("legal")
    write_jsonl(tmp_path / "legal.jsonl", numbered_docs(4, "clause"))
    code_pool.write_text(code_pool.read_text().replace(
        '[data.code]', 'legal = "models/legal"\n[data.legal]\nfiles = ["legal.jsonl"]\n[data.code]'))
    project = load_project(code_pool)
    folders = project.expert_folders()
    assert [folder.name for folder in folders] == ["code", "legal"] == project.domains
    assert [folder.path for folder in folders] == list(project.experts.values())
    assert all("weights_hash" not in vars(folder) for folder in folders)


def test_documents_are_read_once_and_kept(tmp_path, code_pool):
    project = load_project(code_pool)
    first = project.documents("code", "train")
    (tmp_path / "data" / "code.jsonl").unlink()
    assert project.documents("code", "train") == first
    assert project.texts("code", "gate") == [text for _, text in project.documents("code", "gate")]


def test_check_data_false_defers_missing_sources_to_reading(tmp_path, code_pool):
    (tmp_path / "data" / "code.jsonl").unlink()
    project = load_project(code_pool, check_data=False)
    with pytest.raises(ProjectError, match="does not exist"):
        project.documents("code", "train")


def test_write_project_file_round_trips(tmp_path, make_expert):
    folder = tmp_path / "proj"
    experts = {"code": make_expert("code"), "legal": make_expert("legal")}
    write_jsonl(folder / "data" / "code" / "train.jsonl", [{"text": "t"}])
    write_jsonl(folder / "data" / "code" / "eval.jsonl", [{"text": "e"}])
    write_jsonl(folder / "data" / "legal.jsonl", [{"body": f"clause {i}"} for i in range(5)])
    outside = write_jsonl(tmp_path / "shared" / "gate.jsonl", [{"text": "g"}])
    data = {
        "code": {"train": [folder / "data" / "code" / "train.jsonl"], "gate": [str(outside)],
                 "eval": [{"path": folder / "data" / "code" / "eval.jsonl", "format": "jsonl"}]},
        "legal": {"files": [folder / "data" / "legal.jsonl"], "text_field": "body", "seed": 4},
    }
    path = write_project_file(folder, name="my ensemble", experts=experts, data=data,
                              baselines={"mono": experts["code"]}, work_dir=folder / "work",
                              defaults={"gate_fraction": 0.2, "eval_fraction": 0.2})
    assert path == folder / "gatemix.toml"
    written = path.read_text()
    assert '"data/code/train.jsonl"' in written and f'"{outside}"' in written
    assert 'work_dir = "work"' in written
    project = load_project(path)
    assert project.name == "my ensemble"
    assert project.experts == experts and project.baselines == {"mono": experts["code"]}
    assert project.work_dir == folder / "work"
    assert {domain: {key: [source.path for source in sources]
                     for key, sources in project.data[domain].sources.items()}
            for domain in project.domains} == {
        "code": {"train": [folder / "data" / "code" / "train.jsonl"], "gate": [outside],
                 "eval": [folder / "data" / "code" / "eval.jsonl"]},
        "legal": {"files": [folder / "data" / "legal.jsonl"]}}
    legal = project.data["legal"]
    assert (legal.seed, legal.gate_fraction, legal.sources["files"][0].text_field) == (4, 0.2, "body")
    assert len(project.documents("legal", "train")) == 3
