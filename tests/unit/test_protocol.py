"""The wire format between rank 0 and the ranks, and between a plain process and rank 0: typed
messages that survive a round trip through bytes, with no pickle anywhere."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from meshlm.api.messages import (AbortCall, EngineState, Reply, StepCall, SubmitCall, decode_call, decode_reply,
                                 encode_call, encode_reply)
from meshlm.engine.outputs import CompletionOutput, RequestOutput
from meshlm.protocol import (BlockTableMirror, Envelope, MessageKind, NewRequest, StepPlan, StepResult,
                             decode_envelope, decode_result, encode_envelope, encode_result, returns_tokens)
from meshlm.sampling_params import SamplingParams


def make_plan() -> StepPlan:
    return StepPlan(
        input_ids=np.array([5, 6, 7, 9], np.int64), positions=np.array([0, 1, 2, 40], np.int64),
        slot_mapping=np.array([16, 17, 18, 71], np.int64), query_start_loc=np.array([0, 3, 4], np.int32),
        seq_lens=np.array([3, 41], np.int32), block_tables=np.array([[1, 0, 0], [2, 3, 4]], np.int32),
        sample_rows=np.array([0, 1], np.int64), sample_request_ids=["a", "b#1"],
        new_requests=[NewRequest("a", SamplingParams(temperature=0.5, stop=["x", "yz"], seed=3,
                                                     stop_token_ids=[2], logit_bias={7: 2.5, 11: -100},
                                                     allowed_token_ids=[5, 7, 11], bad_words=["no"],
                                                     bad_words_token_ids=[[4, 5], [6]]), [5, 6, 7])],
        finished_request_ids=["old"])


def test_a_step_envelope_survives_the_wire():
    plan = make_plan()
    buffer = encode_envelope(Envelope(MessageKind.STEP, plan))
    assert buffer.dtype == np.uint8 and buffer[8:9].tobytes() == b"{"  # length, then a JSON header
    got = decode_envelope(buffer)
    assert got.kind == MessageKind.STEP
    for name in ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens", "block_tables",
                 "sample_rows"):
        expected, actual = getattr(plan, name), getattr(got.plan, name)
        assert actual.dtype == expected.dtype and np.array_equal(actual, expected), name
    assert got.plan.sample_request_ids == ["a", "b#1"] and got.plan.finished_request_ids == ["old"]
    (new,) = got.plan.new_requests
    assert (new.request_id, new.prompt_token_ids) == ("a", [5, 6, 7])
    assert new.params == plan.new_requests[0].params and new.params.stop == ("x", "yz")


def test_shutdown_and_empty_plans():
    assert decode_envelope(encode_envelope(Envelope(MessageKind.SHUTDOWN))).kind == MessageKind.SHUTDOWN
    empty = decode_envelope(encode_envelope(Envelope(MessageKind.STEP, StepPlan.empty(["r"])))).plan
    assert empty.num_tokens == 0 and empty.finished_request_ids == ["r"] and empty.block_tables.shape == (0, 1)
    assert not returns_tokens(empty) and returns_tokens(make_plan())


def test_a_step_result_survives_the_wire():
    result = StepResult(np.array([3, 9], np.int64), np.array([-0.5, -1.25], np.float32),
                        np.array([[3, 4], [9, 1]], np.int64), np.array([[-0.5, -2.0], [-1.25, -3.0]], np.float32))
    got = decode_result(encode_result(result))
    for name in ("token_ids", "logprobs", "top_token_ids", "top_logprobs"):
        assert np.array_equal(getattr(got, name), getattr(result, name)), name
    bare = decode_result(encode_result(StepResult(np.array([1], np.int64), None, None, None)))
    assert bare.logprobs is None and bare.top_token_ids is None and bare.token_ids.tolist() == [1]


def test_a_truncated_buffer_is_refused():
    buffer = encode_envelope(Envelope(MessageKind.STEP, make_plan()))
    with pytest.raises(ValueError, match="bytes"):
        decode_envelope(np.concatenate([buffer, np.zeros(3, np.uint8)]))


def test_sampling_params_refuse_unknown_fields_from_the_wire():
    with pytest.raises(ValueError, match="unknown sampling parameters"):
        SamplingParams.from_dict({**SamplingParams().to_dict(), "evil": 1})


def test_remote_calls_and_replies_survive_the_wire():
    call = SubmitCall([1, 2, 3], SamplingParams(max_tokens=4, logprobs=2), "r1", "text")
    got = decode_call(encode_call(call))
    assert got == call
    assert decode_call(encode_call(AbortCall("r1"))) == AbortCall("r1")
    output = RequestOutput("r1", "text", [1, 2, 3], [CompletionOutput(0, "hi", [7, 8], "stop", "!",
                                                                      [{7: -0.5, 9: -1.0}, {8: -0.25}])], True, 2)
    reply = decode_reply(encode_reply(Reply([output], state=EngineState(True, False, 1, 2, 0.5))), StepCall())
    assert reply.value == [output] and reply.state == EngineState(True, False, 1, 2, 0.5)
    assert list(reply.value[0].outputs[0].logprobs[0]) == [7, 9]  # int keys, the sampled token first
    with pytest.raises(ValueError, match="unknown call"):
        decode_call(b'{"call": "os.system"}')


def test_set_up_messages_travel_as_json_not_pickle():
    from mpi4py import MPI

    from meshlm.launcher.mpi_json import allgather_json, bcast_json
    value = ["host-a", 1234, {"nested": [1.5, None]}]
    assert bcast_json(MPI.COMM_SELF, value) == value
    assert allgather_json(MPI.COMM_SELF, value) == [value]
    with pytest.raises(TypeError):  # a value JSON cannot carry is refused, never pickled
        bcast_json(MPI.COMM_SELF, object())


def test_prompt_logprob_rows_survive_the_wire():
    plan = make_plan()
    plan.sample_rows = np.zeros(0, np.int64)
    plan.sample_request_ids = []
    plan.prompt_logprob_index = np.array([0, 1], np.int64)
    plan.prompt_logprob_target_ids = np.array([6, 7], np.int64)
    plan.prompt_logprob_num_top = np.array([2, 2], np.int64)
    assert returns_tokens(plan)  # scores come back although nothing is sampled
    got = decode_envelope(encode_envelope(Envelope(MessageKind.STEP, plan))).plan
    for name in ("prompt_logprob_index", "prompt_logprob_target_ids", "prompt_logprob_num_top"):
        assert np.array_equal(getattr(got, name), getattr(plan, name)), name
    result = StepResult(np.zeros(0, np.int64), None, None, None, np.array([-1.5, -0.25], np.float32),
                        np.array([[6, 2], [7, 3]], np.int64), np.array([[-1.5, -2.0], [-0.25, -4.0]], np.float32))
    back = decode_result(encode_result(result))
    for name in ("prompt_logprobs", "prompt_top_token_ids", "prompt_top_logprobs"):
        assert np.array_equal(getattr(back, name), getattr(result, name)), name


def test_prompt_logprobs_survive_the_link_from_a_plain_process():
    output = RequestOutput("r", None, [4, 5], [CompletionOutput(0, "", [9])], False, 0,
                           [None, {5: -0.5, 8: -0.25}])
    reply = decode_reply(encode_reply(Reply(value=[output], state=EngineState())), StepCall())
    assert reply.value[0].prompt_logprobs == [None, {5: -0.5, 8: -0.25}]


# --- block tables as changes ----------------------------------------------------------------------

def test_block_tables_travel_as_changes_and_rebuild_exactly():
    """Steps of decodes, prompt chunks, copy-on-write, preemption, finished sequences whose slots
    others take over, tables growing and shrinking: the receiving end rebuilds every table, and a
    step in which no sequence took a new block sends no block id."""
    rng = np.random.default_rng(0)
    sender, receiver = BlockTableMirror(), BlockTableMirror()
    tables = {slot: list(rng.integers(0, 1000, rng.integers(1, 6))) for slot in range(12)}
    for step in range(40):
        slots = rng.choice(12, size=rng.integers(1, 12), replace=False).astype(np.int32)
        for slot in slots:
            change = rng.integers(0, 6)
            if change == 0:
                tables[int(slot)].append(int(rng.integers(0, 1000)))  # a new block
            elif change == 1:
                tables[int(slot)][-1] = int(rng.integers(0, 1000))  # copy-on-write of the last block
            elif change == 2:
                tables[int(slot)] = list(rng.integers(0, 1000, rng.integers(1, 8)))  # another sequence
        width = max(len(tables[int(s)]) for s in slots)
        full = np.zeros((len(slots), width), np.int32)
        for row, slot in enumerate(slots):
            full[row, :len(tables[int(slot)])] = tables[int(slot)]
        plan = replace(make_plan_of(full), seq_slots=slots)
        buffer = encode_envelope(Envelope(MessageKind.STEP, plan), sender)
        got = decode_envelope(buffer, receiver).plan
        assert got.block_tables.dtype == np.int32 and np.array_equal(got.block_tables, full), step
    # a step again with no change: nothing but the spans (all empty) travels
    changes = sender.encode(slots, full)
    assert len(changes["table_changes"]) == 0 and (changes["table_first"] == width).all()


def test_changes_are_much_smaller_than_the_table_at_decode():
    """1024 sequences of 2048 tokens, a block of 16: the whole table is 512 KB a step; a decode
    step in which 64 of them crossed into a new block sends 64 block ids and two int32 a row,
    beside the plan's other per-sequence arrays (about 60 KB)."""
    rng = np.random.default_rng(1)
    tables = rng.integers(0, 60_000, (1024, 129)).astype(np.int32)
    tables[:, 128] = 0
    slots = np.arange(1024, dtype=np.int32)
    plan = replace(make_plan_of(tables), seq_slots=slots)
    sender, receiver = BlockTableMirror(), BlockTableMirror()
    decode_envelope(encode_envelope(Envelope(MessageKind.STEP, plan), sender), receiver)
    grown = tables.copy()
    grown[:64, 128] = rng.integers(1, 60_000, 64)
    step = encode_envelope(Envelope(MessageKind.STEP, replace(plan, block_tables=grown)), sender)
    whole = encode_envelope(Envelope(MessageKind.STEP, replace(plan, block_tables=grown)))
    assert len(whole) - len(step) > 500_000 and len(step) < 70_000, (len(whole), len(step))
    assert np.array_equal(decode_envelope(step, receiver).plan.block_tables, grown)
    with pytest.raises(ValueError, match="BlockTableMirror"):
        decode_envelope(step)


def make_plan_of(tables: np.ndarray) -> StepPlan:
    """A decode plan over ``tables`` [num_seqs, width] (one token a sequence)."""
    n = tables.shape[0]
    return StepPlan(np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64),
                    np.arange(n + 1, dtype=np.int32), np.ones(n, np.int32), tables,
                    np.arange(n, dtype=np.int64), [f"r{i}" for i in range(n)])


def test_mirror_grows_each_dimension_only_as_needed():
    """Tables that widen by one block a step for 300 steps (a long decode): the mirror's rows stay
    as many as the slots, its width within twice the widest table."""
    sender, receiver = BlockTableMirror(), BlockTableMirror()
    slots = np.arange(3, dtype=np.int32)
    for width in range(1, 301):
        tables = np.arange(3 * width, dtype=np.int32).reshape(3, width) + 1
        plan = replace(make_plan_of(tables), seq_slots=slots)
        got = decode_envelope(encode_envelope(Envelope(MessageKind.STEP, plan), sender), receiver).plan
        assert np.array_equal(got.block_tables, tables)
    for mirror in (sender, receiver):
        assert mirror.rows.shape[0] <= 4 and 300 <= mirror.rows.shape[1] <= 600, mirror.rows.shape
