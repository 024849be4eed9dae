"""Pickles of the kinds that ran code, crashed or hung the readers that used Python's
unpickler with an allow-list of names: each uses only names such a list admits (numpy's
dtype, ndarray, _reconstruct and scalar, collections.OrderedDict), or plain containers. They
reproduce the mechanism (attacker-chosen state handed to numpy's own constructors), not a
working exploit; the last entry of each checkpoint would run a command if it were reached."""
import collections
import os
import pickle

import numpy as np

RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]   # numpy's _reconstruct, as numpy pickles it
SCALAR = np.float64(1).__reduce__()[0]


class Reduce:
    """Pickles as the call `function(*args)` followed by BUILD with `state` (if not None)."""

    def __init__(self, function, args, state=None):
        self.function, self.args, self.state = function, args, state

    def __reduce__(self):
        return (self.function, self.args) if self.state is None else \
            (self.function, self.args, self.state)


class RunsACommand:
    """Unpickled, it would run a shell command (as a hostile .pdparams can)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def dtype(code="f4", state=(3, "<", None, None, None, -1, -1, 0)):
    return Reduce(np.dtype, (code, False, True), state)


def array(state):
    return Reduce(RECONSTRUCT, (np.ndarray, (0,), b"b"), state)


def _nested_lists(depth):
    # EMPTY_LIST `depth` times, then APPEND each into the one below it
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


def _nested_tuples(depth):
    # EMPTY_TUPLE, then TUPLE1 `depth` times: hashing it would recurse in C
    return b"\x80\x02)" + b"\x85" * depth + b"."


def _shared(levels, width=16):
    """A list holding one list `width` times, `levels` deep: width**levels values if copied."""
    x = [0]
    for _ in range(levels):
        x = [x] * width
    return x


# name -> the value put into a checkpoint's state dict (or raw bytes of a whole pickle)
VALUES = {
    "forged dtype fields": dtype("f8", (3, "|", None, ("x",), {"x": (np.dtype("f8"), -64)}, 8, 1, 16)),
    "forged dtype flags": dtype("f4", (3, "<", None, None, None, -1, -1, 0x3F)),
    "object dtype": dtype("O", (3, "|", None, None, None, -1, -1, 63)),
    "array over object memory": array((1, (1,), dtype("O", (3, "|", None, None, None, -1, -1, 63)),
                                       False, [1])),
    "array shape beyond its bytes": array((1, (2**39, 2**20), dtype(), False, b"\0" * 8)),
    "negative shape": array((1, (-1,), dtype(), False, b"")),
    "array without state": Reduce(RECONSTRUCT, (np.ndarray, (0,), b"b")),
    "state given to a list": Reduce(list, ([1],), {"append": 1}),
    "scalar of the wrong length": Reduce(SCALAR, (dtype("f8"), b"\0" * 3)),
    "attributes on an OrderedDict": Reduce(collections.OrderedDict, (),
                                           {"__array_interface__": {"data": (8, False),
                                                                    "shape": (4,), "typestr": "<f4"}}),
    "shared-reference expansion": _shared(10),
}
def _tuple_graph_key(levels):
    # t0 = None; t(i+1) = (ti, ti): hashing it as a dict key walks 2**levels paths
    raw = b"\x80\x02Nq\x00"
    for i in range(levels):
        raw += b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1])
    return raw + b"0}h" + bytes([levels]) + b"Ns."


RAW = {
    "deep lists": _nested_lists(1000),
    "deep tuples": _nested_tuples(1000),
    "tuple graph as a dict key": _tuple_graph_key(30),
    "colliding whole-number keys": pickle.dumps({k * (2**61 - 1): 0 for k in range(1, 3000)}),
    "a flood of empty sets": b"\x80\x04](" + b"\x8f" * 200_000 + b"e.",
}
# Expected words of each refusal
REASONS = {
    "forged dtype fields": "state other than a plain type's",
    "forged dtype flags": "state other than a plain type's",
    "object dtype": "numpy dtype 'O'",
    "array over object memory": "numpy dtype 'O'",
    "array shape beyond its bytes": "over 8 bytes",
    "negative shape": "shape is not a tuple of non-negative whole numbers",
    "array without state": "without its state",
    "state given to a list": "state given to a list",
    "scalar of the wrong length": "over 3 bytes instead of 8",
    "attributes on an OrderedDict": "state given to a dict",
    "shared-reference expansion": "expand",
    "deep lists": "nested deeper than",
    "deep tuples": "nested deeper than",
    "tuple graph as a dict key": "a tuple used as a dict key",
    "colliding whole-number keys": "a int used as a dict key",
    "a flood of empty sets": "a small file that expands",
}
KINDS = sorted(VALUES) + sorted(RAW)
# Refused once the whole file is read (a file is checked as a whole there), so they carry no
# command after them: the reader would refuse that first.
CHECKED_AT_THE_END = {"array without state", "shared-reference expansion"}


def _then(kind, marker):
    return {} if kind in CHECKED_AT_THE_END else {"then": RunsACommand(f"touch {marker}")}


def checkpoint_bytes(kind, marker):
    """A checkpoint holding `kind` where a tensor belongs, then a command that touches `marker`."""
    if kind in RAW:
        return RAW[kind]
    hostile = VALUES[kind]
    return pickle.dumps({"epoch": 3, "state_dict": {"fc.weight": hostile}, **_then(kind, marker)},
                        protocol=4)


def cifar_batch_bytes(kind, marker):
    """A CIFAR batch (protocol 2, as the official files) holding `kind` as its images."""
    if kind in RAW:
        return RAW[kind]
    return pickle.dumps({b"data": VALUES[kind], b"labels": [0],
                         **{k.encode(): v for k, v in _then(kind, marker).items()}}, protocol=2)
