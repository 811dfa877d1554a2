"""Reading inputs: Parquet files, folders or globs, JSONL files, and ``datasets`` folders."""

from __future__ import annotations

import glob
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

JSON_SUFFIXES = (".jsonl", ".json")
TEXT_FIELDS = ("id", "prompt", "instruction", "task")
# fields with structure the row checks read; where the inputs type them differently they travel as JSON text
STRUCTURED_FIELDS = ("instruction_spans", "messages")
TYPE_ERRORS = "_type_errors"  # internal column: "field=type" for input fields of the wrong type
READ_ERROR = "_read_error"  # internal column: why a JSON line could not be read as a row
# a JSON-lines file is surveyed and read in parts of about this size, cut after a line end: a file of
# millions of rows is never parsed whole in one process (400 MB of JSON lines took 1.7 GB so)
JSON_PART_BYTES = 16 << 20


class InputError(ValueError):
    """An input that does not exist or cannot be read."""


@dataclass(frozen=True)
class Source:
    kind: str  # "parquet", "json" or "datasets"
    paths: tuple[str, ...]


def _is_datasets_folder(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "state.json").is_file()


def resolve_inputs(specs: tuple[str, ...] | list[str]) -> list[Source]:
    """Expand files, folders and globs into sources; fails on anything missing or unknown."""
    parquet, jsonl, datasets = [], [], []
    for spec in specs:
        if "://" in spec:
            raise InputError(f"{spec}: remote URIs are not read yet; copy the files to this machine or mount them here")
        matches = sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec]
        if not matches:
            raise InputError(f"no input matches {spec!r}")
        for match in matches:
            path = Path(match)
            if not path.exists():
                raise InputError(f"input not found: {match}")
            if path.is_dir():
                if (path / "dataset_dict.json").is_file():
                    splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
                    raise InputError(
                        f"{match} is a DatasetDict with splits {', '.join(splits)}: pass one split's folder, "
                        f"e.g. {path / (splits[0] if splits else 'train')}"
                    )
                if _is_datasets_folder(path):
                    datasets.append(str(path))
                    continue
                files = sorted(str(p) for p in path.rglob("*.parquet"))
                jsons = sorted(str(p) for p in path.rglob("*") if p.suffix in JSON_SUFFIXES)
                if not files and not jsons:
                    raise InputError(f"folder {match} holds no .parquet or .jsonl files")
                parquet += files
                jsonl += jsons
            elif path.suffix == ".parquet":
                parquet.append(str(path))
            elif path.suffix in JSON_SUFFIXES:
                jsonl.append(str(path))
            else:
                raise InputError(f"unsupported input {match}: use .parquet, .jsonl/.json, or a folder of them")
    sources = []
    if parquet:
        sources.append(Source("parquet", tuple(parquet)))
    if jsonl:
        sources.append(Source("json", tuple(jsonl)))
    sources += [Source("datasets", (path,)) for path in datasets]
    return sources


@dataclass
class Survey:
    """What the driver reads of every input before the run: each row's ``id`` (``None`` where missing),
    and the columns the inputs type differently, with the type every block is cast to (``None``: JSON
    text, where the types cannot be unified, as an int in one shard and text in the next)."""

    ids: list[object]
    conform: dict[str, pa.DataType | None]
    json_parts: list[JsonPart]


@dataclass(frozen=True)
class JsonPart:
    """Bytes ``[start, end)`` of a JSON file: whole lines of a JSON-lines file, or the whole of a file
    that opens with ``[`` (see :func:`json_file_rows`)."""

    path: str
    start: int
    end: int

    def rows(self) -> list[dict]:
        with open(self.path, "rb") as file:
            file.seek(self.start)
            data = file.read(self.end - self.start)
        # a later part holds only whole lines, whatever its first line opens with
        return json_file_rows(data) if self.start == 0 else [_json_row(line) for line in split_lines(data)]


def json_parts(path: str) -> list[JsonPart]:
    """A JSON file's parts: a JSON-lines file cut after the first line end past every
    :data:`JSON_PART_BYTES`, a file that opens with ``[`` (a JSON array) whole."""
    size = os.path.getsize(path)
    parts, start = [], 0
    with open(path, "rb") as file:
        if _first_byte(file) == b"[":
            return [JsonPart(path, 0, size)]
        while start < size:
            end = min(start + JSON_PART_BYTES, size)
            file.seek(end)
            while end < size:
                block = file.read(1 << 20)
                cut = block.find(b"\n")
                if cut >= 0 or not block:
                    end = end + cut + 1 if cut >= 0 else size
                    break
                end += len(block)
            parts.append(JsonPart(path, start, end))
            start = end
    return parts


def _first_byte(file) -> bytes:
    """The file's first byte that is not whitespace (``b""`` when there is none)."""
    while block := file.read(1 << 16):
        if text := block.lstrip():
            return text[:1]
    return b""


def survey(sources: list[Source]) -> Survey:
    """Ids read column-only (JSON files parsed a part at a time), types from the Parquet footers and the
    parsed lines."""
    ids: list[object] = []
    types: dict[str, set[pa.DataType]] = {}
    parts: list[JsonPart] = []

    def add(schema: pa.Schema) -> None:
        for field in schema:
            if field.name not in TEXT_FIELDS:
                types.setdefault(field.name, set()).add(field.type)

    for source in sources:
        if source.kind == "datasets":
            import datasets

            dataset = datasets.load_from_disk(source.paths[0])
            ids += dataset["id"] if "id" in dataset.column_names else [None] * len(dataset)
            add(dataset.data.schema)
            continue
        for path in source.paths:
            if source.kind == "json":
                for part in json_parts(path):
                    rows = part.rows()
                    ids += [row.get("id") for row in rows]
                    add(rows_to_table(rows).schema)
                    parts.append(part)
                continue
            dataset = pads.dataset(path, format="parquet")
            add(dataset.schema)
            if "id" in dataset.schema.names:
                ids += dataset.to_table(columns=["id"]).column("id").to_pylist()
            else:
                ids += [None] * dataset.count_rows()
    # a column all null in one shard (JSON lines that lack it) takes the type the others give it
    drifting = {name: kinds - {pa.null()} or kinds for name, kinds in types.items() if len(kinds) > 1}
    conform = {name: None if name in STRUCTURED_FIELDS else _unified(k) for name, k in drifting.items()}
    return Survey(ids, conform, parts)


def _unified(kinds: set[pa.DataType]) -> pa.DataType | None:
    """The type all of ``kinds`` promote to (int32 and int64: int64), or None when there is none."""
    try:
        return pa.unify_schemas([pa.schema([("c", kind)]) for kind in kinds], promote_options="permissive")[0].type
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return None


def conform_types(batch: pa.Table, conform: dict[str, pa.DataType | None]) -> pa.Table:
    """Cast the columns the inputs type differently to one type, or write them as JSON text, so that
    blocks of different shards can share a batch and a file."""
    for name, kind in conform.items():
        if name not in batch.column_names:
            continue
        index = batch.schema.get_field_index(name)
        if kind is not None:
            batch = batch.set_column(index, name, batch.column(name).cast(kind))
        elif not pa.types.is_string(batch.schema.field(name).type):
            text = [None if v is None else json.dumps(v, default=str) for v in batch.column(name).to_pylist()]
            batch = batch.set_column(index, name, pa.array(text, pa.string()))
    return batch


def duplicate_ids(ids: list[object]) -> dict[str, int]:
    """String ids that occur more than once, with their counts."""
    counts = Counter(i for i in ids if isinstance(i, str))
    return {i: n for i, n in counts.items() if n > 1}


def read_dataset(sources: list[Source], inputs: Survey, placement: dict | None = None):
    """One Ray dataset over every source, its columns typed alike (``inputs.conform``), its files read by
    tasks placed by ``placement`` (a read's named remote parameters: where the paths are); JSON files a
    part at a time (``inputs.json_parts``)."""
    import ray.data

    placement, conform = placement or {}, inputs.conform
    typed, datasets = [], []  # typed: text fields as their files typed them, for normalize_types
    for source in sources:
        if source.kind == "parquet":
            # files whose schemas differ (a column typed int in one shard) are read apart; the engine
            # stage turns their bad fields into error rows instead of the read failing as a whole
            by_schema: dict[str, list[str]] = {}
            for path in source.paths:
                by_schema.setdefault(pq.read_schema(path).remove_metadata().to_string(), []).append(path)
            typed += [ray.data.read_parquet(paths, **placement) for paths in by_schema.values()]
        elif source.kind == "json":
            # each line parsed on its own: rows of different forms keep only their own fields; read as
            # bytes (read_text fails a whole file on one invalid byte, and splits lines at U+2028)
            paths = set(source.paths)  # a set: a folder of thousands of files has as many parts
            tasks = read_tasks([part for part in inputs.json_parts if part.path in paths])
            if not tasks:  # empty files only
                continue
            datasets.append(
                ray.data.from_items(tasks, override_num_blocks=len(tasks)).map_batches(
                    parse_json_parts, batch_size=1, batch_format="pyarrow", fn_args=(conform,), **placement
                )
            )
        else:
            import datasets as hf_datasets

            typed.append(ray.data.from_huggingface(hf_datasets.load_from_disk(source.paths[0])))
    # one schema for the known fields (parse_json_parts already writes JSON rows so)
    datasets += [dataset.map_batches(normalize_types, batch_format="pyarrow", fn_args=(conform,)) for dataset in typed]
    first, *rest = datasets
    return first.union(*rest) if rest else first


def iter_rows(path: str | Path) -> Iterator[dict]:
    """The rows of one Parquet or JSON file as Python dicts, a Parquet batch or a JSON part at a time (a
    plan, a preview, an evaluation's rows: not a run's inputs, which Ray Data reads)."""
    if Path(path).suffix in JSON_SUFFIXES:
        for part in json_parts(str(path)):
            yield from part.rows()
    else:
        for batch in pq.ParquetFile(path).iter_batches():
            yield from batch.to_pylist()


def json_file_rows(data: bytes) -> list[dict]:
    """The rows of a JSON file: one object per line (JSON lines, each line read on its own), or one JSON
    array of objects, as ``.json`` datasets are often written (pretty-printed, one line per field)."""
    if data.lstrip()[:1] == b"[":
        try:
            items = json.loads(data)
        except ValueError:  # JSON lines whose first line is a list: read line by line
            items = None
        if isinstance(items, list):
            return [
                item if isinstance(item, dict) else {READ_ERROR: f"not a JSON object but {type(item).__name__}"}
                for item in items
            ]
    return [_json_row(line) for line in split_lines(data)]


def split_lines(data: bytes) -> list[bytes]:
    """JSON lines end at ``\n`` only (a raw U+2028 or form feed inside a string is not a line break)."""
    return [line for line in data.split(b"\n") if line.strip()]


def _json_row(line: bytes) -> dict:
    """One JSON-lines row; a line that is not UTF-8 JSON holding an object gives a row holding only its
    ``READ_ERROR``."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        return {READ_ERROR: f"not valid UTF-8 (byte {error.start} of the line)"}
    try:
        row = json.loads(text)
    except ValueError as error:
        return {READ_ERROR: f"not valid JSON ({error})"}
    return row if isinstance(row, dict) else {READ_ERROR: f"not a JSON object but {type(row).__name__}"}


def read_tasks(parts: list[JsonPart]) -> list[dict[str, list[dict]]]:
    """``parts`` as the items of the read tasks: consecutive parts together up to :data:`JSON_PART_BYTES`,
    a larger one alone. A folder of 1,000 small files took 21.6 s to read with a task per file, 4.0 s so."""
    tasks: list[list[JsonPart]] = []
    size = JSON_PART_BYTES
    for part in parts:
        if size + part.end - part.start > JSON_PART_BYTES:
            tasks.append([])
            size = 0
        tasks[-1].append(part)
        size += part.end - part.start
    return [{"parts": [asdict(part) for part in task]} for task in tasks]


def parse_json_parts(batch: pa.Table, conform: dict[str, pa.DataType | None]) -> pa.Table:
    """Arrow rows from parts of JSON files (:func:`read_tasks`' items). A field a row lacks stays null (not
    NaN), a column keeps its Arrow type (lists stay lists), and a column whose values disagree in type is
    kept as JSON text; a text field of the wrong type is written as text and noted in ``TYPE_ERRORS``, as
    :func:`normalize_types` does for typed files."""
    rows = [row for task in batch.column("parts").to_pylist() for part in task for row in JsonPart(**part).rows()]
    notes: list[list[str]] = [[] for _ in rows]
    for row, note in zip(rows, notes):
        for name in TEXT_FIELDS:
            value = row.get(name)
            if value is not None and not isinstance(value, str):
                note.append(f"{name}={type(value).__name__}")
                row[name] = json.dumps(value)
    table = conform_types(rows_to_table(rows), conform)
    return table.append_column(TYPE_ERRORS, pa.array([",".join(n) or None for n in notes], pa.string()))


def rows_to_table(rows: list[dict]) -> pa.Table:
    """An Arrow table of every field of any row (``Table.from_pylist`` keeps only the first row's); a
    field a row lacks is null, and a column whose values disagree in type is kept as JSON text."""
    columns: dict[str, pa.Array] = {}
    for name in dict.fromkeys(key for row in rows for key in row):
        values = [row.get(name) for row in rows]
        try:
            columns[name] = pa.array(values, pa.string() if name in TEXT_FIELDS else None)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # OverflowError: an integer beyond 64 bits
            columns[name] = pa.array([None if v is None else json.dumps(v) for v in values], pa.string())
    return pa.table(columns) if columns else pa.table({"id": pa.array([], pa.string())})


def _as_text(value: object) -> str | None:
    """A text field's value as text: UTF-8 bytes decoded (None when they are not UTF-8), anything else
    as JSON (dates and the like as their text)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return json.dumps(value, default=str)


def normalize_types(batch: pa.Table, conform: dict[str, pa.DataType | None]) -> pa.Table:
    """Write the text fields as text whatever a shard typed them, noting each wrong type in
    ``TYPE_ERRORS`` so the row becomes an error row naming the field, not a failed read. Binary
    columns holding UTF-8 are text (some writers type strings so)."""
    notes: list[list[str]] = [[] for _ in range(batch.num_rows)]
    for name in TEXT_FIELDS:
        if name not in batch.column_names:
            continue
        kind = batch.schema.field(name).type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind):
            continue
        values = batch.column(name).to_pylist()
        text = [None if v is None else _as_text(v) for v in values]
        for row, (value, decoded) in enumerate(zip(values, text)):
            if value is not None and not (isinstance(value, bytes) and decoded is not None):
                kind = "bytes that are not UTF-8" if isinstance(value, bytes) else type(value).__name__
                notes[row].append(f"{name}={kind}")
        batch = batch.set_column(batch.schema.get_field_index(name), name, pa.array(text, pa.string()))
    column = pa.array([",".join(n) or None for n in notes], pa.string())
    batch = conform_types(batch, conform)
    if TYPE_ERRORS in batch.column_names:
        return batch.set_column(batch.schema.get_field_index(TYPE_ERRORS), TYPE_ERRORS, column)
    return batch.append_column(TYPE_ERRORS, column)
