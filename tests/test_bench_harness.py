"""The benchmark harness measures what its table says: every case is timed before any memory is
measured (on CPU that measurement makes glibc hand out fresh pages from then on), and the CPU
peak memory of a fwd+bwd call is the gradient it returns, or twice that where autograd assembles
it from two halves. The options say which cases run."""

import dataclasses
import gc
import json
import subprocess

import pytest
import torch

from fastrdrop import _native

from benchmarks import __main__ as runner
from benchmarks import measure, vocab_parallel
from benchmarks.measure import Case


def test_every_case_is_timed_before_memory_is_measured(monkeypatch):
    events = []
    monkeypatch.setattr(measure, "time_calls",
                        lambda fn, case, *args: events.append(("time", case.mode)) or [1e-3] * 3)
    monkeypatch.setattr(measure, "peak_extra_bytes",
                        lambda fn, case, *args: events.append(("memory", case.mode)) or 0)
    cases = [Case(8, 64, "float32", "fastrdrop", mode) for mode in ("fwd", "fwd+bwd")]
    rows = measure.measure(cases, torch.device("cpu"), repeats=3)
    assert events == [("time", "fwd"), ("time", "fwd+bwd"),
                      ("memory", "fwd"), ("memory", "fwd+bwd")]
    assert [row["status"] for row in rows] == ["ok", "ok"]


def test_a_wrong_provider_gets_a_row_that_says_so(monkeypatch):
    # it is not timed, and the providers after it still are
    eager = measure.PROVIDERS["eager"]

    def off_by_one_percent():
        loss = eager.make()
        return lambda logits, target: 1.01 * loss(logits, target)

    monkeypatch.setitem(measure.PROVIDERS, "eager",
                        dataclasses.replace(eager, make=off_by_one_percent))
    cases = [Case(8, 64, "float32", provider, "fwd") for provider in ("eager", "fastrdrop")]
    rows = measure.measure(cases, torch.device("cpu"), repeats=3, warmup=1)
    assert rows[0]["status"].startswith("wrong result: loss ") and "median_ms" not in rows[0]
    assert rows[1]["status"] == "ok"


def test_gradients_wrong_at_full_size_only_are_caught(monkeypatch):
    # the timed call is the full-size one, whose kernels may take other paths than the check's
    # 16 tokens (streamed stores): its first tokens' gradients are checked too
    stacked = measure.PROVIDERS["fastrdrop-stacked"]

    def wrong_past_16_tokens():
        loss = stacked.make()

        def fn(logits, target):
            extra = (logits - logits.detach()).sum() if len(target) > 16 else 0.0
            return loss(logits, target) + 0.1 * extra  # the same loss, another gradient

        return fn

    monkeypatch.setitem(measure.PROVIDERS, "fastrdrop-stacked",
                        dataclasses.replace(stacked, make=wrong_past_16_tokens))
    (row,) = measure.measure([Case(32, 64, "float32", "fastrdrop-stacked", "fwd+bwd")],
                             torch.device("cpu"), repeats=2, warmup=1)
    assert row["status"] == "wrong result: gradients differ from the reference's"


def test_timed_calls_skip_the_objects_made_before_them(monkeypatch):
    # a collection set off inside a timed call went through every object of the process (torch's,
    # a compiled function's): 1.3-1.6 ms in one of the first calls of each benchmark process. The
    # timed calls run with those objects frozen, and with what the warm-up calls made (compiled
    # graphs); the collection before comes before the warm-up calls (the call right after one
    # took 0.5 ms more), and nothing stays frozen after, where what they left is collected
    events = []
    collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *args: events.append("collect") or collect(*args))
    loss = measure.PROVIDERS["eager"].make()

    def fn(logits, target):
        events.append("frozen" if gc.get_freeze_count() > 0 else "call")
        return loss(logits, target)

    case = Case(8, 64, "float32", "eager", "fwd+bwd")
    inputs, target = measure.make_inputs(case, torch.device("cpu"))
    samples = measure.time_calls(fn, case, measure.PROVIDERS["eager"], inputs, target,
                                 torch.device("cpu"), repeats=2, warmup=1, warmup_seconds=0)
    assert len(samples) == 2 and events == ["collect", "call", "frozen", "frozen", "collect"]
    assert gc.get_freeze_count() == 0


def test_warm_up_calls_go_on_for_a_while():
    # bf16 in place at 256 x 32000 went from 3.1 to 2.4 ms over the first ten or so calls of a
    # benchmark process (a new copy of the logits each): the two or three timed calls a round,
    # after two warm-up calls, fell in the slower part
    now = [0.0]

    def call():  # each takes 1/64 s on this clock
        now[0] += 1 / 64

    def calls(warm, seconds):
        before = now[0]
        measure.warm_up(call, warm, seconds, clock=lambda: now[0])
        return round((now[0] - before) * 64)

    assert calls(2, 0) == 2
    assert calls(2, 0.25) == 2 + 16  # the clock starts after the first two
    assert calls(2, 1e9) == measure.MAX_WARMUP_CALLS
    assert calls(60, 1e9) == 60


def test_the_runner_warms_up_before_timing():
    calls = []
    case = Case(8, 64, "float32", "eager", "fwd")
    inputs, target = measure.make_inputs(case, torch.device("cpu"))
    measure.time_calls(lambda *args: calls.append(1), case, measure.PROVIDERS["eager"], inputs,
                       target, torch.device("cpu"), repeats=3, warmup=2, warmup_seconds=1e9)
    assert len(calls) == measure.MAX_WARMUP_CALLS + 3


@pytest.mark.skipif(_native.unavailable_reason() is not None, reason="needs the native kernel")
def test_cpu_peak_memory_is_the_gradient():
    # DESIGN.md 7: at most the gradient plus 5% of the input (here as large as the gradient).
    # The gradient is paged in with transparent huge pages where the OS has them, so the
    # resident peak can pass it by up to a 2 MiB page: the size keeps 5% above that.
    n, v = 256, 32768
    gradient_mib = 2 * n * v * 4 / 2**20  # 64 MiB
    cases = [Case(n, v, "float32", "fastrdrop-stacked", mode) for mode in ("fwd", "fwd+bwd")]
    fwd, fwd_bwd = measure.measure_in_subprocess(cases, torch.device("cpu"), repeats=3, warmup=1)
    assert fwd["status"] == fwd_bwd["status"] == "ok"
    assert fwd["peak_extra_mib"] < 0.05 * gradient_mib
    assert 0.95 * gradient_mib <= fwd_bwd["peak_extra_mib"] <= 1.05 * gradient_mib
    assert 0 < fwd["q20_ms"] <= fwd["median_ms"] <= fwd["q80_ms"]
    # the halves of the same tensor: a gradient per half, then autograd's copy into one
    (halves,) = measure.measure_in_subprocess([Case(n, v, "float32", "fastrdrop", "fwd+bwd")],
                                              torch.device("cpu"), repeats=3, warmup=1)
    assert 1.95 * gradient_mib <= halves["peak_extra_mib"] <= 2.05 * gradient_mib


def test_a_run_cut_short_says_so():
    # the runner writes its table after every group; one whose run was stopped names the gap
    from benchmarks import report

    env = dict(device="cpu", torch="-", triton="-", fastrdrop="-", backend="-", commit="-",
               date="-")
    row = dict(dataclasses.asdict(Case(8, 64, "float32", "eager", "fwd")), status="out of memory")
    assert "Cut short: 1 of 3 cases" in report.markdown(dict(environment=env, repeats=3,
                                                             planned=3, rows=[row]))
    assert "Cut short" not in report.markdown(dict(environment=env, repeats=3, planned=1,
                                                   rows=[row]))


@pytest.mark.parametrize("model_name, expected", [
    ("AMD EPYC", "AMD EPYC (family 26, model 2)"),  # a virtual machine's bare name
    ("AMD EPYC 9654 96-Core Processor", "AMD EPYC 9654 96-Core Processor"),
])
def test_the_cpu_is_named_by_generation(tmp_path, model_name, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\ncpu family\t: 26\nmodel\t\t: 2\n"
                       f"model name\t: {model_name}\n\nprocessor\t: 1\ncpu family\t: 25\n")
    assert measure.cpu_name(str(cpuinfo)) == expected


def test_options_given_with_a_preset_win():
    args = runner.parse_args(["--preset", "cpu-vocab-parallel", "--worlds", "2", "--tokens", "64"])
    assert (args.worlds, args.tokens, args.vocab) == ([2], [64], [131072])


@pytest.mark.parametrize("device, sizes", [
    ("cuda", {(4096, v, "bfloat16") for v in runner.GPU_GRID["vocab"]}),
    ("cpu", {(4096, v, d) for v in runner.CPU_GRID["vocab"] for d in runner.CPU_GRID["dtypes"]}),
])
def test_a_slice_of_the_grid_keeps_its_other_axes(device, sizes):
    # a short GPU lease runs the grid a slice at a time
    groups = runner.case_groups(runner.parse_args(["--tokens", "4096"]), torch.device(device))
    assert {(g[0].n_tokens, g[0].vocab_size, g[0].dtype) for g in groups} == sizes


@pytest.mark.parametrize("argv, name", [
    ([], "h200-2026-12-06"),
    (["--preset", "gpu-quick"], "h200-2026-12-06-gpu-quick"),
    (["--tokens", "8192", "--vocab", "32000", "262144"], "h200-2026-12-06-n8192-v32000-262144"),
    (["--preset", "cpu-native", "--dtypes", "bfloat16"], "h200-2026-12-06-cpu-native-bfloat16"),
    (["--vocab", "32000", "--providers", "fastrdrop", "fastrdrop-pair", "--modes", "fwd+bwd"],
     "h200-2026-12-06-v32000-fastrdrop-fastrdrop-pair-fwd-bwd"),
    (["--preset", "cpu-vocab-parallel", "--worlds", "2"], "h200-2026-12-06-cpu-vocab-parallel-w2"),
])
def test_a_slice_gets_a_folder_of_its_own(argv, name):
    env = dict(device="H200", date="2026-12-06T03:00")
    assert runner.results_name(runner.parse_args(argv), env) == name


@pytest.mark.parametrize("device, name", [
    ("Intel(R) Xeon(R) Processor (family 6, model 167), 2 threads",
     "intel-xeon-processor-family-6-model-167-2-threads"),
    ("Intel(R) Core(TM) i7-1185G7", "intel-core-i7-1185g7"),
    ("AMD EPYC (family 25, model 17), 2 threads", "amd-epyc-family-25-model-17-2-threads"),
    ("b" * 62 + " c", "b" * 62 + "-c"),  # 64 characters: whole
    ("(R)", "unnamed"),
])
def test_a_device_names_its_folder_in_whole_words(device, name):
    # a name cut at a fixed length had left "...-model-167-2-th" for the first
    env = dict(device=device, date="2026-12-06T03:00")
    assert runner.results_name(runner.parse_args([]), env) == f"{name}-2026-12-06"


def test_long_device_names_keep_folders_of_their_own():
    # cut to whole words, two hosts that differ only in their thread counts shared a folder
    long = "Intel(R) Xeon(R) Platinum 8480+ Processor with a long name (family 6, model 143), "
    names = [runner.results_name(runner.parse_args([]), dict(device=long + threads,
                                                             date="2026-12-06T03:00"))
             for threads in ("112 threads", "8 threads")]
    assert names[0] != names[1]
    for name in names:
        device = name.removesuffix("-2026-12-06")
        assert len(device) <= 64
        assert device.startswith("intel-xeon-platinum-8480-processor-with-a-long-name-")


def test_compiled_cases_in_one_process_stay_compiled(monkeypatch):
    # The GPU runner measures every case in one process: each size added its graphs to the
    # earlier sizes' until Dynamo's recompile limit (8), and then the "compile" rows timed the
    # eager function, with a warning only. Here reaching the limit raises.
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    for vocab in (64, 96, 128):  # 3 graphs each: the check's two (no grad, 16 rows), the timed
        (row,) = measure.measure([Case(32, vocab, "float32", "compile", "fwd+bwd")],
                                 torch.device("cpu"), 2, 1)
        assert row["status"] == "ok"


def test_the_copy_is_timed_before_every_group_of_its_size(monkeypatch, tmp_path):
    # one copy timing per size let a single moment of a shared machine set every row's share
    # (a bf16 copy at 106 GB/s once, 45-65 GB/s otherwise): the median of all the size's samples
    samples = iter([[1.0] * 5, [9.0] * 5, [3.0] * 5])
    monkeypatch.setattr(runner, "time_copy", lambda n_bytes, device, repeats: next(samples))

    def measured(cases, device, repeats, warmup, first):
        return [dict(dataclasses.asdict(case), status="ok", **measure.timings(case, [1.0, 1.0]),
                     input_mib=1.0, peak_extra_mib=0.0) for case in cases]

    monkeypatch.setattr(runner, "measure_in_subprocess", measured)
    monkeypatch.setattr("sys.argv", ["benchmarks", "--device", "cpu", "--tokens", "8", "--vocab",
                                     "64", "--dtypes", "float32", "--modes", "fwd+bwd",
                                     "--providers", "eager", "textbook", "compile",
                                     "--rounds", "1", "--out", str(tmp_path), "--no-plots"])
    runner.main()
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    n_bytes = 2 * 8 * 64 * 4
    assert [row["copy_gbps"] for row in rows] == [2 * n_bytes / 3.0 / 1e9] * 3


def test_rounds_time_the_cases_in_turn(monkeypatch, tmp_path):
    # each provider timed once, in a block of its own, let one slow moment of a shared machine
    # set a whole row (bf16 stacked at 0.80x of the halves in one sweep, 0.54x in the next run):
    # in rounds, every case is timed in each, and a row takes the median of all its calls. A
    # case that failed, or was skipped, in the first round is not run again, and a run whose
    # last provider is skipped is whole (it said "cut short")
    order, slow = [], iter([True, False, False])  # the first round of "eager" is slow
    monkeypatch.setattr(runner, "time_copy", lambda n_bytes, device, repeats: [1.0] * 5)

    def measured(cases, device, repeats, warmup, first):
        (case,) = cases
        order.append((case.provider, first))
        if case.provider == "compile":
            return [dict(dataclasses.asdict(case), status="wrong result: loss 1, reference 2")]
        ms = 10.0 if case.provider == "eager" and next(slow) else 1.0
        return [dict(dataclasses.asdict(case), status="ok", **measure.timings(case, [ms] * repeats),
                     input_mib=1.0, **({"peak_extra_mib": 0.0} if first else {}))]

    monkeypatch.setattr(runner, "measure_in_subprocess", measured)
    monkeypatch.setattr("sys.argv", ["benchmarks", "--device", "cpu", "--tokens", "8", "--vocab",
                                     "64", "--dtypes", "float32", "--modes", "fwd+bwd",
                                     "--providers", "eager", "compile", "textbook", "liger",
                                     "--repeats", "5", "--out", str(tmp_path), "--no-plots"])
    runner.main()
    assert order == [("eager", True), ("compile", True), ("textbook", True)] + [
        ("eager", False), ("textbook", False)] * 2
    result = json.loads((tmp_path / "results.json").read_text())
    assert (result["rounds"], result["rounds_done"], result["repeats"]) == (3, 3, 6)
    eager, compiled, textbook, liger = result["rows"]
    assert eager["samples_ms"] == [10.0] * 2 + [1.0] * 4 and eager["median_ms"] == 1.0
    assert len(textbook["samples_ms"]) == 6 and eager["peak_extra_mib"] == 0.0
    assert compiled["status"].startswith("wrong result") and liger["status"].startswith("skipped")
    table = (tmp_path / "results.md").read_text()
    assert "in 3 rounds" in table and "Cut short" not in table


def test_vocab_parallel_rows_cover_a_vocabulary_the_ranks_do_not_divide(tmp_path):
    # 1000 over 3 ranks: the slices are 334, 333 and 333, and every label in [0, 1000) is one
    # of theirs (with 1000 // 3 each, a label past 999 raised on every rank)
    (row,) = vocab_parallel.run(8, 1000, [3], 1, str(tmp_path))
    assert row["world"] == 3 and row["vocab_size"] == 1000
    assert "| 3 | 8 | 1000 | 334-333 |" in vocab_parallel.markdown(
        dict(environment=dict(device="cpu", torch="", fastrdrop="", backend="", commit="",
                              date=""), repeats=1, rows=[row]))


@pytest.mark.parametrize("argv, message", [
    (["--vocab", "0"], "argument --vocab: must be >= 1, got 0"),
    (["--tokens", "-1"], "argument --tokens: must be >= 1, got -1"),
    (["--hidden", "0"], "argument --hidden: must be >= 1"),
    (["--worlds", "0"], "argument --worlds: must be >= 1"),
    (["--providers", "fastrdrop-linear"], "select no case"),
    (["--modes", "fwd", "--providers", "fastrdrop-stacked-inplace"], "select no case"),
    (["--worlds", "1", "--tokens", "8", "16"], "--worlds runs one size"),
    (["--worlds", "1", "--dtypes", "bfloat16"], "it takes no --dtypes"),
])
def test_options_that_measure_nothing_or_not_what_they_say_are_refused(argv, message, capsys):
    # before any results folder is made
    with pytest.raises(SystemExit):
        runner.parse_args([*argv, "--device", "cpu"])
    assert message in capsys.readouterr().err


def test_a_case_whose_process_fails_gets_a_row_with_its_error(capsys):
    # the run goes on with the other cases, and main() fails at its end
    case = Case(8, 64, "float32", "no-such-provider", "fwd")
    (row,) = measure.measure_in_subprocess([case], torch.device("cpu"), repeats=2, warmup=1)
    assert row["status"].startswith(f"{measure.FAILED}: KeyError: 'no-such-provider'"), row
    assert "Traceback" in capsys.readouterr().err


def test_the_commit_is_that_of_the_fastrdrop_measured(monkeypatch, tmp_path):
    # not the benchmarks' tree: an editable or installed fastrdrop may be another one
    monkeypatch.delenv("FASTRDROP_COMMIT", raising=False)
    package = tmp_path / "fastrdrop" / "__init__.py"
    package.parent.mkdir()
    package.write_text("")
    monkeypatch.setattr(measure.fastrdrop, "__file__", str(package))

    def commit():
        return measure.environment(torch.device("cpu"))["commit"]

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              cwd=tmp_path, capture_output=True, text=True, check=True).stdout

    assert commit() == "unknown"  # not a checkout
    git("init", "-q")
    assert commit() == "unknown"  # no commit yet
    git("add", ".")
    git("commit", "-q", "-m", "one")
    assert commit() == git("rev-parse", "--short=7", "HEAD").strip()
    package.write_text("x = 1\n")
    assert commit() == git("rev-parse", "--short=7", "HEAD").strip() + "-dirty"
    monkeypatch.setenv("FASTRDROP_COMMIT", "0123abc")
    assert commit() == "0123abc"
