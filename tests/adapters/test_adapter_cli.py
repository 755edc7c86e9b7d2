"""The ``adapters`` subcommands as a user runs them: exit codes, one-line errors, JSON output."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from adapter_helpers import CASES

from nlora_serve.adapters.cli import add_adapter_subcommands, main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nlora_serve.adapters.cli", *args],
                          capture_output=True, text=True, timeout=300)


def test_inspect_refuses_the_pickle_in_a_subprocess_without_opening_it():
    done = _run("inspect", str(CASES / "pickle-bin"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "pickle" in done.stderr.replace(str(CASES / "pickle-bin"), "") and done.stdout == ""
    assert not os.path.exists("/tmp/nlora-pickle-marker")


def test_inspect_json_init_and_convert(tmp_path, capsys):
    assert main(["inspect", str(CASES / "inttune-nystrom-tied"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tied"] and report["flavour"] == "inttune-tied" and report["held_bytes"] == 90 * 8 * 8 * 4
    out = tmp_path / "t"
    assert main(["init", "--rank", "8", "--targets", "q_proj", "v_proj", "o_proj", "--tied-form",
                 "--out", str(out)]) == 0
    assert "tied          yes" in capsys.readouterr().out
    assert main(["inspect", str(out), "--json"]) == 0
    mine = json.loads(capsys.readouterr().out)
    assert mine["family_key"] == report["family_key"]  # same base, r, targets, layers: one family
    assert main(["convert", str(out), "--to", "lora", "--out", str(tmp_path / "l")]) == 0
    assert "flavour       lora" in capsys.readouterr().out


def test_expected_failures_exit_2_with_one_line(capsys):
    assert main(["inspect", str(CASES / "rank-over-limit"), "--max-rank", "64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rank 128" in err and "max rank 64" in err


def test_an_out_that_is_a_file_exits_2_with_one_line(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    assert main(["init", "--rank", "4", "--targets", "q_proj", "--tied-form", "--out", str(taken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {taken} is a file, not a folder" in err
    assert taken.read_text() == "mine"


def test_subcommands_register_on_a_parent_parser():
    parser = argparse.ArgumentParser()
    add_adapter_subcommands(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["init", "--rank", "4", "--targets", "all-linear", "--out", "x", "--variant", "slora"])
    assert args.func.__name__ == "_init" and args.targets == ["all-linear"] and args.model == "default"


def _n_and_w(out, base_fp32, key_part: str = "layers.0.self_attn.q_proj"):
    """(N of one site as written to disk, the base weight W of that projection)."""
    from safetensors.torch import load_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    n = next(v for k, v in tensors.items() if key_part in k and "lora_N" in k)
    return n, base_fp32.weights[f"model.{key_part}.weight"]


def test_init_leaves_the_model_unchanged_unless_told_it_is_a_training_start(tmp_path, capsys, base_fp32):
    import torch

    zero = tmp_path / "zero"
    assert main(["init", "--rank", "4", "--targets", "q_proj", "--tied-form", "--out", str(zero)]) == 0
    assert "leaves the model unchanged" in capsys.readouterr().out
    n, _ = _n_and_w(zero, base_fp32)
    assert n.shape == (4, 4) and not n.any()  # B·N·A = 0: every answer is the base model's
    start = tmp_path / "start"
    assert main(["init", "--rank", "4", "--targets", "q_proj", "--tied-form", "--training-start",
                 "--out", str(start)]) == 0
    assert "a training start" in capsys.readouterr().out
    n, w = _n_and_w(start, base_fp32)
    assert torch.equal(n, w[:4, :4].float())  # the NLoRA reference init, N = W[:r, :r]



U64 = 18446744073709551615
INIT = ["init", "--targets", "q_proj", "--out", "OUT"]
TUNE = ["tune", "--data", "d.jsonl", "--out", "OUT"]
COMPRESS = ["compress", "a", "--out", "OUT"]


@pytest.mark.parametrize("argv, flag, value, expected", [
    # torch takes seeds in [0, 2^64); a bigger one was a ValueError traceback from manual_seed
    ([*INIT, "--rank", "4"], "--seed", "99999999999999999999999", f"an integer in [0, {U64}]"),
    ([*INIT, "--rank", "4"], "--seed", "-1", f"an integer in [0, {U64}]"),
    (INIT, "--rank", "0", "an integer >= 1"),
    ([*INIT, "--rank", "4"], "--layers", "-1", "an integer >= 0"),
    (TUNE, "--seed", "99999999999999999999999", f"an integer in [0, {U64}]"),
    (TUNE, "--rank", "-1", "an integer >= 1"),
    (TUNE, "--epochs", "0", "an integer >= 1"),
    (TUNE, "--steps", "0", "an integer >= 1"),
    (TUNE, "--batch-size", "0", "an integer >= 1"),
    (TUNE, "--grad-accum", "-2", "an integer >= 1"),
    (TUNE, "--warmup", "-1", "an integer >= 0"),
    (TUNE, "--max-len", "0", "an integer >= 1"),
    # torch.set_num_threads(-1) was a RuntimeError traceback
    (COMPRESS, "--threads", "-1", "an integer >= 1"),
    (COMPRESS, "--threads", "0", "an integer >= 1"),
    (COMPRESS, "--rank", "0", "an integer >= 1"),
    (COMPRESS, "--sweep", "-4", "an integer >= 1"),
    (COMPRESS, "--iters", "-1", "an integer >= 0"),
    (COMPRESS, "--new-tokens", "0", "an integer >= 1"),
    (COMPRESS, "--max-rank", "0", "an integer >= 1"),
    (["inspect", "a"], "--max-rank", "-1", "an integer >= 1"),
])
def test_integer_flags_out_of_range_are_argparse_errors(tmp_path, capsys, argv, flag, value, expected):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, flag, value])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"nlora-serve adapters {argv[0]}: error: argument {flag}: must be {expected}; got {value}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["convert", "x", "--to", "lora"], ["init", "--rank", "4"], ["compress", "x"]])
def test_an_empty_out_is_a_usage_error_not_the_current_folder(argv, capsys, tmp_path, monkeypatch):
    # a hostile tester's find: --out '' is Path('.'): convert wrote a 19.6 MB adapter and compress a
    # family into the current folder, exit 0
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--out", ""])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"nlora-serve adapters {argv[0]}: error: argument --out: must name a folder; got an empty path")
    assert not list(tmp_path.iterdir())
