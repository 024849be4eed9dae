"""Reading a pickle as data only: the one reader of every pickle this project opens
(checkpoints, `.swa` files, CIFAR batches).

    >>> value = read_data(raw_bytes)      # dicts, lists, tuples, numbers, strings, numpy arrays

Python's unpickler runs the file: it calls whatever the file names, and hands the file's
state to the constructors it builds (numpy's own `dtype.__setstate__` and
`ndarray.__setstate__` among them, which trust that state with raw memory). An allow-list of
names cannot make that safe. So this module does not use it: it interprets the opcodes itself
(read with `pickletools.genops`), builds only plain containers and scalars, and maps the few
names a data file uses to stand-ins of its own that check every argument:

    numpy.dtype               a plain numeric type (bool, (u)int8..64, float16/32/64,
                              complex64/128; Paddle writes bfloat16 as uint16) with exactly
                              the state numpy pickles a plain dtype with
    numpy _reconstruct +      an array: (version 1, shape of non-negative ints, such a
      ndarray state           dtype, the order flag, bytes of exactly prod(shape) x itemsize),
                              made with np.frombuffer(...).reshape(...).copy()
    numpy scalar              one value of such a dtype, from bytes of exactly its size
    numpy _frombuffer         protocol 5's array layout, under the same checks
    _codecs.encode            (str, "latin1") only: how protocol 2 writes bytes
    builtins tuple, list,     from a list or tuple of items; dict from pairs;
      dict, set, frozenset,   complex from two numbers; bytearray and bytes from bytes
      complex, bytearray, bytes
    collections.OrderedDict   a plain dict
    paddle GeneratorState     None (a generator state older versions saved; never used)

Anything else, and any BUILD but an array's or a dtype's, is refused before it is built.
Dict keys and set items are strings, bytes, bools, None or whole numbers below 2**61 - 1 (their
hashes cost constant time and cannot be made to collide).

Reading is bounded by the file: the memory of the Python objects built may not exceed
MEMORY_PER_BYTE bytes per byte of the file (checkpoints and CIFAR batches take 1.2-1.5), the
bytes of arrays twice the file's, and the values counted at each use of a shared one its
size (so a small file cannot expand); nesting is limited to MAX_DEPTH, and each object is
visited once.
"""
import io
import math
import pickletools
import sys
import warnings

import numpy as np

MAX_DEPTH = 32          # deeper nesting is refused (a checkpoint nests about 6 levels)
MAX_DIMENSIONS = 9      # Paddle's tensors have at most 9; no tensor we read has more than 5
REFERENCE_ALLOWANCE = 4096   # values (and bytes) allowed beyond the file's size
MEMORY_PER_BYTE = 16    # Python objects' memory per byte of the file (checkpoints: 1.2-1.5)
REFERENCE, ENTRY = 8, 48     # the memory of a reference, and of a dict, set or memo entry
# The plain numeric types a data file may hold, by numpy's type code.
DTYPES = ("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16")


class Refused(ValueError):
    """The pickle holds something other than data, or more than its size allows. The message
    says what, in words fit for a one-line error."""


def read_data(raw, encoding="latin1"):
    """The value pickled in `raw`, built from data only (see the module's docstring).

    Args:
        raw: the pickle's bytes.
        encoding: how Python 2 strings are read: "latin1" gives str, "bytes" gives bytes
            (as pickle.load's argument of the same name).

    Returns:
        dicts, lists, tuples, sets, None, bools, numbers, strings, bytes and numpy arrays
        (native byte order, their own memory) and numpy scalars.

    Raises:
        Refused: anything else, or a file that would expand beyond its size or nest deeper
            than MAX_DEPTH.
        ValueError: bytes that are not a complete pickle.
    """
    machine = _Machine(len(raw), encoding)
    return _Finisher(machine.budget).finish(machine.run(raw))


# --------------------------------------------------------------------------- stand-ins

class _Name:
    """A name the pickle refers to (GLOBAL), with the function that stands in for it."""
    __slots__ = ("name", "call")

    def __init__(self, name, call):
        self.name, self.call = name, call


class _Dtype:
    """numpy.dtype(code, False, True), waiting for its BUILD."""
    __slots__ = ("code", "value")

    def __init__(self, code):
        self.code, self.value = code, None

    def build(self, state):
        # numpy pickles a plain dtype's state as (3, byte order, None, None, None, -1, -1, 0)
        # (version 4 adds metadata None); anything else (names, fields, subarrays, flags)
        # describes memory layouts a data file never needs.
        plain = (None, None, None, -1, -1, 0)
        if not (isinstance(state, tuple) and len(state) in (8, 9)
                and all(v is None or type(v) in (int, str, bytes) for v in state)
                and state[0] == len(state) - 5 and state[2:8] == plain and state[8:] in ((), (None,))):
            raise Refused(f"a numpy dtype {self.code} with a state other than a plain type's")
        order = _text(state[1])
        single = np.dtype(self.code).itemsize == 1
        if order not in (("|",) if single else ("<", ">", "=")):
            raise Refused(f"a numpy dtype {self.code} with byte order {order!r}")
        self.value = np.dtype((order if order != "|" else "") + self.code)


class _Array:
    """numpy's _reconstruct(ndarray, (0,), b"b"), waiting for its BUILD."""
    __slots__ = ("value", "spend")

    def __init__(self, spend):
        self.value, self.spend = None, spend

    def build(self, state):
        if not (isinstance(state, tuple) and len(state) == 5 and type(state[0]) is int
                and state[0] == 1):
            raise Refused("a numpy array whose state is not (1, shape, dtype, order, bytes)")
        _, shape, dtype, fortran, raw = state
        if not isinstance(fortran, bool):
            raise Refused("a numpy array whose order flag is not True or False")
        self.value = _array(raw, dtype, shape, "F" if fortran else "C", self.spend)


def _text(value):
    """A short ASCII string given as str or (Python 2's, read with encoding="bytes") bytes."""
    if isinstance(value, bytes):
        value = value.decode("latin1")
    if not isinstance(value, str) or len(value) > 8:
        raise Refused("a numpy type code that is not a short string")
    return value


def _dtype_code(code):
    code = _text(code)
    if code not in DTYPES:
        raise Refused(f"a numpy dtype {code!r}, not one of the plain numeric types")
    return code


def _built_dtype(dtype):
    if not (isinstance(dtype, _Dtype) and dtype.value is not None):
        raise Refused("a numpy array or scalar without a complete plain dtype")
    return dtype.value


def _array(raw, dtype, shape, order, spend):
    """A numpy array of its own memory from `raw`, after checking every argument."""
    dtype = _built_dtype(dtype)
    if isinstance(raw, str):  # Python 2's str read with encoding="latin1"
        raw = raw.encode("latin1")
    if not isinstance(raw, (bytes, bytearray)):
        raise Refused("a numpy array whose data are not bytes (an object array?)")
    if not (isinstance(shape, tuple) and len(shape) <= MAX_DIMENSIONS and all(
            type(n) is int and 0 <= n < 2**40 for n in shape)):
        raise Refused("a numpy array whose shape is not a tuple of non-negative whole numbers")
    if math.prod(shape) * dtype.itemsize != len(raw):
        raise Refused(f"a numpy array of shape {list(shape)} ({dtype}) over {len(raw)} bytes "
                      f"instead of {math.prod(shape) * dtype.itemsize}")
    spend(0, len(raw))
    array = np.frombuffer(raw, dtype).reshape(shape, order=order)
    return np.array(array, dtype=dtype.newbyteorder("="), order="C")


def _reconstruct(subtype, shape, typecode, spend):
    ndarray = isinstance(subtype, _Name) and subtype.name == ("numpy", "ndarray")
    if not (ndarray and type(shape) is tuple and len(shape) == 1
            and type(shape[0]) is int and shape[0] == 0 and _text(typecode) == "b"):
        raise Refused("numpy's _reconstruct called other than for a plain ndarray")
    return _Array(spend)


class _Built:
    """A numpy array or scalar, held so that the machine never compares or hashes it."""
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def _scalar(dtype, raw, spend):
    return _Built(_array(raw, dtype, (1,), "C", spend)[0])


def _frombuffer(raw, dtype, shape, order, spend):
    if order not in ("C", "F"):
        raise Refused("numpy's _frombuffer with an order other than C or F")
    return _Built(_array(raw, dtype, shape, order, spend))


def _encode(text, codec, spend):
    if not (isinstance(text, str) and codec in ("latin1", "latin-1")):
        raise Refused("_codecs.encode called other than as (str, 'latin1')")
    spend(0, len(text))
    return text.encode("latin1")


def _hashable(key):
    """`key` if it is what a data file uses as a dict key or a set item: a string, bytes, a
    bool, None or a whole number below 2**61 - 1. Their hashes take constant time and do not
    collide by design (strings' are randomised; larger numbers repeat every 2**61 - 1)."""
    plain = key is None or type(key) in (str, bytes, bool) or (
        type(key) is int and abs(key) < 2**61 - 1)
    if not plain:
        raise Refused(f"a {type(key).__name__} used as a dict key or set item (a data file's "
                      "are names and small whole numbers)")
    return key


def _shown(module, name):
    """A global's name for a message: as it is if it is a dotted name, else quoted, cut short."""
    text = f"{module}.{name}"
    if all(part.isidentifier() for part in text.split(".")) and len(text) <= 80:
        return text
    return repr(text[:80])


def _items(value, spend):
    if not isinstance(value, (list, tuple)):
        raise Refused("a container built from something other than a list or a tuple")
    spend(REFERENCE * len(value))
    return value


def _pairs(items, spend):
    if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in _items(items, spend)):
        raise Refused("a dict built from something other than (key, value) pairs")
    return {_hashable(k): v for k, v in items}


def _plain_dict(items=(), spend=None):
    return _pairs(items, spend)


def _complex(real, imag, spend):
    if not all(type(v) in (int, float) for v in (real, imag)):
        raise Refused("a complex number built from something other than two numbers")
    return complex(real, imag)


def _bytes_of(kind):
    def make(value=b"", spend=None):
        if not isinstance(value, (bytes, bytearray)):
            raise Refused(f"{kind.__name__} built from something other than bytes")
        spend(0, len(value))
        return kind(value)
    return make


def _generator_state(*args, spend):
    # Older checkpoints hold Paddle's generator state; it is not used (train.py seeds
    # Paddle's generator itself before every step), so it is read as None.
    return _Ignored()


class _Ignored:
    """An object read as None: its one BUILD's state is dropped unread."""
    __slots__ = ("value",)

    def __init__(self):
        self.value = None

    def build(self, state):
        self.value = True


def _names():
    """The names a data file may use, each with its stand-in."""
    table = {
        ("numpy", "dtype"): lambda code, align=False, copy=True, spend=None: _Dtype(_dtype_code(code)),
        ("numpy", "ndarray"): None,  # only as _reconstruct's first argument
        ("_codecs", "encode"): _encode,
        ("builtins", "tuple"): lambda items=(), spend=None: tuple(_items(items, spend)),
        ("builtins", "list"): lambda items=(), spend=None: list(_items(items, spend)),
        ("builtins", "set"): lambda items=(), spend=None: set(map(_hashable, _items(items, spend))),
        ("builtins", "frozenset"): lambda items=(), spend=None: frozenset(
            map(_hashable, _items(items, spend))),
        ("builtins", "dict"): _plain_dict,
        ("builtins", "complex"): _complex,
        ("builtins", "bytearray"): _bytes_of(bytearray),
        ("builtins", "bytes"): _bytes_of(bytes),
        ("collections", "OrderedDict"): _plain_dict,
        ("paddle.base.libpaddle", "GeneratorState"): _generator_state,
    }
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "_reconstruct")] = _reconstruct
        table[(f"{core}.multiarray", "scalar")] = _scalar
        table[(f"{core}.numeric", "_frombuffer")] = _frombuffer
    table[("__builtin__", "set")] = table[("builtins", "set")]   # Python 2's module name
    for name in ("tuple", "list", "frozenset", "dict", "complex", "bytearray", "bytes"):
        table[("__builtin__", name)] = table[("builtins", name)]
    return table


# --------------------------------------------------------------------------- the machine

class _Machine:
    """Runs a pickle's opcodes, building only plain values and the stand-ins above."""

    def __init__(self, size, encoding):
        if encoding not in ("latin1", "bytes"):
            raise ValueError(f"encoding must be 'latin1' or 'bytes', not {encoding!r}")
        self.encoding = encoding
        # Two budgets proportional to the file: the memory of the Python objects built
        # (counted as CPython lays them out, every reference and memo entry included: a
        # checkpoint's containers take a few times their bytes in the file, a small file of
        # empty sets hundreds of times), and the bytes of arrays and bytes objects built,
        # which copy the file's own at most twice (text -> bytes -> array).
        self.size = size
        self.budget = size + REFERENCE_ALLOWANCE  # values, counting shared ones at each use
        self.memory = self.bytes = 0
        self.names = _names()
        self.stack, self.marks, self.memo = [], [], {}

    def spend(self, memory, nbytes=0):
        """Count what is built against the file's budgets."""
        self.memory += memory
        self.bytes += nbytes
        if self.memory > MEMORY_PER_BYTE * self.budget or self.bytes > 2 * self.budget:
            raise Refused(f"more than its {self.size} bytes allow: a small file that expands "
                          "when read")

    def run(self, raw):
        with warnings.catch_warnings():  # genops warns of bad escapes in mangled protocol-0 text
            warnings.simplefilter("ignore", DeprecationWarning)
            return self.interpret(raw)

    def interpret(self, raw):
        for opcode, arg, _ in pickletools.genops(io.BytesIO(raw)):
            handler = getattr(self, "op_" + opcode.name, None)
            if handler is None:
                raise Refused(f"the pickle instruction {opcode.name}, which no data file uses")
            if opcode.name == "STOP":
                if len(self.stack) != 1 or self.marks:
                    raise ValueError("a pickle that stops with other than one value")
                return self.stack[0]
            handler(arg)
        raise ValueError("a pickle without STOP")

    # stack and memo ------------------------------------------------------------------

    def push(self, value, new=True):
        """Put `value` on the stack; `new`: it was made for this (its memory is counted)."""
        self.spend(REFERENCE + (sys.getsizeof(value) if new else 0))
        self.stack.append(value)

    def pop(self):
        if not self.stack:
            raise ValueError("a pickle that takes from an empty stack")
        return self.stack.pop()

    def pop_mark(self):
        if not self.marks:
            raise ValueError("a pickle that closes a MARK it never opened")
        items, self.stack = self.stack, self.marks.pop()
        return items

    def op_MARK(self, _):
        self.spend(sys.getsizeof([]))
        self.marks.append(self.stack)
        self.stack = []

    def op_POP(self, _):
        self.pop()

    def op_POP_MARK(self, _):
        self.pop_mark()

    def op_DUP(self, _):
        self.push(self.top(), new=False)

    def top(self):
        if not self.stack:
            raise ValueError("a pickle that reads an empty stack")
        return self.stack[-1]

    def op_PUT(self, index):
        self.spend(ENTRY)
        self.memo[index] = self.top()

    op_BINPUT = op_LONG_BINPUT = op_PUT

    def op_MEMOIZE(self, _):
        self.spend(ENTRY)
        self.memo[len(self.memo)] = self.top()

    def op_GET(self, index):
        if index not in self.memo:
            raise ValueError(f"a pickle that reads memo entry {index} before writing it")
        self.push(self.memo[index], new=False)

    op_BINGET = op_LONG_BINGET = op_GET

    def op_PROTO(self, version):
        if not 0 <= version <= 5:
            raise ValueError(f"pickle protocol {version}, newer than 5")

    def op_FRAME(self, _):
        pass

    op_STOP = op_FRAME  # handled in run

    # plain values --------------------------------------------------------------------

    def op_NONE(self, _):
        self.push(None)

    def op_NEWTRUE(self, _):
        self.push(True)

    def op_NEWFALSE(self, _):
        self.push(False)

    # values read from the file: their bytes are the file's own
    op_INT = op_BININT = op_BININT1 = op_BININT2 = op_LONG = op_LONG1 = op_LONG4 = push
    op_FLOAT = op_BINFLOAT = push
    op_UNICODE = op_BINUNICODE = op_SHORT_BINUNICODE = op_BINUNICODE8 = push
    op_BINBYTES = op_SHORT_BINBYTES = op_BINBYTES8 = push

    def op_BYTEARRAY8(self, value):
        self.push(bytearray(value))

    def op_STRING(self, value):
        # genops reads Python 2's str as latin-1 text; encoding="bytes" wants the bytes back
        self.push(value.encode("latin1") if self.encoding == "bytes" else value)

    op_BINSTRING = op_SHORT_BINSTRING = op_STRING

    # containers ----------------------------------------------------------------------

    def push_tuple(self, items):
        self.push(tuple(items))

    def op_EMPTY_TUPLE(self, _):
        self.push_tuple(())

    def op_TUPLE1(self, _):
        self.push_tuple([self.pop()])

    def op_TUPLE2(self, _):
        b, a = self.pop(), self.pop()
        self.push_tuple([a, b])

    def op_TUPLE3(self, _):
        c, b, a = self.pop(), self.pop(), self.pop()
        self.push_tuple([a, b, c])

    def op_TUPLE(self, _):
        self.push_tuple(self.pop_mark())

    def op_EMPTY_LIST(self, _):
        self.push([])

    def op_LIST(self, _):
        self.push(self.pop_mark())

    def op_APPEND(self, _):
        value = self.pop()
        self.spend(REFERENCE)
        self.container(list).append(value)

    def op_APPENDS(self, _):
        items = self.pop_mark()
        self.spend(REFERENCE * len(items))
        self.container(list).extend(items)

    def op_EMPTY_DICT(self, _):
        self.push({})

    def op_DICT(self, _):
        items = self.pop_mark()
        self.push(self.fill({}, items))

    def op_SETITEM(self, _):
        value, key = self.pop(), self.pop()
        self.fill(self.container(dict), [key, value])

    def op_SETITEMS(self, _):
        items = self.pop_mark()
        self.fill(self.container(dict), items)

    def op_EMPTY_SET(self, _):
        self.push(set())

    def op_ADDITEMS(self, _):
        items = self.pop_mark()
        self.spend(ENTRY * len(items))
        self.container(set).update(map(_hashable, items))

    def op_FROZENSET(self, _):
        items = self.pop_mark()
        self.spend(ENTRY * len(items))
        self.push(frozenset(map(_hashable, items)))

    def container(self, kind):
        target = self.top()
        if type(target) is not kind:
            raise Refused(f"items added to a {type(target).__name__} instead of a {kind.__name__}")
        return target

    def fill(self, target, items):
        if len(items) % 2:
            raise ValueError("a pickle with a dict key without a value")
        self.spend(ENTRY * len(items) // 2)
        for i in range(0, len(items), 2):
            target[_hashable(items[i])] = items[i + 1]
        return target

    # names, calls and BUILD ----------------------------------------------------------

    def op_GLOBAL(self, qualified):
        self.push_name(*qualified.split(" ", 1))

    def op_STACK_GLOBAL(self, _):
        name, module = self.pop(), self.pop()
        if not (isinstance(module, str) and isinstance(name, str)):
            raise ValueError("a pickle naming a global with other than strings")
        self.push_name(module, name)

    def push_name(self, module, name):
        key = (module, name)
        if key not in self.names:
            raise Refused(_shown(module, name))
        self.push(_Name(key, self.names[key]))

    def op_REDUCE(self, _):
        args, function = self.pop(), self.pop()
        if not isinstance(function, _Name) or function.call is None:
            raise Refused("a call of something other than a data constructor")
        if not isinstance(args, tuple):
            raise ValueError("a pickle calling with arguments that are not a tuple")
        try:
            value = function.call(*args, spend=self.spend)
        except TypeError:  # a stand-in called with the wrong number of arguments
            raise Refused(f"{'.'.join(function.name)} called with arguments no data file "
                          "uses") from None
        self.push(value)

    def op_NEWOBJ(self, _):
        args, cls = self.pop(), self.pop()
        if not (isinstance(cls, _Name) and cls.call is _generator_state and args == ()):
            raise Refused("an object built by NEWOBJ, which no data file but an old Paddle "
                          "generator state uses")
        self.push(_Ignored())

    def op_BUILD(self, _):
        state = self.pop()
        target = self.top()
        if not isinstance(target, (_Dtype, _Array, _Ignored)) or target.value is not None:
            raise Refused(f"state given to a {type(target).__name__} (only a numpy array or "
                          "dtype takes one, once)")
        target.build(state)


# --------------------------------------------------------------------------- finishing

class _Finisher:
    """Replaces the stand-ins by what they stand for and checks the whole value: no cycles,
    no deeper than MAX_DEPTH, no larger than the budget counting every use of a shared
    object; every object is visited once."""

    def __init__(self, budget):
        self.budget = budget
        self.done = {}      # id -> (finished value, size counting shared parts at each use)
        self.open = set()   # ids being finished: meeting one again is a cycle

    def finish(self, value, depth=0):
        if depth > MAX_DEPTH:
            raise Refused(f"values nested deeper than {MAX_DEPTH} levels")
        key = id(value)
        if key in self.done:
            return self.done[key][0]
        if key in self.open:
            raise Refused("a value that contains itself")
        self.open.add(key)
        finished, size = self.convert(value, depth)
        self.open.discard(key)
        self.done[key] = (finished, size, value)  # the original kept alive: ids stay unique
        return finished

    def size_of(self, value):
        return self.done[id(value)][1]

    def convert(self, value, depth):
        if value is None or type(value) in (bool, int, float, complex, str, bytes, bytearray):
            return value, 1
        if isinstance(value, (_Array, _Built)):
            if value.value is None:
                raise Refused("a numpy array without its state")
            return value.value, 1
        if isinstance(value, _Dtype):
            raise Refused("a numpy dtype on its own (a data file holds them only in arrays)")
        if isinstance(value, _Ignored):
            return None, 1
        if type(value) in (list, tuple, set, frozenset):
            items = [self.finish(v, depth + 1) for v in value]
            size = 1 + sum(self.size_of(v) for v in value)
            return self.check(type(value)(items), size)
        if type(value) is dict:
            pairs = [(self.finish(k, depth + 1), self.finish(v, depth + 1)) for k, v in value.items()]
            size = 1 + sum(self.size_of(k) + self.size_of(v) for k, v in value.items())
            return self.check(dict(pairs), size)
        if isinstance(value, _Name):
            raise Refused(f"the name {'.'.join(value.name)} used as a value")
        raise Refused(f"a {type(value).__name__}")

    def check(self, value, size):
        if size > self.budget:
            raise Refused(f"shared references that expand to more than {self.budget} values")
        return value, size
