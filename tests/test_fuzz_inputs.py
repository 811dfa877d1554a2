"""Bad input, fuzzed: ``hypothesis`` writes input shards (Parquet and JSON lines) mixing good rows with
rows holding random defects, and ``generate`` must write exactly one row per input row, an error naming
the field for every bad row, and for every good row the tokens a clean run of it alone gives."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from directer import Directer, SteeringConfig
from pipeline.config import GenerateConfig
from pipeline.outputs import RunOutput
from pipeline.run import generate

STEERING = SteeringConfig(max_new_tokens=2)
POOL = [
    {
        "prompt": "Describe a lighthouse. Answer in exactly two sentences.",
        "instruction": "Answer in exactly two sentences.",
    },
    {"prompt": "Name three rivers. Use only lowercase letters.", "instruction_spans": [[19, 46]]},
    {"prompt": "Explain what rain is. Do not use any commas.", "instruction": "Do not use any commas."},
    {"prompt": "Give a tip for sleeping well.", "instruction": None},
]
TEXT = st.text(st.characters(codec="utf-8"), max_size=40)
CONTROL = st.text(st.characters(max_codepoint=31), min_size=1, max_size=5)

# each defect: (strategy of a row without its id, the field its error must name); None: the row is fine
DEFECTS: dict[str, tuple[st.SearchStrategy[dict], str | None]] = {
    "null prompt": (st.just({"prompt": None}), "prompt"),
    "blank prompt": (st.sampled_from(["", "   ", "\n\t"]).map(lambda p: {"prompt": p}), "prompt"),
    "huge prompt": (st.just({"prompt": "word " * 9000}), "prompt"),
    "control characters": (st.tuples(TEXT, CONTROL).map(lambda t: {"prompt": f"Say {t[0]}{t[1]} now."}), None),
    "prompt typed int": (st.integers(-(2**63), 2**63 - 1).map(lambda n: {"prompt": n}), "prompt"),
    "instruction typed list": (st.just({"prompt": "Say hi.", "instruction": ["Say", "hi"]}), "instruction"),
    "instruction absent": (
        TEXT.map(lambda t: {"prompt": "Say hi.", "instruction": f"Never {t} say it."}),
        "instruction",
    ),
    "empty instruction": (st.just({"prompt": "Say hi.", "instruction": ""}), "instruction"),
    "span out of range": (
        st.integers(8, 10**6).map(lambda n: {"prompt": "Say hi.", "instruction_spans": [[0, n]]}),
        "instruction_spans",
    ),
    "span inverted": (st.just({"prompt": "Say hi now.", "instruction_spans": [[6, 2]]}), "instruction_spans"),
    "spans overlapping": (
        st.just({"prompt": "Say hi now.", "instruction_spans": [[0, 6], [4, 9]]}),
        "instruction_spans",
    ),
    "instruction and spans": (
        st.just({"prompt": "Say hi.", "instruction": "hi", "instruction_spans": [[4, 6]]}),
        "instruction",
    ),
    "missing id": (st.just({"id": None, "prompt": "Say hi."}), "id"),
    "prompt bytes not UTF-8": (st.binary(min_size=1, max_size=8).map(lambda b: {"prompt": b"Say \xff" + b}), "prompt"),
}


# one of each defect, for the example every run checks (hypothesis draws the rest)
REPRESENTATIVE = {
    "null prompt": {"prompt": None},
    "blank prompt": {"prompt": " \n"},
    "huge prompt": {"prompt": "word " * 9000},
    "control characters": {"prompt": "Say \x00\x07\x1b[0m\u2028\x85 now."},
    "prompt typed int": {"prompt": 7},
    "instruction typed list": {"prompt": "Say hi.", "instruction": ["Say", "hi"]},
    "instruction absent": {"prompt": "Say hi.", "instruction": "Say bye."},
    "empty instruction": {"prompt": "Say hi.", "instruction": ""},
    "span out of range": {"prompt": "Say hi.", "instruction_spans": [[0, 99]]},
    "span inverted": {"prompt": "Say hi now.", "instruction_spans": [[6, 2]]},
    "spans overlapping": {"prompt": "Say hi now.", "instruction_spans": [[0, 6], [4, 9]]},
    "instruction and spans": {"prompt": "Say hi.", "instruction": "hi", "instruction_spans": [[4, 6]]},
    "missing id": {"id": None, "prompt": "Say hi."},
    "prompt bytes not UTF-8": {"prompt": b"Say \xff\xfe."},
}


def every_defect() -> tuple[list[list[dict]], dict[str, set[str]], dict[str, int]]:
    """Each defect once in a Parquet shard and once in a JSON-lines one, beside every good row."""
    shards, expected, pool = [], {}, {}
    for shard in ("p", "j"):
        rows = []
        for n, (defect, row) in enumerate(sorted(REPRESENTATIVE.items())):
            row = {"id": f"{shard}{n}", **row, "extra": n if shard == "p" else str(n)}
            rows.append(row)
            if row["id"] is not None:
                expected[row["id"]] = {DEFECTS[defect][1]} - {None}
        shards.append(rows)
    shards.append([{"id": f"g{i}", **good_row(i), "extra": f"g{i}"} for i in range(len(POOL))])
    shards.append([{"id": f"n{i}", **good_row(i), "extra": None} for i in range(len(POOL))])  # all null here
    expected.update({f"{k}{i}": set() for k in "gn" for i in range(len(POOL))})
    pool.update({f"{k}{i}": i for k in "gn" for i in range(len(POOL))})
    return shards, expected, pool


def good_row(index: int) -> dict:
    return dict(POOL[index])


@st.composite
def inputs(draw) -> tuple[list[list[dict]], dict[str, set[str]], dict[str, int]]:
    """Shards of rows (ids unique unless a duplicate is planted), with the fields each id's error may
    name (empty: the row is ok) and, for good rows, their index in the pool."""
    count = draw(st.integers(2, 14))
    rows, expected, pool = [], {}, {}
    for n in range(count):
        row_id = f"r{n}-{draw(TEXT.filter(lambda t: t.isprintable()))}"
        if draw(st.booleans()):
            pool[row_id] = draw(st.integers(0, len(POOL) - 1))
            row, field = good_row(pool[row_id]), None
        else:
            strategy, field = DEFECTS[draw(st.sampled_from(sorted(DEFECTS)))]
            row = draw(strategy)
        row = {"id": row_id, **row}
        if row["id"] is not None:
            expected[row["id"]] = {field} - {None}
        rows.append(row)
    if draw(st.booleans()) and rows[0]["id"] is not None:  # a planted duplicate: both copies are errors
        rows.append(dict(rows[0]))
        expected[rows[0]["id"]] |= {"id"} if expected[rows[0]["id"]] else {"id"}
        pool.pop(rows[0]["id"], None)
    shards = draw(st.integers(1, 3))
    split = [rows[i::shards] for i in range(shards)]
    for part in split:  # an extra column, passed through, its type drifting between shards
        kind = draw(st.sampled_from([st.integers(), TEXT, st.none()]))
        for row in part:
            row["extra"] = draw(kind)
    return [part for part in split if part], expected, pool


def has_bytes(row: dict) -> bool:
    return any(isinstance(value, bytes) for value in row.values())


def json_line(row: dict) -> bytes:
    """A JSON line; bytes values go in raw (invalid UTF-8 in the file itself)."""
    raw = {k: v for k, v in row.items() if isinstance(v, bytes)}
    line = json.dumps({k: f"@{k}@" if k in raw else v for k, v in row.items()}).encode()
    for name, value in raw.items():
        raw_value = value.translate(None, b'"\\\n')  # the line stays one line, its string one string
        line = line.replace(f'"@{name}@"'.encode(), b'"' + raw_value + b'"')
    return line


def write_shard(folder: Path, index: int, rows: list[dict], form: str) -> None:
    """A JSON-lines shard, or Parquet files, one per set of value types (Arrow types a column once per
    file; a prompt typed int in one file and text in the next is what a real dataset's shards do)."""
    if form == "jsonl":
        (folder / f"part-{index}.jsonl").write_bytes(b"\n".join(json_line(row) for row in rows) + b"\n")
        return
    typed: dict[tuple, list[dict]] = {}
    for row in rows:
        typed.setdefault(tuple(sorted((k, type(v).__name__) for k, v in row.items() if v is not None)), []).append(row)
    for number, group in enumerate(typed.values()):
        names = dict.fromkeys(k for row in group for k in row)
        pq.write_table(pa.table({name: column([row.get(name) for row in group]) for name in names}),
                       folder / f"part-{index}-{number}.parquet")  # fmt: skip


def column(values: list) -> pa.Array:
    try:
        return pa.array(values)
    except OverflowError:  # an integer beyond 64 bits, which JSON holds and Parquet cannot: kept as text
        return pa.array([None if v is None else str(v) for v in values])


@pytest.fixture(scope="module")
def clean_tokens(smollm2) -> list[list[int]]:
    """Each pool row's tokens from the engine alone, one row per call."""
    steerer = Directer(smollm2, STEERING)
    return [steerer.generate(row).token_ids for row in POOL]


# each example is a whole run (seconds): no shrinking, the failing input is printed as drawn; the same
# examples every run, so CI is stable (explore more with --hypothesis-seed=N and a larger max_examples)
@settings(
    max_examples=6,
    derandomize=True,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=inputs(), forms=st.lists(st.sampled_from(["parquet", "jsonl"]), min_size=3, max_size=3))
@example(case=every_defect(), forms=["parquet", "jsonl", "parquet", "jsonl"])
def test_every_row_is_written_once_and_bad_rows_name_their_field(clean_tokens, case, forms):
    shards, expected, pool = case
    folder = Path(tempfile.mkdtemp(prefix="fuzz-"))
    for index, rows in enumerate(shards):
        write_shard(folder, index, rows, forms[index])
    config = GenerateConfig(
        inputs=(str(folder / "part-*"),),
        output=str(folder / "out"),
        batch_size=4,
        steering=STEERING,
        actor_start_timeout=120,
    )
    generate(config, progress=False)
    written = RunOutput(folder / "out").rows()

    # a JSON line that is not UTF-8 cannot be read, its id included: its row is written without one
    unreadable = {row["id"] for rows, form in zip(shards, forms) if form == "jsonl" for row in rows if has_bytes(row)}
    ids = [None if row["id"] in unreadable else row["id"] for rows in shards for row in rows]
    assert len(written) == len(ids)
    assert Counter(r["id"] for r in written) == Counter(ids)
    for row in written:
        if row["id"] is None:
            assert row["status"] == "error" and row["error"].split(":")[0] in ("id", "line"), row
            continue
        fields = expected[row["id"]]
        if not fields:
            assert row["status"] == "ok", row["error"]
        else:
            assert row["status"] == "error" and row["error"].split(":")[0] in fields, (fields, row["error"])
        if row["id"] in pool:
            assert row["token_ids"] == clean_tokens[pool[row["id"]]]
