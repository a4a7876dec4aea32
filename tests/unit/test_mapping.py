"""Mapping: the worked rank table of its module's docstring, coordinates and groups against a
reference written from the definition (group the ranks by equal coordinates), layer splits, bad
layouts."""
from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys

import pytest

from meshlm.parallel import mapping as mapping_module
from meshlm.parallel.mapping import Mapping

pytestmark = pytest.mark.timeout(60)

# Docstring column name -> Mapping property.
_COLUMNS = {"rank": "rank", "node": "node_rank", "local": "local_rank", "dp": "dp_rank", "pp": "pp_rank",
            "tp": "tp_rank", "moe_tp": "moe_tp_rank", "moe_ep": "moe_ep_rank", "tp_group": "tp_group",
            "pp_group": "pp_group"}
_CELL = r"(\[[\d, ]*\]|\d+)"


def _doc_table() -> tuple[dict[str, int], list[dict[str, object]]]:
    """The Mapping arguments of the docstring's table and its rows, parsed from the docstring."""
    doc = mapping_module.__doc__
    head = re.search(r"Mapping\(([^)]*rank=r[^)]*)\)", doc)
    assert head, "the docstring no longer names the Mapping(...) of its table"
    kwargs = {k.strip(): v.strip() for k, v in (item.split("=") for item in head.group(1).split(","))}
    args = {k: int(v) for k, v in kwargs.items() if k != "rank"}
    lines = doc.splitlines()
    header_at = next(i for i, line in enumerate(lines) if re.match(r"\s*rank\s+node\s+local\s*\|", line))
    names = lines[header_at].replace("|", " ").split()
    assert set(names) == set(_COLUMNS), names
    rows = []
    for line in lines[header_at + 1:]:
        cells = re.findall(_CELL, line.replace("|", " "))
        if not line.strip() or line.strip() == "...":
            continue
        if len(cells) != len(names):
            break  # the table has ended
        rows.append({name: ast.literal_eval(cell) for name, cell in zip(names, cells)})
    return args, rows


def test_docstring_table_is_parsed_whole():
    """The parser found the table: a real layout (dp, pp, tp and moe_ep all > 1), its first and last rank."""
    args, rows = _doc_table()
    assert set(args) == {"world_size", "tp", "pp", "moe_ep", "gpus_per_node"}
    assert args["world_size"] > args["tp"] * args["pp"] and min(args["tp"], args["pp"], args["moe_ep"]) > 1
    ranks = [row["rank"] for row in rows]
    assert len(ranks) >= 8 and ranks == sorted(set(ranks))
    assert ranks[0] == 0 and ranks[-1] == args["world_size"] - 1


def test_docstring_table_rows():
    args, rows = _doc_table()
    for row in rows:
        m = Mapping(rank=row["rank"], **args)
        got = {name: getattr(m, prop) for name, prop in _COLUMNS.items()}
        assert got == row, f"rank {row['rank']}: Mapping says {got}, the docstring {row}"


def test_docstring_moe_groups_sentence():
    args, _ = _doc_table()
    found = re.search(r"moe_ep group of rank (\d+) is (\[[\d, ]*\]).*?moe_tp group is (\[[\d, ]*\])",
                      mapping_module.__doc__, re.S)
    assert found, "the docstring no longer states the moe groups of a rank"
    m = Mapping(rank=int(found.group(1)), **args)
    assert m.moe_ep_group == ast.literal_eval(found.group(2))
    assert m.moe_tp_group == ast.literal_eval(found.group(3))


# --- coordinates and groups against the definition ----------------------------------------------
def _coords(rank: int, tp: int, pp: int) -> tuple[int, int, int]:
    """(dp, pp, tp) of a rank when tp varies fastest, then pp, then dp."""
    return rank // (tp * pp), (rank // tp) % pp, rank % tp


def _reference(world: int, tp: int, pp: int, moe_ep: int, rank: int) -> dict[str, object]:
    """Groups as the sets of ranks that share every coordinate but one."""
    dp, p, t = _coords(rank, tp, pp)
    everyone = [(r, *_coords(r, tp, pp)) for r in range(world)]
    tp_group = [r for r, d, pr, _ in everyone if (d, pr) == (dp, p)]
    pp_group = [r for r, d, _, tr in everyone if (d, tr) == (dp, t)]
    return {
        "dp_rank": dp, "pp_rank": p, "tp_rank": t, "dp": world // (tp * pp),
        "moe_tp": tp // moe_ep, "moe_ep_rank": t % moe_ep, "moe_tp_rank": t // moe_ep,
        "tp_group": tp_group, "pp_group": pp_group,
        "moe_ep_group": [r for r in tp_group if (r % tp) // moe_ep == t // moe_ep],
        "moe_tp_group": [r for r in tp_group if (r % tp) % moe_ep == t % moe_ep],
        "is_first_pp_rank": p == 0, "is_last_pp_rank": p == pp - 1,
        "prev_pp_rank": pp_group[p - 1] if p > 0 else None,
        "next_pp_rank": pp_group[p + 1] if p < pp - 1 else None,
        "sampler_rank": next(r for r, d, pr, tr in everyone if (d, pr, tr) == (dp, pp - 1, 0)),
    }


LAYOUTS = [  # (world_size, tp, pp, moe_ep, gpus_per_node)
    (1, 1, 1, 1, 8), (2, 2, 1, 1, 8), (2, 1, 2, 1, 8), (4, 2, 2, 1, 8), (3, 3, 1, 1, 8), (2, 1, 1, 1, 8),
    (8, 4, 2, 2, 4), (16, 4, 2, 2, 8), (12, 2, 3, 2, 4), (24, 6, 2, 3, 8), (16, 8, 1, 4, 8), (6, 1, 3, 1, 2),
]


@pytest.mark.parametrize("world, tp, pp, moe_ep, gpn", LAYOUTS)
def test_coordinates_and_groups_match_the_definition(world, tp, pp, moe_ep, gpn):
    for rank in range(world):
        m = Mapping(world, rank, tp, pp, moe_ep, gpn)
        expected = _reference(world, tp, pp, moe_ep, rank)
        got = {name: getattr(m, name) for name in expected}
        assert got == expected, f"rank {rank} of Mapping{(world, tp, pp, moe_ep, gpn)}"
        assert (m.node_rank, m.local_rank) == divmod(rank, gpn)
        assert m.model_size == tp * pp


@pytest.mark.parametrize("world, tp, pp, moe_ep, gpn", LAYOUTS)
def test_groups_partition_the_world(world, tp, pp, moe_ep, gpn):
    mappings = [Mapping(world, r, tp, pp, moe_ep, gpn) for r in range(world)]
    for name, size in (("tp_group", tp), ("pp_group", pp), ("moe_ep_group", moe_ep), ("moe_tp_group", tp // moe_ep)):
        groups = {tuple(getattr(m, name)) for m in mappings}
        assert sorted(r for g in groups for r in g) == list(range(world)), name  # disjoint and covering
        assert all(len(g) == size for g in groups), name
        for m in mappings:  # every member sees the same group, itself included
            group = getattr(m, name)
            assert m.rank in group
            assert all(getattr(mappings[r], name) == group for r in group)


def test_rank_order_keeps_tp_groups_inside_a_node():
    """tp fastest: with tp = gpus_per_node, a TP group is exactly one node."""
    for rank in range(16):
        m = Mapping(16, rank, tp=8, pp=2, gpus_per_node=8)
        assert {Mapping(16, r, tp=8, pp=2, gpus_per_node=8).node_rank for r in m.tp_group} == {m.node_rank}


def test_describe_names_only_the_axes_in_use():
    assert Mapping().describe() == "rank 0"
    assert Mapping(4, 3, tp=2, pp=2).describe() == "rank 3 tp 1/2 pp 1/2"
    assert Mapping(16, 5, tp=4, pp=2, moe_ep=2).describe() == "rank 5 tp 1/4 pp 1/2 ep 1/2"


def test_mapping_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Mapping().rank = 1  # type: ignore[misc]


def test_mapping_imports_neither_torch_nor_mpi():
    code = ("import sys, meshlm.parallel.mapping; "
            "print(sorted(m for m in ('torch', 'mpi4py') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- layer ranges ------------------------------------------------------------------------------
@pytest.mark.parametrize("num_layers, pp", [(n, p) for n in range(1, 13) for p in range(1, n + 1)])
def test_layer_ranges_split_evenly_and_cover_every_layer(num_layers, pp):
    ranges = [Mapping(pp, r, pp=pp).layer_range(num_layers) for r in range(pp)]
    assert [layer for r in ranges for layer in r] == list(range(num_layers))  # contiguous, in order
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert sizes == sorted(sizes, reverse=True)  # earlier stages take the remainder
    # tp ranks of one stage hold the same layers
    assert Mapping(2 * pp, 1, tp=2, pp=pp).layer_range(num_layers) == ranges[0]


@pytest.mark.parametrize("num_layers, pp, sizes", [(30, 4, [8, 8, 7, 7]), (3, 2, [2, 1]), (30, 2, [15, 15]),
                                                   (7, 3, [3, 2, 2])])
def test_layer_range_examples(num_layers, pp, sizes):
    assert [len(Mapping(pp, r, pp=pp).layer_range(num_layers)) for r in range(pp)] == sizes


def test_more_stages_than_layers_is_an_error():
    with pytest.raises(ValueError, match=r"pp=3.*\b2\b"):
        Mapping(3, 0, pp=3).layer_range(2)


# --- invalid layouts ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(world_size=6, rank=0, tp=4, pp=1),  # not a multiple of tp*pp
    dict(world_size=8, rank=0, tp=2, pp=3),
    dict(world_size=4, rank=4, tp=2, pp=2),  # rank out of range
    dict(world_size=4, rank=-1, tp=2, pp=2),
    dict(world_size=4, rank=0, tp=4, pp=1, moe_ep=3),  # moe_ep does not divide tp
    dict(world_size=0, rank=0),
    dict(world_size=2, rank=0, tp=0, pp=1),
    dict(world_size=2, rank=0, tp=1, pp=0),
    dict(world_size=2, rank=0, tp=2, moe_ep=0),
    dict(world_size=2, rank=0, tp=2, gpus_per_node=0),
])
def test_invalid_layout_message_prints_every_degree(kwargs):
    full = {**{f.name: f.default for f in dataclasses.fields(Mapping)}, **kwargs}
    with pytest.raises(ValueError) as info:
        Mapping(**kwargs)
    for name, value in full.items():
        assert f"{name}={value}" in str(info.value), f"{name}={value} missing from: {info.value}"
