"""The ``tilefx`` command: plan, bench, demo dispatch, model specs, one-line errors.

Most tests call ``tilefx.cli.main(argv)`` in process (fast); one runs the module as a
subprocess to check what a user sees on an error: one line, no traceback, nonzero status.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import pytest

from tilefx import cli

TINY = textwrap.dedent("""
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    INSTANCE = build()
    NOT_A_MODEL = 42
""")


@pytest.fixture
def tinynets(tmp_path, monkeypatch):
    (tmp_path / "tilefx_cli_tinynets.py").write_text(TINY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "tilefx_cli_tinynets"


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("tilefx: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------------- parsing


def test_parse_bytes_and_shape():
    assert cli.parse_bytes("200MB") == 200_000_000
    assert cli.parse_bytes("1.5GiB") == 1536 * 2**20
    assert cli.parse_bytes("64 kib") == 65536
    assert cli.parse_bytes("4096") == 4096
    for bad in ("lots", "12XB", "-5MB", "0"):
        with pytest.raises(cli.UsageError):
            cli.parse_bytes(bad)
    assert cli.parse_shape("1,3,512,512") == (1, 3, 512, 512)
    assert cli.parse_shape("2x3x64x96") == (2, 3, 64, 96)
    for bad in ("1,3", "a,b,c,d", "1,3,0,4", "1,2,3,4,5,6"):
        with pytest.raises(cli.UsageError):
            cli.parse_shape(bad)


def test_load_model_specs(tinynets):
    assert type(cli.load_model("resnet18")).__name__ == "ResNet"
    seg = cli.load_model("lraspp_mobilenet_v3_large")  # no backbone weights are downloaded
    assert not seg.training
    assert not cli.load_model(f"{tinynets}:build").training
    assert not cli.load_model(f"{tinynets}:INSTANCE").training
    with pytest.raises(cli.UsageError, match="did you mean resnet18"):
        cli.load_model("resnet1")
    with pytest.raises(cli.UsageError, match="not a torch.nn.Module|neither"):
        cli.load_model(f"{tinynets}:NOT_A_MODEL")
    with pytest.raises(cli.UsageError, match="cannot import"):
        cli.load_model("no_such_package_xyz:build")
    with pytest.raises(cli.UsageError, match="has no attribute"):
        cli.load_model(f"{tinynets}:nope")


# ----------------------------------------------------------------------------- plan


def test_plan_table(tinynets, capsys):
    code, out, err = run(["plan", f"{tinynets}:build", "--shape", "1,3,96,96"], capsys)
    assert code == 0, err
    assert "chosen:" in out and "Pareto frontier" in out
    assert "untiled" in out and "peak MiB" in out
    assert "*" in out  # the chosen plan is marked in the table
    assert "tracing and planning" in err  # progress goes to stderr


def test_plan_json(tinynets, capsys):
    code, out, err = run(["plan", f"{tinynets}:build", "--shape", "1,3,96,96", "--json",
                          "--budget", "10GB"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["shape"] == [1, 3, 96, 96] and data["memory_budget"] == 10**10
    assert data["plan"]["peak_bytes"] <= data["plan"]["baseline_peak_bytes"]
    # Lowest peak first, each plan slower than the one before: nothing on the frontier is
    # dominated. (Whether the untiled plan is on it depends on measured times: on this tiny
    # map a 2x2 grid can be predicted a few percent faster, which dominates it.)
    front = data["pareto"]
    peaks, times = [p["peak_bytes"] for p in front], [p["time_s"] for p in front]
    assert front and peaks == sorted(peaks) and times == sorted(times, reverse=True)
    assert data["plan"]["peak_bytes"] in peaks
    assert min(peaks) < data["plan"]["baseline_peak_bytes"]  # some plan tiles
    assert err == ""  # --json keeps stderr quiet too



def test_plan_json_with_a_mac_limit(tinynets, capsys):
    """--max-extra-compute reaches the planner: with 0 the chosen plan computes no MAC twice."""
    code, out, err = run(["plan", f"{tinynets}:build", "--shape", "1,3,96,96", "--json",
                          "--max-overhead", "100", "--max-extra-compute", "0"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["max_extra_compute"] == 0.0
    assert data["plan"]["extra_compute"] == 0.0

def test_plan_table_marks_one_chosen_plan_and_names_primitives():
    """Two frontier plans with the same regions (none) but other primitives: only the chosen
    one is starred, and its row says that it changes primitives (it used to read "untiled")."""
    from tilefx.plans import Frontier, Plan

    front = Frontier.of([Plan((), 100, 100, 0.0, 1.0, 1.0),
                         Plan((), 60, 100, 0.0, 1.1, 1.0, primitives=(("conv2d_3", "native"),))])
    chosen = front.choose(max_overhead=0.15)
    assert chosen.primitives
    table = cli.format_plan(chosen, "net", (1, 3, 8, 8))
    rows = [ln for ln in table.splitlines() if "peak" not in ln and ("untiled" in ln or "primitive" in ln)]
    starred = [ln for ln in rows if ln.lstrip().startswith("*")]
    assert len(starred) == 1 and "1 layer(s) on another primitive" in starred[0], table
    assert "1 layer(s) on another primitive" in table.splitlines()[1]  # the "chosen:" line


def test_plan_impossible_budget_is_one_line(tinynets, capsys):
    code, out, err = run(["plan", f"{tinynets}:build", "--shape", "1,3,96,96", "--budget", "1B"],
                         capsys)
    assert code == 1 and out == ""
    one_line_error(err)


# ----------------------------------------------------------------------------- bench


def test_bench_json(tinynets, capsys):
    code, out, err = run(["bench", f"{tinynets}:build", "--shape", "1,3,64,64", "--merge", "4",
                          "--tiles", "2x2", "--repeats", "2", "--warmup", "0", "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["outputs_match"] and r["max_abs_diff"] <= r["tolerance"]
    assert r["regions"][0]["grid"] == [2, 2]
    for k in ("untiled", "tiled"):
        assert r[k]["peak_bytes"] > 0 and r[k]["median_s"] > 0 and r[k]["runs"] == 2
    assert "measuring peak memory" in err and "timing" in err


def test_bench_table_with_planner(tinynets, capsys):
    code, out, err = run(["bench", f"{tinynets}:build", "--shape", "1,3,64,64", "--repeats", "1",
                          "--quiet"], capsys)
    assert code == 0, err
    assert "peak MiB" in out and "outputs match" in out
    assert err == ""


def test_progress_bar_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    s = Tty()
    p = cli.Progress(s, width=10)
    p.stage("building")
    p.bar("timing", 3, 10)
    p.bar("timing", 10, 10)
    p.done()
    text = s.getvalue()
    assert "building" in text and "[###.......] 3/10" in text and "[##########] 10/10" in text
    assert text.endswith("\n")
    quiet = io.StringIO()  # not a terminal: stage lines only, no carriage returns
    p = cli.Progress(quiet)
    p.bar("timing", 1, 2)
    assert quiet.getvalue() == ""


# ----------------------------------------------------------------------------- errors, demo


@pytest.mark.parametrize("argv, code, match", [
    (["plan", "resnet1", "--shape", "1,3,64,64"], 2, "unknown MODEL 'resnet1'"),
    (["plan", "resnet18", "--shape", "1,3"], 2, "3 to 5 positive sizes"),
    (["plan", "resnet18"], 2, "--shape"),
    (["plan", "resnet18", "--shape", "1,3,64,64", "--budget", "much"], 2, "memory size"),
    (["bench", "resnet18", "--shape", "1,3,64,64", "--merge", "nope", "--quiet"], 1, "merge='nope'"),
    (["bench", "resnet18", "--shape", "1,3,64,64", "--repeats", "0"], 2, "--repeats"),
    (["frobnicate"], 2, "invalid choice"),
])
def test_errors_are_one_line(argv, code, match, capsys):
    got, out, err = run(argv, capsys)
    assert got == code
    assert match in one_line_error(err)


def test_no_command_prints_help(capsys):
    code, out, _ = run([], capsys)
    assert code == 2 and "plan" in out and "bench" in out


def test_demo_dispatches_to_tilefx_demo_run(monkeypatch, capsys):
    import tilefx.demo

    calls = []
    monkeypatch.setattr(tilefx.demo, "run", lambda **kw: calls.append(kw) or 0)
    assert cli.main(["demo"]) == 0
    assert cli.main(["demo", "--size", "128", "--model", "resnet18"]) == 0
    assert calls == [{}, {"size": 128, "model_name": "resnet18"}]


def test_subprocess_error_has_no_traceback():
    p = subprocess.run([sys.executable, "-m", "tilefx.cli", "bench", "not_a_model_at_all",
                        "--shape", "1,3,32,32"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("tilefx: error: unknown MODEL")


def test_console_script_is_declared():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="console_scripts") if ep.name == "tilefx"]
    assert eps and eps[0].value == "tilefx.cli:main"
