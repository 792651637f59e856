"""Bad input: the exception type, the argument named in the message, the inputs unchanged."""

import fractions
import os
import subprocess
import sys

import pytest
import torch

import fastrdrop
from fastrdrop import _common, _native

from conftest import fused_backends
from inputs import labels, logits_pair

N, V = 4, 300


def call_args():
    z1, z2 = logits_pair((N, V), torch.float32)
    return dict(logits1=z1.requires_grad_(), logits2=z2.requires_grad_(), target=labels((N,), V))


# (name, change to the arguments, exception type, words the message must hold)
BAD_INPUTS = [
    ("logits not a tensor", lambda a: a.update(logits1=[[1.0, 2.0]]), TypeError, "logits1"),
    ("integer logits", lambda a: a.update(logits2=torch.ones(N, V, dtype=torch.long)),
     TypeError, "logits2 must be a floating-point"),
    ("shape mismatch", lambda a: a.update(logits2=a["logits2"].detach()[:, :-1]), ValueError,
     "logits2 must have the same shape"),
    ("dtype mismatch", lambda a: a.update(logits2=a["logits2"].detach().double()), TypeError,
     "logits2 must have the same dtype"),
    ("empty vocabulary", lambda a: a.update(logits1=a["logits1"].detach()[:, :0],
                                            logits2=a["logits2"].detach()[:, :0]),
     ValueError, "logits1 must have shape [..., V] with V >= 1"),
    ("scalar logits", lambda a: a.update(logits1=torch.tensor(1.0), logits2=torch.tensor(1.0)),
     ValueError, "logits1"),
    ("float target", lambda a: a.update(target=a["target"].float()), TypeError, "target"),
    ("target shape", lambda a: a.update(target=a["target"][:-1]), ValueError,
     "target must have shape [4]"),
    ("label too large", lambda a: a["target"].__setitem__(1, V), ValueError,
     f"target has labels outside [0, V={V})"),
    ("negative label", lambda a: a["target"].__setitem__(2, -1), ValueError, "ignore_index=-100"),
    # int64 would wrap 2^64 - 100 to -100, an ignored token
    ("uint64 label past int64", lambda a: a.update(target=torch.tensor(
        [1, 2**64 - 100, 2, 3], dtype=torch.uint64, device=a["target"].device)), ValueError,
     f"target has labels outside [0, V={V})"),
    ("unknown reduction", lambda a: a.update(reduction="avg"), ValueError, "reduction"),
    ("negative alpha", lambda a: a.update(alpha=-0.1), ValueError, "alpha must be >= 0"),
    ("alpha not a number", lambda a: a.update(alpha="1"), TypeError, "alpha"),
    # a real number of another type (as numpy's scalars are): the message says what is taken
    ("alpha a Fraction", lambda a: a.update(alpha=fractions.Fraction(1, 2)), TypeError,
     "alpha must be a real number given as a Python int or float, got Fraction(1, 2)"),
    ("smoothing of 1", lambda a: a.update(label_smoothing=1.0), ValueError, "label_smoothing"),
    ("negative smoothing", lambda a: a.update(label_smoothing=-0.1), ValueError,
     "label_smoothing"),
    ("zero softcap", lambda a: a.update(softcap=0.0), ValueError, "softcap"),
    ("ignore_index float", lambda a: a.update(ignore_index=-100.0), TypeError, "ignore_index"),
    ("unknown backend", lambda a: a.update(backend="cuda"), ValueError, "backend"),
    ("sparse logits", lambda a: a.update(logits1=a["logits1"].detach().to_sparse()), TypeError,
     "logits1 must be a dense (strided) tensor"),
    ("sparse target", lambda a: a.update(target=a["target"].to_sparse()), TypeError,
     "target must be a dense (strided) tensor"),
    ("ignore_index past int64", lambda a: a.update(ignore_index=2**63), ValueError,
     "ignore_index must fit in int64"),
    ("softcap of 0 in float32", lambda a: a.update(softcap=1e-50), ValueError, "softcap"),
    ("inplace_backward a string", lambda a: a.update(inplace_backward="False"), TypeError,
     "inplace_backward must be True or False"),
    ("return_parts a string", lambda a: a.update(return_parts="no"), TypeError,
     "return_parts must be True or False"),
]


@pytest.fixture
def label_check(monkeypatch):
    """Labels checked on every call, as fastrdrop.set_label_check(True) does for debugging."""
    monkeypatch.setitem(_common._LABEL_CHECK, "always", False)  # restored afterwards
    fastrdrop.set_label_check(True)


def _check_labels(name, args, backend, request):
    # Labels on a GPU, and the Triton path anywhere, are not read back by default (a host sync:
    # see tests/test_sync.py); the cases about labels turn the check on.
    if "label" in name and not _common.labels_checked(args["target"], backend):
        request.getfixturevalue("label_check")


@pytest.mark.parametrize("backend", ["torch", *fused_backends()])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(case, inplace, backend, request):
    name, change, error, words = case
    args = dict(call_args(), backend=backend, inplace_backward=inplace)
    change(args)
    _check_labels(name, args, backend, request)
    before = {k: v.detach().to_dense().clone() for k, v in args.items()
              if isinstance(v, torch.Tensor)}
    with pytest.raises(error) as info:
        fastrdrop.rdrop_loss(**args)
    assert words in str(info.value)
    for name, value in before.items():
        assert torch.equal(args[name].detach().to_dense(), value), \
            f"{name} changed by a failed call"


@pytest.mark.parametrize("case", BAD_INPUTS[:12], ids=[c[0] for c in BAD_INPUTS[:12]])
def test_reference_checks_the_same(case, request):
    name, change, error, words = case
    args = call_args()
    change(args)
    _check_labels(name, args, "torch", request)
    with pytest.raises(error, match=None) as info:
        fastrdrop.reference.rdrop_loss(**args)
    assert words in str(info.value)


def test_unavailable_backends_say_why():
    z1, z2 = logits_pair((N, V), torch.float32)
    if z1.device.type != "cpu":
        with pytest.raises(ValueError, match="backend='native' runs on CPU tensors"):
            fastrdrop.rdrop_loss(z1, z2, backend="native")
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        fastrdrop.rdrop_loss(z1.double(), z2.double(), backend="triton")


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    # A fresh process without TRITON_INTERPRET: backend="triton" on CPU tensors says what to do.
    script = (
        "import torch, fastrdrop\n"
        "z = torch.randn(2, 5)\n"
        "try:\n"
        "    fastrdrop.rdrop_loss(z, z + 1, backend='triton')\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert "backend='triton'" in out and "TRITON_INTERPRET=1" in out


@pytest.mark.parametrize("layout", ["int64", "int32", "transposed"])
def test_the_first_bad_label_is_named(layout):
    # Contiguous int64 labels on CPU are checked by the native library where it is built, other
    # labels by torch ops: either way the message names the first bad label in the labels' order
    # (300 at flat index 2, before -5 at 4).
    rows = [[3, -100, 300, 7], [-5, 2, 2, 2]]
    y = {"int64": lambda: torch.tensor(rows), "int32": lambda: torch.tensor(rows).int(),
         "transposed": lambda: torch.tensor(rows).t().contiguous().t()}[layout]()
    native = _native.unavailable_reason() is None
    assert _native.first_bad_label(y, V, -100) == (2 if native and layout == "int64" else None)
    z1, z2 = logits_pair((2, 4, V), torch.float32)
    with pytest.raises(ValueError, match=r"e\.g\. 300$"):
        fastrdrop.rdrop_loss(z1, z2, y)
    y[0, 2] = 299
    with pytest.raises(ValueError, match=r"e\.g\. -5$"):
        fastrdrop.rdrop_loss(z1, z2, y)
    y[1, 0] = -100
    fastrdrop.rdrop_loss(z1, z2, y)


def test_labels_without_memory_of_their_own_are_checked_by_torch_ops():
    # Under torch.func.functionalize labels are plain int64 CPU tensors whose data pointer is 0:
    # the native check leaves them to the torch ops (it read address 0 once).
    def check(y):
        _common.check_target_values(y, V, -100, "native")
        return y

    good = torch.tensor([1, 2, -100])
    assert torch.equal(torch.func.functionalize(check)(good), good)
    with pytest.raises(ValueError, match=r"e\.g\. 300$"):
        torch.func.functionalize(check)(torch.tensor([1, 300, -100]))


@pytest.mark.parametrize("backend", fused_backends())
def test_torch_func_transforms_are_refused_by_the_fused_paths(backend):
    # the fused autograd Functions have no torch.func rules: the tensor and the way out are named
    # (the reference runs under them, tests/test_reference.py)
    z1, z2 = logits_pair((3, 11), torch.float32)
    target = labels((3,), 11)
    calls = {
        "logits1": lambda a: fastrdrop.rdrop_loss(a, z2, target, backend=backend),
        "logits": lambda a: fastrdrop.stacked_rdrop_loss(torch.cat([a, z2]), target,
                                                         backend=backend),
    }
    for name, call in calls.items():
        for transform in (torch.func.grad, lambda f: torch.func.vmap(f, in_dims=1)):
            with pytest.raises(ValueError, match=f"{name} is traced by a torch.func transform.*"
                                                 "backend='torch'"):
                transform(call)(z1 if transform is torch.func.grad else z1[:, None])
    with pytest.raises(ValueError, match="hidden1 is traced by a torch.func transform"):
        torch.func.grad(lambda h: fastrdrop.linear_rdrop_loss(
            h, z2, torch.randn(7, 11), target, backend=backend))(z1)
