"""The document-level split, the frozen data and the manifest hashes."""

from __future__ import annotations

import json

import pytest

from gatemix.demo.build import build_demo
from gatemix.demo.corpus import (
    SPLITS,
    load_manifest,
    load_split,
    load_split_documents,
    split_documents,
    text_sha256,
)
from gatemix.demo.errors import DemoBuildError
from gatemix.demo.sources import cap_man_families, iter_documents, normalize_text, strip_troff

DOC_IDS = [f"/docs/{index:03d}.txt" for index in range(57)]


def _split(doc_ids, seed=0, domain="code"):
    return split_documents(doc_ids, seed=seed, domain=domain, gate_fraction=0.1,
                           eval_fraction=0.1)


def test_split_is_deterministic_for_a_seed_and_ignores_input_order():
    assert _split(DOC_IDS) == _split(list(reversed(DOC_IDS)))
    assert _split(DOC_IDS, seed=1) != _split(DOC_IDS, seed=0)


def test_split_is_disjoint_covers_every_doc_and_has_no_empty_part():
    splits = _split(DOC_IDS)
    assert set(splits) == set(SPLITS)
    assert all(splits[name] for name in SPLITS)
    all_ids = [doc_id for name in SPLITS for doc_id in splits[name]]
    assert sorted(all_ids) == sorted(DOC_IDS)  # no doc twice, none lost
    assert len(splits["train"]) == 57 - 6 - 6


def test_split_of_three_docs_gives_one_each_and_fewer_is_an_error():
    assert [len(ids) for ids in _split(["a", "b", "c"]).values()] == [1, 1, 1]
    with pytest.raises(DemoBuildError):
        _split(["a", "b"])


def test_kept_documents_are_normalized_distinct_and_capped():
    candidates = [("a", lambda: "x" * 50 + "\r\nmore\n"), ("dup", lambda: "x" * 50 + "\nmore"),
                  ("short", lambda: "tiny"), ("b", lambda: "y" * 60), ("c", lambda: "z" * 60)]
    kept = list(iter_documents(candidates, max_docs=2, max_chars=1000, min_chars=20))
    assert kept == [("a", "x" * 50 + "\nmore"), ("b", "y" * 60)]


def test_normalize_text_cuts_at_a_line_break():
    assert normalize_text("one\ntwo\nthree\n", max_chars=9) == "one\ntwo"


def test_strip_troff_keeps_prose_and_drops_markup():
    page = '.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list \\fBfiles\\fR\n.BR ls (1)\n.PP\nText\\(em'
    assert strip_troff(page) == "NAME\nls - list files\nls(1)\n\nText--"


def test_man_page_families_are_capped(tmp_path):
    paths = [tmp_path / f"gcloud_{index}.1.gz" for index in range(9)] + [tmp_path / "ls.1.gz"]
    kept = cap_man_families(paths, per_family=3)
    assert [path.name for path in kept] == ["gcloud_0.1.gz", "gcloud_1.1.gz", "gcloud_2.1.gz",
                                            "ls.1.gz"]


def test_manifest_hashes_match_the_stored_texts(micro_demo):
    manifest = load_manifest(micro_demo.root)
    assert manifest["domains"] == ["code", "legal", "docs"]
    for domain in manifest["domains"]:
        for split in SPLITS:
            stored = load_split_documents(micro_demo.root, domain, split)
            listed = manifest["splits"][domain][split]
            assert [record["id"] for record in listed] == [doc_id for doc_id, _ in stored]
            assert [record["sha256"] for record in listed] == [text_sha256(t) for _, t in stored]
            assert load_split(micro_demo.root, domain, split) == [text for _, text in stored]


def test_stored_splits_are_disjoint_by_id_and_text(micro_demo):
    for domain in ("code", "legal", "docs"):
        documents = [doc for split in SPLITS
                     for doc in load_split_documents(micro_demo.root, domain, split)]
        assert len({doc_id for doc_id, _ in documents}) == len(documents)
        assert len({text for _, text in documents}) == len(documents)


def test_stored_lines_are_id_and_text_json(micro_demo):
    line = (micro_demo.data_dir / "legal" / "train.jsonl").read_text().splitlines()[0]
    assert set(json.loads(line)) == {"id", "text"}


def test_loading_a_missing_split_or_manifest_is_a_demo_error(tmp_path, micro_demo):
    with pytest.raises(DemoBuildError):
        load_split(micro_demo.root, "code", "validation")
    with pytest.raises(DemoBuildError):
        load_split(tmp_path, "code", "train")
    with pytest.raises(DemoBuildError):
        load_manifest(tmp_path)


def test_a_domain_with_no_documents_is_a_demo_error(tmp_path, make_micro_config):
    empty = tmp_path / "empty"
    empty.mkdir()
    config = make_micro_config(tmp_path / "out", domains=("legal",), licenses_dir=str(empty),
                               package_docs_dir=str(empty))
    with pytest.raises(DemoBuildError, match="no documents found for domain 'legal'"):
        build_demo(config)
