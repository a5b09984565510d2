"""Data loaders (CSV, JSON Lines, Parquet, a saved datasets directory, the embedded corpus) and partitions."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pytest
from pyarrow import csv, parquet

from chorus_mq.errors import ConfigError, DataError
from chorus_mq.names import PartitionKind
from chorus_mq.training.data import Examples, load_examples, map_labels, read_table, resolve_model
from chorus_mq.training.partition import PartitionSpec, partition

ROWS = {"review": ["good", "bad", "fine", "awful"], "stars": ["pos", "neg", "pos", "neg"], "who": ["a", "b", "a", "c"]}
LABELS = ("neg", "pos")
WANT = Examples(("good", "bad", "fine", "awful"), (1, 0, 1, 0))


def _write(kind: str, tmp_path):
    table = pa.table(ROWS)
    if kind == "csv":
        path = tmp_path / "d.csv"
        csv.write_csv(table, path)
    elif kind == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text(
            "".join(json.dumps(dict(zip(ROWS, row, strict=True))) + "\n" for row in zip(*ROWS.values(), strict=True))
        )
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        parquet.write_table(table, path)
    else:  # what datasets' save_to_disk writes: Arrow stream files, state.json, dataset_info.json
        path = tmp_path / "saved"
        path.mkdir()
        with (
            pa.OSFile(str(path / "data-00000-of-00001.arrow"), "wb") as sink,
            pa.ipc.new_stream(sink, table.schema) as w,
        ):
            w.write_table(table)
        (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
        (path / "dataset_info.json").write_text("{}")
    return path


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet", "datasets-dir"])
def test_every_format_loads_the_same_examples(kind, tmp_path):
    path = _write(kind, tmp_path)
    got = load_examples(path, text_column="review", label_column="stars", labels=LABELS, group_column="who")
    assert got.texts == WANT.texts and got.labels == WANT.labels and got.groups == ("a", "b", "a", "c")
    assert load_examples(path, text_column="review").labels is None  # causal-lm: unlabelled


def test_a_datasets_dict_dir_names_its_splits(tmp_path):
    (tmp_path / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(DataError, match="train, test"):
        read_table(tmp_path)


def test_unknown_labels_are_refused_by_name(tmp_path):
    path = _write("csv", tmp_path)
    with pytest.raises(DataError, match=r"'pos'.*not among the federation's labels \['neg', 'mixed'\]"):
        load_examples(path, text_column="review", label_column="stars", labels=("neg", "mixed"))


def test_integer_labels_index_the_federation_labels():
    assert map_labels([1, 0, "1"], LABELS) == (1, 0, 1)
    with pytest.raises(DataError, match="2"):
        map_labels([2], LABELS)


def test_missing_columns_and_formats_are_named(tmp_path):
    path = _write("csv", tmp_path)
    with pytest.raises(DataError, match=r"no column 'text' \(columns: review, stars, who\)"):
        load_examples(path)
    other = tmp_path / "d.xlsx"
    other.write_bytes(b"PK")
    with pytest.raises(DataError, match="unknown format"):
        load_examples(other)
    with pytest.raises(DataError, match="does not exist"):
        load_examples(tmp_path / "nope.csv")


def test_embedded_rotten_tomatoes_drops_plot_rows_and_uses_its_labels():
    examples = load_examples("rotten-tomatoes", labels=("rotten", "fresh"), group_column="movie_name")
    assert 4800 < len(examples) < 4900  # 2455 fresh + 2411 rotten; the 156 "plot" synopses are not reviews
    assert Counter(examples.labels) == {1: 2455, 0: 2411}
    assert examples.groups is not None and len(set(examples.groups)) > 10


def test_embedded_model_resolves_to_a_model_dir(tmp_path):
    assert (resolve_model("minilm") / "config.json").is_file()
    with pytest.raises(ConfigError, match="minilm"):
        resolve_model(tmp_path)


def _examples(n: int, classes: int = 2) -> Examples:
    return Examples(
        tuple(f"t{i}" for i in range(n)), tuple(i % classes for i in range(n)), tuple(f"g{i % 7}" for i in range(n))
    )


def test_partition_specs_parse_and_refuse_nonsense():
    assert PartitionSpec.parse("iid") == PartitionSpec(PartitionKind.IID)
    assert PartitionSpec.parse("dirichlet:0.5").alpha == 0.5
    assert PartitionSpec.parse("by:movie").column == "movie"
    for bad in ("dirichlet:-1", "dirichlet:x", "by:", "random", "iid:3"):
        with pytest.raises(ConfigError):
            PartitionSpec.parse(bad)


def test_iid_covers_every_row_once_and_is_seeded():
    ex = _examples(103)
    parts = partition(ex, 4, PartitionSpec.parse("iid"), seed=1)
    assert sorted(i for p in parts for i in p) == list(range(103))
    assert [len(p) for p in parts] == [26, 26, 26, 25]
    assert parts == partition(ex, 4, PartitionSpec.parse("iid"), seed=1)
    assert parts != partition(ex, 4, PartitionSpec.parse("iid"), seed=2)


def test_dirichlet_skews_labels_more_at_small_alpha():
    ex = _examples(2000, classes=2)

    def skew(alpha: float) -> float:
        parts = partition(ex, 5, PartitionSpec(PartitionKind.DIRICHLET, alpha=alpha), seed=0)
        assert sorted(i for p in parts for i in p) == list(range(2000))
        fractions = [sum(ex.labels[i] for i in p) / len(p) for p in parts]
        return max(fractions) - min(fractions)

    assert skew(0.1) > 0.5 > skew(100.0)
    one = partition(ex, 5, PartitionSpec(PartitionKind.DIRICHLET, alpha=0.1), seed=3)
    assert one == partition(ex, 5, PartitionSpec(PartitionKind.DIRICHLET, alpha=0.1), seed=3)


def test_by_column_keeps_groups_whole():
    ex = _examples(70)
    parts = partition(ex, 3, PartitionSpec.parse("by:g"), seed=0)
    owners = {ex.groups[i]: c for c, p in enumerate(parts) for i in p}
    assert len(owners) == 7 and all(owners[ex.groups[i]] == c for c, p in enumerate(parts) for i in p)
    with pytest.raises(DataError, match="7 distinct values: fewer than 8 clients"):
        partition(ex, 8, PartitionSpec.parse("by:g"))
    with pytest.raises(DataError, match="skews labels: the examples have none"):
        partition(Examples(ex.texts), 3, PartitionSpec.parse("dirichlet:1"))


def test_the_federations_base_model_is_the_default_where_it_is_here(tmp_path):
    from chorus_mq.training.data import model_of_federation, resolve_model

    assert model_of_federation(None, "minilm") == resolve_model("minilm")
    assert model_of_federation("minilm", "/elsewhere/Llama-3.2-3B") == resolve_model("minilm")
    with pytest.raises(ConfigError, match=r"base model is '/elsewhere/Llama-3.2-3B'.*pass --model"):
        model_of_federation(None, "/elsewhere/Llama-3.2-3B")
    (tmp_path / "config.json").write_text("{}")
    assert model_of_federation(None, str(tmp_path)) == tmp_path
